"""Dynamic batching: passes never mix keys, respect the row limit, keep request order, never split a
request, hand every request its own rows, and share a pass's error. The forward pass here records what
it was given and computes a function of its rows, so a wrong slice shows."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from server.config import ServerSection
from server.rpc.batching import Batcher


class Recorder:
    """A forward pass: logits = [row sum, key marker]; remembers each pass; can be slowed or fail."""

    def __init__(self, delay: float = 0.05, fail_key: Any = None) -> None:
        self.passes: list[tuple[Any, int]] = []
        self.delay = delay
        self.fail_key = fail_key
        self.lock = threading.Lock()

    def __call__(self, key: Any, inputs: np.ndarray) -> tuple[np.ndarray, int]:
        with self.lock:
            self.passes.append((key, len(inputs)))
        threading.Event().wait(self.delay)
        if key == self.fail_key:
            raise RuntimeError(f"pass of {key} failed")
        marker = np.full((len(inputs), 1), hash(key) % 1000, dtype=np.float32)
        return np.concatenate([inputs.sum(axis=1, keepdims=True), marker], axis=1), 7


def _rows(start: int, n: int) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float32).reshape(n, 1) * np.ones((1, 3), dtype=np.float32)


async def _submit_all(batcher: Batcher, requests: list[tuple[Any, np.ndarray]]) -> list[Any]:
    return await asyncio.gather(*(batcher.submit(k, x) for k, x in requests), return_exceptions=True)


def _run(max_batch_size: int, requests: list[tuple[Any, np.ndarray]], recorder: Recorder, delay_ms: float = 0.0):  # type: ignore[no-untyped-def]
    with ThreadPoolExecutor(4) as executor:
        batcher = Batcher(executor, max_batch_size=max_batch_size, max_batch_delay_ms=delay_ms)
        batcher.forward = recorder
        return asyncio.run(_submit_all(batcher, requests))


def test_every_request_gets_its_own_rows_and_keys_are_never_mixed() -> None:
    requests = [(("a", False) if i % 2 else ("b", False), _rows(10 * i, 1 + i % 3)) for i in range(24)]
    recorder = Recorder()
    results = _run(8, requests, recorder)
    for (key, x), (logits, version) in zip(requests, results, strict=True):
        assert version == 7
        np.testing.assert_array_equal(logits[:, 0], x.sum(axis=1))
        assert np.all(logits[:, 1] == hash(key) % 1000)
    assert all(rows <= 8 for _, rows in recorder.passes)
    assert len(recorder.passes) < len(requests)  # requests really were joined
    assert sum(rows for _, rows in recorder.passes) == sum(len(x) for _, x in requests)


def test_a_request_larger_than_the_limit_runs_alone_and_whole() -> None:
    recorder = Recorder()
    big = _rows(0, 20)
    results = _run(8, [("k", _rows(100, 2)), ("k", big), ("k", _rows(200, 3))], recorder)
    assert ("k", 20) in recorder.passes
    np.testing.assert_array_equal(results[1][0][:, 0], big.sum(axis=1))


def test_an_error_reaches_every_request_of_its_pass_and_no_other_key() -> None:
    recorder = Recorder(fail_key="bad")
    results = _run(64, [("bad", _rows(0, 2)), ("bad", _rows(5, 2)), ("good", _rows(9, 2))], recorder)
    assert isinstance(results[0], RuntimeError) and isinstance(results[1], RuntimeError)
    np.testing.assert_array_equal(results[2][0][:, 0], _rows(9, 2).sum(axis=1))


def test_size_one_turns_batching_off() -> None:
    recorder = Recorder(delay=0.01)
    _run(1, [("k", _rows(i, 2)) for i in range(6)], recorder)
    assert sorted(rows for _, rows in recorder.passes) == [2] * 6


def test_a_delay_gathers_requests_that_arrive_after_the_first() -> None:
    recorder = Recorder(delay=0.0)

    async def staggered(batcher: Batcher) -> list[Any]:
        async def late(i: int) -> Any:
            await asyncio.sleep(0.005 * i)
            return await batcher.submit("k", _rows(i, 1))

        return await asyncio.gather(*(late(i) for i in range(5)))

    with ThreadPoolExecutor(2) as executor:
        batcher = Batcher(executor, max_batch_size=64, max_batch_delay_ms=200)
        batcher.forward = recorder
        results = asyncio.run(staggered(batcher))
    assert recorder.passes == [("k", 5)]
    assert [r[0][0, 0] for r in results] == [3.0 * i for i in range(5)]


def test_a_delayed_pass_goes_as_soon_as_the_usual_company_has_arrived() -> None:
    """Four clients that each wait for their answer: after the first pass, a pass waits for four, not the delay."""
    recorder = Recorder(delay=0.0)
    delay_s = 1.0

    async def clients(batcher: Batcher) -> float:
        async def client(i: int) -> None:
            for round_ in range(5):
                logits, _ = await batcher.submit("k", _rows(10 * i + round_, 1))
                assert logits[0, 0] == 3.0 * (10 * i + round_)

        started = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(4)))
        return time.perf_counter() - started

    with ThreadPoolExecutor(2) as executor:
        batcher = Batcher(executor, max_batch_size=64, max_batch_delay_ms=delay_s * 1000)
        batcher.forward = recorder
        elapsed = asyncio.run(clients(batcher))
    assert recorder.passes == [("k", 4)] * 5
    # The first pass waits out the delay (no company known yet); waiting it out for every pass takes 5 s.
    assert elapsed < 3 * delay_s, elapsed


def test_a_lone_client_keeps_waiting_out_the_delay_so_company_can_still_join() -> None:
    recorder = Recorder(delay=0.0)

    async def scenario(batcher: Batcher) -> None:
        for i in range(3):  # passes of one request: nothing says company is coming, nor that it is not
            await batcher.submit("k", _rows(i, 1))

        async def late(i: int) -> Any:
            await asyncio.sleep(0.02 * i)
            return await batcher.submit("k", _rows(i, 1))

        await asyncio.gather(*(late(i) for i in range(3)))

    with ThreadPoolExecutor(2) as executor:
        batcher = Batcher(executor, max_batch_size=64, max_batch_delay_ms=300)
        batcher.forward = recorder
        asyncio.run(scenario(batcher))
    assert recorder.passes == [("k", 1)] * 3 + [("k", 3)]


@pytest.mark.parametrize("delay_ms", [0.0, 5.0])
def test_a_cancelled_request_is_dropped_without_disturbing_the_others(delay_ms: float) -> None:
    recorder = Recorder(delay=0.05)

    async def scenario(batcher: Batcher) -> list[Any]:
        first = asyncio.ensure_future(batcher.submit("k", _rows(0, 1)))
        await asyncio.sleep(0.01)  # the first pass is running
        gone = asyncio.ensure_future(batcher.submit("k", _rows(1, 1)))
        kept = asyncio.ensure_future(batcher.submit("k", _rows(2, 1)))
        await asyncio.sleep(0)
        gone.cancel()
        return [await first, await kept]

    with ThreadPoolExecutor(2) as executor:
        batcher = Batcher(executor, max_batch_size=64, max_batch_delay_ms=delay_ms)
        batcher.forward = recorder
        _, kept = asyncio.run(scenario(batcher))
    assert kept[0][0, 0] == 6.0
    assert sum(rows for _, rows in recorder.passes) == 2  # the cancelled row never reached the model


class Threads:
    """A forward pass taking ``seconds`` a row that records the thread each pass ran on, under a settable
    model version."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.version = 1
        self.seconds = seconds
        self.threads: list[str] = []

    def __call__(self, key: Any, inputs: np.ndarray) -> tuple[np.ndarray, int]:
        self.threads.append(threading.current_thread().name)
        if self.seconds:
            threading.Event().wait(self.seconds * len(inputs))
        return inputs[:, :1].copy(), self.version


def _one_by_one(forward: Threads, versions: list[int], inline_seconds: float = 0.05, rows: int = 1) -> list[str]:
    """Sequential single requests, the model version before each as given; the threads they ran on.

    The budget is 100 times the server's, so that a loaded machine's scheduling delays do not matter.
    """

    async def scenario(batcher: Batcher) -> None:
        for i, version in enumerate(versions):
            forward.version = version
            logits, answered = await batcher.submit("k", _rows(i, rows))
            assert answered == version and logits[0, 0] == i

    with ThreadPoolExecutor(2, thread_name_prefix="executor") as executor:
        batcher = Batcher(executor, max_batch_size=64, max_batch_delay_ms=0, inline_seconds=inline_seconds)
        batcher.forward = forward
        batcher.version = lambda: forward.version
        asyncio.run(scenario(batcher))
    return ["loop" if name == "MainThread" else "executor" for name in forward.threads]


def test_a_pass_known_to_be_cheap_runs_on_the_loop_until_the_model_changes() -> None:
    where = _one_by_one(Threads(), [1, 1, 1, 2, 2, 2])
    assert where == ["executor", "loop", "loop", "executor", "loop", "loop"]


def test_slow_passes_and_big_ones_stay_on_the_executor() -> None:
    assert set(_one_by_one(Threads(seconds=0.1), [1] * 4)) == {"executor"}
    assert set(_one_by_one(Threads(), [1] * 4, inline_seconds=0)) == {"executor"}  # turned off
    # 0.1 ms a row: a row runs on the loop, 3,000 rows (0.3 s) never.
    assert _one_by_one(Threads(seconds=1e-4), [1] * 3) == ["executor", "loop", "loop"]
    assert set(_one_by_one(Threads(seconds=1e-4), [1] * 3, rows=3000)) == {"executor"}


class OneSlowPass(Threads):
    """A cheap pass, except that pass ``slow`` takes 0.2 s (as when the machine preempts the server)."""

    def __init__(self, slow: int) -> None:
        super().__init__()
        self.slow, self.calls = slow, 0

    def __call__(self, key: Any, inputs: np.ndarray) -> tuple[np.ndarray, int]:
        self.calls += 1
        if self.calls == self.slow:
            threading.Event().wait(0.2)
        return super().__call__(key, inputs)


def test_one_slow_pass_does_not_move_a_cheap_key_off_the_loop() -> None:
    assert _one_by_one(OneSlowPass(slow=3), [1] * 6) == ["executor", "loop", "loop", "loop", "loop", "loop"]
    # Every pass slow for a whole window: the key's cost is the cheapest of its latest passes, so it moves.
    always = Threads(seconds=0.1)
    assert _one_by_one(always, [1] * 3) == ["executor"] * 3


def test_the_loop_thread_runs_torch_on_one_thread_and_no_other_thread_changes() -> None:
    import torch

    from server.rpc.batching import intra_op_threads

    configured = torch.get_num_threads()
    seen: dict[str, int] = {}

    def loop_thread() -> None:
        intra_op_threads(1)
        seen["loop"] = torch.get_num_threads()

    thread = threading.Thread(target=loop_thread)
    thread.start()
    thread.join()
    later = threading.Thread(target=lambda: seen.setdefault("later", torch.get_num_threads()))
    later.start()
    later.join()
    assert seen == {"loop": 1, "later": configured}
    assert torch.get_num_threads() == configured


def test_the_default_limit_joins_a_burst_of_256_row_requests() -> None:
    # At the old default (64) each of these was a pass of its own, one at a time per task: half the rows/s.
    recorder = Recorder()
    requests = [("k", _rows(1000 * i, 256)) for i in range(8)]
    results = _run(ServerSection().max_batch_size, requests, recorder)
    assert len(recorder.passes) < len(requests)
    assert max(rows for _, rows in recorder.passes) > 256  # requests really were joined
    for (_, x), (logits, _version) in zip(requests, results, strict=True):
        np.testing.assert_array_equal(logits[:, 0], x.sum(axis=1))
