"""The ``lure`` strategy on real data: sklearn digits as a stream of stratified mega-batches.

A fixed, stratified held-out test set (360 images) measures learning; the remaining 1437 images are
split into four stratified mega-batches ``mb0 .. mb3``. A small :class:`Server` stands in for the
worker: it keeps ``Report.retain`` and passes it back as ``replay``, and purges a task's retained data
when it is unlearned.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from sklearn.datasets import load_digits
from sklearn.model_selection import StratifiedKFold, train_test_split
from torch import nn

from server.engine.backbones import build_backbone
from server.engine.lure import LureStrategy, apply_reset, build_lure, later_layer_modules
from server.engine.lure.data import augment_batch, crop_padding, reservoir_sample
from server.engine.lure.importance import connection_weights, importance_scores, top_fraction_masks
from server.engine.metrics import accuracy
from server.engine.protocol import LearnOptions, Report, TaskData, UnknownTaskError, no_progress, supports_temporary
from server.engine.training import seeded_rng

from .conformance import serialized

CPU = torch.device("cpu")
INPUT_SHAPE = (1, 8, 8)
NUM_CLASSES = 10
MEGABATCHES = ("mb0", "mb1", "mb2", "mb3")
#: Options of the stream the accuracy tests learn (lr 0 = the builder's default, 0.1).
STREAM_OPTIONS = LearnOptions(epochs=10, batch_size=64, learning_rate=0.0, seed=0)
#: Cheaper options for the exactness tests, which compare models rather than accuracies.
QUICK_OPTIONS = LearnOptions(epochs=2, batch_size=64, learning_rate=0.05, seed=3)


@dataclass(frozen=True)
class DigitsStream:
    megabatches: dict[str, TaskData]
    test: TaskData


@functools.cache
def digits_stream(count: int = len(MEGABATCHES)) -> DigitsStream:
    """Stratified held-out test set and ``count`` stratified mega-batches (deterministic)."""
    images, labels = load_digits(return_X_y=True)
    inputs = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, *INPUT_SHAPE)
    targets = torch.tensor(labels, dtype=torch.int64)
    rest, test = train_test_split(np.arange(len(labels)), test_size=360, stratify=labels, random_state=0)
    folds = StratifiedKFold(n_splits=count, shuffle=True, random_state=0).split(rest, labels[rest])
    megabatches = {}
    for k, (_, fold) in enumerate(folds):
        index = torch.from_numpy(rest[fold])
        megabatches[f"mb{k}"] = TaskData(inputs[index], targets[index])
    test_index = torch.from_numpy(test)
    return DigitsStream(megabatches, TaskData(inputs[test_index], targets[test_index]))


@dataclass
class Server:
    """What the worker does around a strategy: keep retained data, pass it back, purge on unlearn."""

    strategy: LureStrategy
    options: LearnOptions = STREAM_OPTIONS
    retained: dict[str, TaskData] = field(default_factory=dict)
    reports: dict[str, Report] = field(default_factory=dict)
    stream: DigitsStream = field(default_factory=digits_stream)

    def learn(self, *names: str) -> None:
        for name in names:
            report = self.strategy.learn(
                name, self.stream.megabatches[name], self.options, no_progress, dict(self.retained)
            )
            if report.retain is not None:
                self.retained[name] = report.retain
            self.reports[name] = report

    def unlearn(self, name: str, method: str) -> Report:
        # The integrator passes the forgotten task's own retained data to "approximate" (it needs it).
        replay = dict(self.retained) if method == "approximate" else self._others(name)
        report = self.strategy.unlearn(name, method, no_progress, replay)
        self.retained.pop(name, None)
        return report

    def _others(self, name: str) -> dict[str, TaskData]:
        return {task: data for task, data in self.retained.items() if task != name}

    def test_accuracy(self) -> float:
        test = self.stream.test
        return accuracy(self.strategy.predictor().predict(None, test.inputs), test.labels)


def _lure(backbone: str = "mlp", seed: int = 0, **options: Any) -> LureStrategy:
    return build_lure(
        backbone=backbone,
        input_shape=INPUT_SHAPE,
        num_classes=NUM_CLASSES,
        device=CPU,
        seed=seed,
        **options,
    )


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"tensors differ: {different}"


@pytest.fixture
def deterministic() -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.fixture(scope="module")
def trained() -> Server:
    """An MLP that learned the whole stream with the paper's defaults (SNIP, keep 80%, full replay)."""
    server = Server(_lure("mlp", seed=0))
    server.learn(*MEGABATCHES)
    return server


def _copy(server: Server) -> Server:
    return Server(
        copy.deepcopy(server.strategy), server.options, dict(server.retained), dict(server.reports), server.stream
    )


# ---------------------------------------------------------------------------------------- builder


def test_capabilities_and_paper_defaults() -> None:
    strategy = _lure()
    assert strategy.name == "lure"
    assert strategy.task_incremental is False
    assert supports_temporary(strategy) is True
    assert strategy.unlearn_methods == ("exact", "approximate")
    assert strategy.needs_replay is True
    assert _lure(replay="buffer:10").needs_replay is True
    assert _lure(replay="none").needs_replay is False
    defaults = {name: p.default for name, p in inspect.signature(build_lure).parameters.items()}
    assert defaults["replay"] == "full"
    assert defaults["reset"] == "lure"
    assert defaults["importance"] == "snip"
    assert defaults["keep_fraction"] == 0.8
    assert defaults["importance_fraction"] == 0.2
    assert defaults["keep_scope"] == "global"
    assert (defaults["lr"], defaults["momentum"], defaults["weight_decay"]) == (0.1, 0.9, 1e-4)
    assert defaults["batch_size"] == 64
    assert (defaults["shrink"], defaults["perturb"]) == (0.4, 0.1)


@pytest.mark.parametrize(
    ("option", "value", "allowed"),
    [
        ("replay", "buffer:0", "full, buffer:N, none"),
        ("replay", "everything", "full, buffer:N, none"),
        ("reset", "dropout", "lure, warm-start, shrink-perturb, llf, fc"),
        ("importance", "grad", "snip, fisher, magnitude, random"),
        ("keep_scope", "row", "global, layer"),
        ("augment", "yes", "auto, on, off"),
        ("backbone", "vgg", "mlp, cnn, resnet18, resnet50"),
        ("keep_fraction", 0.0, "(0, 1]"),
        ("keep_fraction", 1.5, "(0, 1]"),
        ("importance_fraction", -0.1, "(0, 1]"),
        ("unlearn_fraction", 2.0, "(0, 1]"),
        ("val_fraction", 1.0, "[0, 1)"),
        ("lr", 0.0, "> 0"),
        ("shrink", 1.5, "[0, 1]"),
        ("relearn_epochs", -1, ">= 0"),
        ("snapshot_every", 0, ">= 1"),
    ],
)
def test_builder_names_the_bad_option_and_the_allowed_values(option: str, value: object, allowed: str) -> None:
    arguments: dict[str, object] = {"backbone": "mlp", option: value}
    with pytest.raises(ValueError, match=option) as error:
        _lure(**arguments)
    assert allowed in str(error.value)


# ---------------------------------------------------------------------------------------- learning


def test_learns_the_stream_well_above_chance(trained: Server) -> None:
    acc = trained.test_accuracy()
    assert acc >= 80.0, f"test accuracy {acc:.1f}% after the stream (chance is 10%)"
    assert trained.strategy.megabatches == MEGABATCHES
    assert trained.strategy.version == len(MEGABATCHES)
    for name, report in trained.reports.items():
        m = report.metrics
        assert all(isinstance(v, float) and math.isfinite(v) for v in m.values()), m
        assert m["generalization_gap"] == pytest.approx(m["train_accuracy"] - m["val_accuracy"])
        assert 0.0 <= m["ece"] <= 1.0
        assert m["train_seconds"] > 0
        first = name == MEGABATCHES[0]
        assert (m["importance_seconds"] > 0) is not first
        assert m["replayed_megabatches"] == MEGABATCHES.index(name)
    print(
        f"\nlure mlp digits: test accuracy {acc:.1f}%; SNIP seconds / train seconds per mega-batch: "
        + ", ".join(
            f"{name} {r.metrics['importance_seconds'] / r.metrics['train_seconds']:.3f}"
            for name, r in trained.reports.items()
        )
    )


def test_lure_reset_reinitializes_exactly_the_configured_share(trained: Server) -> None:
    model = trained.strategy.model
    connections = sum(w.numel() for w in connection_weights(model).values())
    total = sum(p.numel() for p in model.parameters())
    expected = (connections - round(0.8 * connections)) / total
    for name in MEGABATCHES[1:]:
        assert trained.reports[name].metrics["reinitialized_fraction"] == pytest.approx(expected, rel=1e-12)


def test_full_replay_retains_the_mega_batch_and_buffer_a_reservoir_sample() -> None:
    data = digits_stream().megabatches["mb0"]
    full = _lure().learn("mb0", data, QUICK_OPTIONS, no_progress, {})
    assert full.retain is data
    buffered = _lure(replay="buffer:50").learn("mb0", data, QUICK_OPTIONS, no_progress, {})
    assert buffered.retain is not None and len(buffered.retain) == 50
    rows = {(*x.flatten().tolist(), int(y)) for x, y in zip(data.inputs, data.labels, strict=True)}
    assert all(
        (*x.flatten().tolist(), int(y)) in rows
        for x, y in zip(buffered.retain.inputs, buffered.retain.labels, strict=True)
    )
    again = _lure(replay="buffer:50").learn("mb0", data, QUICK_OPTIONS, no_progress, {})
    assert again.retain is not None and torch.equal(again.retain.inputs, buffered.retain.inputs)
    assert _lure(replay="none").learn("mb0", data, QUICK_OPTIONS, no_progress, {}).retain is None


def test_reservoir_sample_is_uniform_over_the_stream() -> None:
    data = TaskData(torch.zeros(100, 1), torch.arange(100))
    counts = torch.zeros(100)
    for seed in range(400):
        counts[reservoir_sample(data, 10, torch.Generator().manual_seed(seed)).labels] += 1
    # Each sample is kept with probability 0.1: 40 expected of 400 draws; early and late alike.
    assert float(counts[:50].sum()) == pytest.approx(float(counts[50:].sum()), rel=0.15)
    assert float(counts.sum()) == 4000


def test_predict_refuses_a_task_name(trained: Server) -> None:
    predictor = trained.strategy.predictor()
    inputs = digits_stream().test.inputs[:4]
    with pytest.raises(ValueError, match="class-incremental"):
        predictor.predict("mb0", inputs)
    with pytest.raises(ValueError):
        predictor.predict("", inputs)
    logits = predictor.predict(None, inputs)
    assert logits.shape == (4, NUM_CLASSES) and logits.dtype == torch.float32 and logits.device.type == "cpu"


def test_refuses_a_live_name_an_unknown_task_and_an_unknown_method(trained: Server) -> None:
    strategy = trained.strategy
    with pytest.raises(ValueError, match="already learned"):
        strategy.learn("mb0", digits_stream().megabatches["mb0"], QUICK_OPTIONS, no_progress, {})
    with pytest.raises(UnknownTaskError):
        strategy.unlearn("mb9", "exact", no_progress, {})
    with pytest.raises(ValueError, match="exact, approximate"):
        strategy.unlearn("mb0", "retrain", no_progress, {})
    assert strategy.version == len(MEGABATCHES)


# ---------------------------------------------------------------------------------------- resets


def _model_and_fresh(backbone: str, input_shape: tuple[int, ...] = INPUT_SHAPE) -> tuple[nn.Module, nn.Module]:
    """A "trained" network (another init, random BatchNorm statistics) and a fresh one."""
    with seeded_rng(1):
        model = build_backbone(backbone, input_shape, NUM_CLASSES, width=8 if backbone in ("mlp", "cnn") else 0)
    with seeded_rng(2):
        fresh = build_backbone(backbone, input_shape, NUM_CLASSES, width=8 if backbone in ("mlp", "cnn") else 0)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if buffer.is_floating_point():
                buffer.copy_(torch.rand(buffer.shape, generator=generator) + ("var" in name))
    return model, fresh


def _sample(n: int = 96) -> TaskData:
    data = digits_stream().megabatches["mb0"]
    return TaskData(data.inputs[:n], data.labels[:n])


@pytest.mark.parametrize("backbone", ["mlp", "cnn"])
@pytest.mark.parametrize("importance", ["snip", "fisher", "magnitude", "random"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_lure_reset_keeps_the_top_fraction_and_reinitializes_the_rest_to_fresh_values(
    backbone: str, importance: str, scope: str
) -> None:
    model, fresh = _model_and_fresh(backbone)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    outcome = apply_reset(
        "lure",
        model,
        fresh,
        _sample(),
        importance=importance,
        keep_fraction=0.8,
        keep_scope=scope,
        rng=torch.Generator().manual_seed(0),
    )
    assert outcome.masks is not None
    after, fresh_state = model.state_dict(), fresh.state_dict()
    weights = connection_weights(model)
    assert outcome.masks.keys() == weights.keys()
    connections = sum(w.numel() for w in weights.values())
    kept = sum(int((~mask).sum()) for mask in outcome.masks.values())
    if scope == "global":
        assert kept == round(0.8 * connections)
    else:
        for name, mask in outcome.masks.items():
            assert int((~mask).sum()) == round(0.8 * mask.numel()), name
    assert outcome.reinitialized == connections - kept
    for name, mask in outcome.masks.items():
        assert torch.equal(after[name][mask], fresh_state[name][mask]), name
        assert torch.equal(after[name][~mask], before[name][~mask]), name
    # Biases, normalization parameters and BatchNorm statistics are untouched (scoring restores buffers).
    _assert_same_state(
        {k: v for k, v in after.items() if k not in weights}, {k: before[k] for k in after if k not in weights}
    )


def test_snip_scores_are_gradient_times_weight_of_the_mean_loss() -> None:
    model, _ = _model_and_fresh("mlp")
    data = _sample(100)
    scores = importance_scores(model, "snip", data, batch_size=32, device=CPU, rng=torch.Generator())
    weights = connection_weights(model)
    loss = F.cross_entropy(model(data.inputs), data.labels)
    grads = torch.autograd.grad(loss, list(weights.values()))
    for (name, weight), grad in zip(weights.items(), grads, strict=True):
        torch.testing.assert_close(scores[name], (grad * weight).abs().detach(), rtol=1e-4, atol=1e-7)


def test_global_ranking_keeps_the_highest_scores() -> None:
    scores = {"a.weight": torch.tensor([[5.0, 1.0]]), "b.weight": torch.tensor([4.0, 3.0, 2.0])}
    masks = top_fraction_masks(scores, 0.6, "global")  # 3 of 5
    assert masks["a.weight"].tolist() == [[True, False]]
    assert masks["b.weight"].tolist() == [True, True, False]
    ties = top_fraction_masks({"w": torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0])}, 0.4, "layer")  # lower index wins
    assert ties["w"].tolist() == [False, True, True, False, False]


@pytest.mark.parametrize("backbone", ["mlp", "cnn"])
def test_baseline_resets_do_what_they_say(backbone: str) -> None:
    model, fresh = _model_and_fresh(backbone)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    fresh_state = fresh.state_dict()
    data = _sample()

    warm = copy.deepcopy(model)
    assert apply_reset("warm-start", warm, fresh, data).reinitialized == 0
    _assert_same_state(warm.state_dict(), original)

    head = copy.deepcopy(model)
    apply_reset("fc", head, fresh, data)
    for key, value in head.state_dict().items():
        expected = fresh_state[key] if key.startswith("head.") else original[key]
        assert torch.equal(value, expected), key

    later = copy.deepcopy(model)
    modules = later_layer_modules(later)
    assert modules == (["body.3", "head"] if backbone == "mlp" else ["features.4", "features.5", "head"])
    apply_reset("llf", later, fresh, data)
    for key, value in later.state_dict().items():
        reset = key.startswith(tuple(f"{m}." for m in modules))
        assert torch.equal(value, fresh_state[key] if reset else original[key]), key

    shrunk = copy.deepcopy(model)
    apply_reset("shrink-perturb", shrunk, fresh, data, shrink=0.4, perturb=0.1)
    parameters = dict(model.named_parameters())
    for key, value in shrunk.state_dict().items():
        if key in parameters:
            torch.testing.assert_close(value, 0.4 * original[key] + 0.1 * fresh_state[key], rtol=0, atol=1e-7)
        else:
            assert torch.equal(value, original[key]), key  # buffers are left alone


def test_later_layers_of_a_resnet_are_blocks_3_and_4_and_the_head() -> None:
    with seeded_rng(0):
        resnet = build_backbone("resnet18", (3, 32, 32), NUM_CLASSES)
    assert later_layer_modules(resnet) == ["layer3", "layer4", "fc"]


@pytest.mark.parametrize("reset", ["warm-start", "fc", "llf", "shrink-perturb"])
def test_strategy_applies_the_configured_reset_from_the_second_mega_batch(reset: str) -> None:
    server = Server(_lure("mlp", reset=reset, width=16), QUICK_OPTIONS)
    server.learn("mb0", "mb1")
    first, second = server.reports["mb0"].metrics, server.reports["mb1"].metrics
    assert first["reinitialized_fraction"] == 0.0
    model = server.strategy.model
    total = sum(p.numel() for p in model.parameters())
    expected = {
        "warm-start": 0,
        "fc": sum(p.numel() for p in model.get_submodule("head").parameters()),
        "llf": sum(p.numel() for m in later_layer_modules(model) for p in model.get_submodule(m).parameters()),
        "shrink-perturb": total,
    }[reset]
    assert second["reinitialized_fraction"] == pytest.approx(expected / total)


# ---------------------------------------------------------------------------------------- augmentation


def test_augmentation_is_a_padded_crop_and_maybe_a_flip() -> None:
    assert crop_padding((3, 32, 32)) == 4 and crop_padding((3, 16, 16)) == 2 and crop_padding((3, 224, 224)) == 28
    assert _lure("cnn", width=8).config.augments is False  # digits 1x8x8: no augmentation
    rgb = build_lure(backbone="cnn", width=8, input_shape=(3, 16, 16), num_classes=10, device=CPU, seed=0)
    assert rgb.config.augments is True
    images = torch.rand(6, 3, 5, 7)
    out = augment_batch(images, 2, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    padded = F.pad(images, (2, 2, 2, 2))
    for i in range(len(images)):
        windows = [
            padded[i, :, dy : dy + 5, dx : dx + 7].flip(-1) if flip else padded[i, :, dy : dy + 5, dx : dx + 7]
            for dy in range(5)
            for dx in range(5)
            for flip in (False, True)
        ]
        assert any(torch.equal(out[i], w) for w in windows)


# ---------------------------------------------------------------------------------------- unlearning


@pytest.mark.usefixtures("deterministic")
@pytest.mark.parametrize("forget", ["mb1"])
def test_exact_unlearning_equals_never_having_learned_the_mega_batch(forget: str) -> None:
    """CNN (BatchNorm) so that buffers are covered too."""
    server = Server(_lure("cnn", width=8, seed=5), QUICK_OPTIONS)
    server.learn(*MEGABATCHES)
    report = server.unlearn(forget, "exact")
    remaining = [name for name in MEGABATCHES if name != forget]
    assert report.metrics["replayed_megabatches"] == len(MEGABATCHES) - 1 - MEGABATCHES.index(forget)
    assert report.metrics["unlearn_seconds"] > 0

    never = Server(_lure("cnn", width=8, seed=5), QUICK_OPTIONS)
    never.learn(*remaining)
    _assert_same_state(server.strategy.model.state_dict(), never.strategy.model.state_dict())
    assert server.strategy.megabatches == tuple(remaining)
    # The snapshots taken after the forgotten mega-batch were recomputed without it.
    for mine, theirs in zip(server.strategy.state_dict()["stream"], never.strategy.state_dict()["stream"], strict=True):
        assert mine["name"] == theirs["name"]
        _assert_same_state(mine["before"], theirs["before"])
    test = digits_stream().test.inputs
    assert torch.equal(server.strategy.predictor().predict(None, test), never.strategy.predictor().predict(None, test))
    assert server.strategy.version == len(MEGABATCHES) + 1


@pytest.mark.usefixtures("deterministic")
def test_exact_unlearning_after_approximate_unlearning_is_still_exact() -> None:
    """Approximate unlearning leaves traces in later snapshots; exact unlearning rolls back past them."""
    server = Server(_lure("mlp", width=16, seed=2, relearn_epochs=1), QUICK_OPTIONS)
    server.learn(*MEGABATCHES)
    server.unlearn("mb1", "approximate")
    server.unlearn("mb2", "exact")  # must forget mb1 exactly too: its traces are in mb2's snapshot
    never = Server(_lure("mlp", width=16, seed=2), QUICK_OPTIONS)
    never.learn("mb0", "mb3")
    _assert_same_state(server.strategy.model.state_dict(), never.strategy.model.state_dict())

    # Approximate unlearning of the *last* mega-batch: the next one gets the clean snapshot.
    server = Server(_lure("mlp", width=16, seed=2, relearn_epochs=1), QUICK_OPTIONS)
    server.learn("mb0", "mb1")
    server.unlearn("mb1", "approximate")
    server.learn("mb2")
    server.unlearn("mb2", "exact")
    never = Server(_lure("mlp", width=16, seed=2), QUICK_OPTIONS)
    never.learn("mb0")
    _assert_same_state(server.strategy.model.state_dict(), never.strategy.model.state_dict())


@pytest.mark.usefixtures("deterministic")
def test_sparser_snapshots_roll_back_further_and_stay_exact() -> None:
    server = Server(_lure("mlp", width=16, seed=4, snapshot_every=2), QUICK_OPTIONS)
    server.learn(*MEGABATCHES)
    kept = [entry["before"] is not None for entry in server.strategy.state_dict()["stream"]]
    assert kept == [True, False, True, False]
    report = server.unlearn("mb3", "exact")  # rolls back to the snapshot before mb2 and replays mb2
    assert report.metrics["replayed_megabatches"] == 1
    never = Server(_lure("mlp", width=16, seed=4, snapshot_every=2), QUICK_OPTIONS)
    never.learn("mb0", "mb1", "mb2")
    _assert_same_state(server.strategy.model.state_dict(), never.strategy.model.state_dict())


def test_exact_unlearning_needs_full_replay_and_every_retained_mega_batch() -> None:
    for replay in ("buffer:20", "none"):
        server = Server(_lure("mlp", width=16, replay=replay), QUICK_OPTIONS)
        server.learn("mb0", "mb1")
        with pytest.raises(ValueError, match="replay=full"):
            server.strategy.unlearn("mb0", "exact", no_progress, server._others("mb0"))
    server = Server(_lure("mlp", width=16), QUICK_OPTIONS)
    server.learn("mb0", "mb1", "mb2")
    with pytest.raises(ValueError, match="missing: 'mb2'"):
        server.strategy.unlearn("mb1", "exact", no_progress, {"mb0": server.retained["mb0"]})
    assert server.strategy.version == 3  # nothing changed


def test_approximate_unlearning_lowers_accuracy_on_the_forgotten_training_data(trained: Server) -> None:
    server = _copy(trained)
    forgotten = digits_stream().megabatches["mb1"]
    predict = server.strategy.predictor().predict
    before = accuracy(predict(None, forgotten.inputs), forgotten.labels)
    with pytest.raises(ValueError, match=r"replay\['mb1'\]"):
        server.strategy.unlearn("mb1", "approximate", no_progress, server._others("mb1"))
    report = server.unlearn("mb1", "approximate")
    after = accuracy(server.strategy.predictor().predict(None, forgotten.inputs), forgotten.labels)
    test_after = server.test_accuracy()
    print(
        f"\napproximate unlearning of mb1: accuracy on its training data {before:.1f}% -> {after:.1f}%, "
        f"test {test_after:.1f}%"
    )
    assert after < before
    assert test_after >= 80.0
    assert report.metrics["reinitialized_fraction"] > 0 and report.metrics["relearn_samples"] > 0
    assert server.strategy.megabatches == ("mb0", "mb2", "mb3")


# ---------------------------------------------------------------------------------------- state


def test_state_round_trip_is_exact_and_continues_exactly(trained: Server) -> None:
    original = _copy(trained)
    state = serialized(original.strategy.state_dict())
    restored = Server(_lure("mlp", seed=99), original.options, dict(original.retained))
    restored.strategy.load_state_dict(state)
    assert restored.strategy.version == original.strategy.version
    assert restored.strategy.megabatches == original.strategy.megabatches
    _assert_same_state(restored.strategy.model.state_dict(), original.strategy.model.state_dict())
    saved_stream = state["stream"]
    assert isinstance(saved_stream, list)
    for mine, theirs in zip(restored.strategy.state_dict()["stream"], saved_stream, strict=True):
        _assert_same_state(mine["before"], theirs["before"])
        assert mine["options"] == theirs["options"]
    # Continuing uses the restored snapshots, options and seed: both must end bit-identical.
    original.unlearn("mb2", "exact")
    restored.unlearn("mb2", "exact")
    _assert_same_state(restored.strategy.model.state_dict(), original.strategy.model.state_dict())

    with pytest.raises(ValueError, match="width"):
        _lure("mlp", width=32).load_state_dict(state)


def test_predictor_is_a_snapshot(trained: Server) -> None:
    server = _copy(trained)
    predictor = server.strategy.predictor()
    test = digits_stream().test.inputs
    before = predictor.predict(None, test)
    server.unlearn("mb3", "exact")
    assert torch.equal(predictor.predict(None, test), before)
    assert server.strategy.predictor().version == predictor.version + 1


# ---------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_resets_on_a_longer_cnn_stream() -> None:
    """Eight mega-batches, the CNN, every reset: all learn; prints test accuracy, CER, gap and ECE."""
    stream = digits_stream(8)
    test = stream.test
    rows = []
    for reset in ("lure", "warm-start", "shrink-perturb", "llf", "fc"):
        server = Server(_lure("cnn", width=16, seed=0, reset=reset), STREAM_OPTIONS, stream=stream)
        errors = 0
        for name in stream.megabatches:
            server.learn(name)
            logits = server.strategy.predictor().predict(None, test.inputs)
            errors += int((logits.argmax(1) != test.labels).sum())  # CER: misclassified test samples, summed
        final = server.test_accuracy()
        gap = float(np.mean([r.metrics["generalization_gap"] for r in server.reports.values()]))
        snip = sum(r.metrics["importance_seconds"] for r in server.reports.values())
        train = sum(r.metrics["train_seconds"] for r in server.reports.values())
        rows.append(
            f"{reset:15s} test {final:5.1f}%  CER {errors:5d}  gap {gap:5.2f}  importance/train {snip / train:.4f}"
        )
        assert final >= (90.0 if reset == "lure" else 80.0), rows[-1]
    print("\n" + "\n".join(rows))


@pytest.mark.slow
@pytest.mark.usefixtures("deterministic")
@pytest.mark.parametrize("forget", ["mb0", "mb2", "mb3"])
def test_exact_unlearning_of_any_position_equals_retraining_without_it(forget: str) -> None:
    server = Server(_lure("cnn", width=16, seed=1), STREAM_OPTIONS)
    server.learn(*MEGABATCHES)
    report = server.unlearn(forget, "exact")
    never = Server(_lure("cnn", width=16, seed=1), STREAM_OPTIONS)
    never.learn(*(name for name in MEGABATCHES if name != forget))
    _assert_same_state(server.strategy.model.state_dict(), never.strategy.model.state_dict())
    retrain = sum(r.metrics["learn_seconds"] for r in never.reports.values())
    seconds = report.metrics["unlearn_seconds"]
    print(f"\nexact unlearning of {forget}: {seconds:.2f}s; retraining from scratch {retrain:.2f}s")
