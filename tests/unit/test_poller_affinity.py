"""gRPC's poller thread follows the event loop's core; nothing else is pinned (Linux, at least 2 cores)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from grpc import aio

from server.rpc.affinity import PollerFollower, poller_thread
from tests.support import deployed_server

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs Linux and 2 cores"
)


def _pinned_threads(pid: int) -> list[int]:
    """The threads of ``pid`` allowed on one core only."""
    return [int(tid) for tid in os.listdir(f"/proc/{pid}/task") if len(os.sched_getaffinity(int(tid))) == 1]


def test_the_poller_is_moved_to_the_loops_core_and_follows_it() -> None:
    allowed = os.sched_getaffinity(0)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-loop", daemon=True)
    thread.start()
    follower = PollerFollower(loop, interval=0.01)
    try:
        server = asyncio.run_coroutine_threadsafe(_server(), loop).result(30)  # starts grpc.aio's poller
        poller = poller_thread()
        assert poller is not None and poller.native_id is not None
        loop.call_soon_threadsafe(follower.start)
        native_id = poller.native_id
        for cpu in sorted(allowed)[:2]:  # move the loop: the poller must follow
            loop.call_soon_threadsafe(os.sched_setaffinity, 0, {cpu})

            def followed(cpu: int = cpu) -> bool:
                return follower.cpu == cpu and os.sched_getaffinity(native_id) == {cpu}

            _until(followed)
        loop.call_soon_threadsafe(os.sched_setaffinity, 0, allowed)  # the loop free again, as in a server
        time.sleep(20 * follower.interval)  # many rounds of following
        loop_mask, started_mask = asyncio.run_coroutine_threadsafe(_masks(), loop).result(10)
        assert loop_mask == allowed  # the follower never pins the loop ...
        assert started_mask == allowed  # ... so a thread the loop starts inherits no pinning
        assert follower.cpu in allowed and os.sched_getaffinity(native_id) == {follower.cpu}  # still following
        loop.call_soon_threadsafe(follower.stop)
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        poller = poller_thread()
        if poller is not None and poller.native_id is not None:
            os.sched_setaffinity(poller.native_id, allowed)  # leave this test process as it was


async def _server() -> aio.Server:
    server = aio.server()
    server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server


async def _masks() -> tuple[set[int], set[int]]:
    """The event loop thread's CPU mask, and that of a thread it starts."""
    masks: list[set[int]] = []
    started = threading.Thread(target=lambda: masks.append(os.sched_getaffinity(0)))
    started.start()
    started.join()
    return os.sched_getaffinity(0), masks[0]


def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the poller did not follow the event loop"
        time.sleep(0.01)


def test_a_deployed_server_pins_exactly_one_thread(tmp_path: Path) -> None:
    with deployed_server(tmp_path / "server") as server:
        server.client.tasks()  # a call through the poller
        # the poller; the worker, the executor's threads and the event loop stay free
        _until(lambda: len(_pinned_threads(server.process.pid)) == 1)
