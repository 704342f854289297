"""Dynamic batching: concurrent prediction requests for the same key share one forward pass.

Requests are grouped by key (task and whether an admin evaluates an unlearned task), never mixed across
keys; one forward pass uses one model snapshot, so no pass mixes model versions either. Per key, one
pass runs at a time on the executor; requests that arrive meanwhile form the next pass (at most
``max_batch_size`` rows, a request larger than that runs alone and is never split). With a delay, the
first request of a pass waits up to ``max_batch_delay_ms`` for company, and no longer than it takes the
usual company to arrive: as many requests as the largest of the key's last :data:`COMPANY_WINDOW`
passes joined, when that is more than one (clients that each wait for their answer before they ask
again come back together, and waiting out the rest of the delay for a client that is not coming only
adds latency). Without company in the window, a pass waits out the whole delay, so a lone request
never teaches the batcher to stop waiting.

A pass that the last one of its key says is cheap (the same model version, at most
:data:`INLINE_SECONDS` of thread CPU time scaled to its rows) runs on the event loop itself: the hop
to the executor and back costs about as much as a small model's whole forward pass. A new model
version, a bigger pass or a slow one goes to the executor again, so the loop is never held for
longer than that. A key's cost is the cheapest of its last :data:`COST_WINDOW` passes: on a busy
machine a pass preempted by another process is not a slow pass (wall time, not CPU time, is what is
measured, so that a pass waiting on a GPU counts as slow). The loop's thread runs its passes on one intra-op thread
(:func:`intra_op_threads`): they are small by definition, and waking torch's thread team for them
costs more CPU than it saves, CPU the gRPC poller and the clients on the same cores need.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

#: One forward pass: key, inputs ``[n, ...]`` -> logits ``[n, C]`` and the model version.
Forward = Callable[[Any, np.ndarray], tuple[np.ndarray, int]]
#: Longest expected pass that runs on the event loop instead of the executor (seconds).
INLINE_SECONDS = 0.0005
#: How many of a key's latest passes its cost is the cheapest of.
COST_WINDOW = 8
#: How many of a key's latest passes the company a delayed pass waits for is the largest of.
COMPANY_WINDOW = 8


@dataclass
class _Cost:
    """What a row of a key's latest passes cost on one model version (seconds, newest last)."""

    version: int
    seconds: deque[float] = field(default_factory=lambda: deque(maxlen=COST_WINDOW))


@dataclass
class _Pending:
    inputs: np.ndarray
    done: asyncio.Future[tuple[np.ndarray, int]]


@dataclass
class _Lane:
    """The queue of one key and its dispatcher."""

    queue: list[_Pending] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class Batcher:
    """Joins concurrent requests per key into forward passes run on ``executor``.

    Args:
        executor: where forward passes run (on the event loop only when known to be cheap, see above).
        max_batch_size: most rows in one pass; 1 turns batching off (every request runs alone, concurrently).
        max_batch_delay_ms: how long the first request of a pass waits for others (0 = no wait).
        on_batch: called with the rows and requests of every pass (metrics).
        inline_seconds: a pass expected to take at most this long runs on the event loop (0 = never).
    """

    def __init__(
        self,
        executor: Executor,
        *,
        max_batch_size: int,
        max_batch_delay_ms: float,
        on_batch: Callable[[int, int], None] | None = None,
        inline_seconds: float = INLINE_SECONDS,
    ) -> None:
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.delay = max_batch_delay_ms / 1000.0
        self.on_batch = on_batch
        self.inline_seconds = inline_seconds
        #: Set by the owner (PredictService) before the first request: the pass, and the version of
        #: the model the next pass would run (passes run inline only on a version already timed).
        self.forward: Forward | None = None
        self.version: Callable[[], int] | None = None
        self._lanes: dict[Hashable, _Lane] = {}
        self._costs: dict[Hashable, _Cost] = {}
        #: Requests per pass of each key's latest passes (kept when a lane empties).
        self._company: dict[Hashable, deque[int]] = {}

    async def submit(self, key: Hashable, inputs: np.ndarray) -> tuple[np.ndarray, int]:
        """Logits of ``inputs`` and the model version, from a pass shared with other requests of ``key``."""
        if self.max_batch_size <= 1:
            return await self._run(key, inputs, 1)
        loop = asyncio.get_running_loop()
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        pending = _Pending(inputs, loop.create_future())
        lane.queue.append(pending)
        lane.wake.set()
        if lane.task is None or lane.task.done():
            lane.task = loop.create_task(self._dispatch(key, lane), name=f"batcher-{key}")
        return await pending.done

    async def _run(self, key: Hashable, inputs: np.ndarray, requests: int) -> tuple[np.ndarray, int]:
        if self.on_batch is not None:
            self.on_batch(len(inputs), requests)
        if self._cheap(key, len(inputs)):
            return self._timed(key, inputs)
        loop = asyncio.get_running_loop()
        call = contextvars.copy_context().run
        return await loop.run_in_executor(self.executor, call, self._timed, key, inputs)

    def _cheap(self, key: Hashable, rows: int) -> bool:
        """Whether the last pass of ``key``, on the model that would run this one, says it is cheap."""
        cost = self._costs.get(key)
        if cost is None or self.version is None or cost.version != self.version():
            return False
        return min(cost.seconds) * rows <= self.inline_seconds

    def _timed(self, key: Hashable, inputs: np.ndarray) -> tuple[np.ndarray, int]:
        """One pass, its cost remembered for the next passes of ``key`` (a new model version starts afresh)."""
        assert self.forward is not None, "Batcher.forward is not set"
        started = time.perf_counter()
        logits, version = self.forward(key, inputs)
        cost = self._costs.get(key)
        if cost is None or cost.version != version:
            cost = self._costs[key] = _Cost(version)
        cost.seconds.append((time.perf_counter() - started) / max(1, len(inputs)))
        return logits, version

    async def _dispatch(self, key: Hashable, lane: _Lane) -> None:
        """Run passes while the lane has requests; end when it is empty (a new request restarts it)."""
        while lane.queue:
            company = self._company.setdefault(key, deque(maxlen=COMPANY_WINDOW))
            if self.delay > 0 and not self._gathered(lane, company):
                lane.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._gathering(lane, company), timeout=self.delay)
            batch = self._take(lane)
            if not batch:
                continue
            company.append(len(batch))
            try:
                logits, version = await self._run(
                    key, np.concatenate([p.inputs for p in batch]) if len(batch) > 1 else batch[0].inputs, len(batch)
                )
            except Exception as exc:  # every request of the pass gets the error (same key: same verdict)
                for pending in batch:
                    if not pending.done.done():
                        pending.done.set_exception(exc)
                continue
            start = 0
            for pending in batch:
                rows = len(pending.inputs)
                if not pending.done.done():
                    pending.done.set_result((logits[start : start + rows], version))
                start += rows
        if self._lanes.get(key) is lane:  # no await since the queue emptied: no request can be waiting
            del self._lanes[key]

    def _gathered(self, lane: _Lane, company: deque[int]) -> bool:
        """Whether a pass need wait no longer: it is full, or the usual company (see above) has arrived."""
        waiting = [p for p in lane.queue if not p.done.done()]
        usual = max(company, default=1)
        return sum(len(p.inputs) for p in waiting) >= self.max_batch_size or (usual > 1 and len(waiting) >= usual)

    async def _gathering(self, lane: _Lane, company: deque[int]) -> None:
        while not self._gathered(lane, company):
            await lane.wake.wait()
            lane.wake.clear()

    def _take(self, lane: _Lane) -> list[_Pending]:
        """The next pass: queued requests in order, up to ``max_batch_size`` rows (at least one request)."""
        batch: list[_Pending] = []
        rows = 0
        while lane.queue:
            pending = lane.queue[0]
            if pending.done.done():  # the client went away while it waited
                lane.queue.pop(0)
                continue
            if batch and rows + len(pending.inputs) > self.max_batch_size:
                break
            batch.append(lane.queue.pop(0))
            rows += len(pending.inputs)
        return batch


def intra_op_threads(count: int) -> None:
    """Run the calling thread's torch operations on ``count`` intra-op threads; leave every other thread as it was.

    ``torch.set_num_threads`` sets the calling thread's OpenMP and MKL thread counts and the count
    that threads started afterwards take; that last one is given back from a throwaway thread, so
    only this thread changes (the worker and later threads keep the configured count).
    """
    configured = torch.get_num_threads()
    if count == configured:
        return
    torch.set_num_threads(count)
    restore = threading.Thread(target=torch.set_num_threads, args=(configured,), name="lethe-torch-threads")
    restore.start()
    restore.join()
