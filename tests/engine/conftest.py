"""Engine test settings."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread() -> Iterator[None]:
    # The models here are tiny: one intra-op thread is faster than two fighting over 2 shared cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
