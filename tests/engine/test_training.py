"""Shared training helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from server.engine.training import (
    check_predict_inputs,
    class_mask,
    count_minibatches,
    cpu_float32,
    derive_seed,
    linear_init_params,
    mask_logits,
    mask_unseen,
    minibatches,
    seeded_generator,
    seeded_rng,
    to_device,
    unseen_classes,
)


@pytest.mark.parametrize(("n", "batch_size"), [(1, 1), (2, 1), (10, 3), (9, 4), (64, 32), (65, 32), (7, 100)])
def test_minibatches_cover_every_sample_once(n: int, batch_size: int) -> None:
    batches = minibatches(n, batch_size, seeded_generator(1))
    assert sorted(torch.cat(batches).tolist()) == list(range(n))
    assert len(batches) == count_minibatches(n, batch_size)
    assert all(b.numel() > 1 for b in batches) or n == 1  # no single-sample batch for BatchNorm


def test_minibatches_are_seeded() -> None:
    first = minibatches(50, 8, seeded_generator(3, "x"))
    second = minibatches(50, 8, seeded_generator(3, "x"))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_derive_seed_is_stable_and_separates_parts() -> None:
    assert derive_seed(0, "init") == derive_seed(0, "init")
    assert derive_seed(0, "init") != derive_seed(1, "init")
    assert derive_seed(1, 23) != derive_seed(12, 3)
    assert 0 <= derive_seed("anything") < 2**63
    # Pinned: a change would silently change every restored model's future shuffles.
    assert derive_seed(0, "init") == 6109011495221250200


def test_linear_init_params_match_nn_linear() -> None:
    with seeded_rng(11):
        reference = nn.Linear(20, 5)
    weight, bias = linear_init_params(20, 5, torch.Generator().manual_seed(11))
    assert torch.equal(weight, reference.weight.detach())
    assert torch.equal(bias, reference.bias.detach())


def test_class_mask_and_mask_logits() -> None:
    mask = class_mask([1, 3], 5)
    assert mask.tolist() == [False, True, False, True, False]
    assert not class_mask([], 3).any()
    logits = mask_logits(torch.zeros(2, 5), mask)
    assert torch.isneginf(logits[:, [0, 2, 4]]).all() and (logits[:, [1, 3]] == 0).all()


def test_serving_helpers_mask_like_mask_logits_and_skip_only_what_changes_nothing() -> None:
    logits = torch.randn(3, 5)
    partial = class_mask([1, 3], 5)
    unseen = unseen_classes(partial)
    assert unseen is not None and torch.equal(mask_unseen(logits, unseen), mask_logits(logits, partial))
    assert unseen_classes(class_mask(range(5), 5)) is None
    assert mask_unseen(logits, None) is logits  # every class seen: no operation at all

    assert cpu_float32(logits) is logits and to_device(logits, torch.device("cpu")) is logits
    doubles = logits.double()
    converted = cpu_float32(doubles)
    assert converted.dtype == torch.float32 and torch.equal(converted, logits)
    assert check_predict_inputs(logits, (5,)) is logits
    assert check_predict_inputs(doubles, (5,)).dtype == torch.float32
