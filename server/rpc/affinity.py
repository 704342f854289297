"""Keep gRPC's poller thread on the core where the event loop runs (Linux).

grpc.aio hands every completed operation from its poller thread (C-core's completion queue, read
without the GIL) to the event loop through a socket write, and the loop answers back through C-core.
When the kernel puts the two threads on different cores, each hand-off wakes the other core; on a
virtual machine an idle virtual CPU's wake-up costs more than a small Predict (measured on 2 cores: one
server's Predict between 28,000 and 64,000 rows/s from one run to the next, 59,000-71,000 with the two
threads on one core, 77,760 with this module; docs/benchmarks.md, the HA and Predict sections).

The event loop's thread stays unpinned, so the kernel still balances it against everything else and
the threads it starts (executor workers, spool writers) inherit no pinning. Only the poller, a thread
that starts no others, is pinned, to the core the loop last ran on, checked every
:data:`FOLLOW_SECONDS`: when the loop moves, the poller follows. No core is ever chosen up front, so
two servers on one host never collide on one.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

#: How often the poller is moved to the event loop's current core (seconds).
FOLLOW_SECONDS = 0.2
#: The name grpc.aio's poller thread gets from its target, ``PollerCompletionQueue._poll_wrapper``.
POLLER_NAME = "_poll_wrapper"


def _current_cpu() -> Callable[[], int] | None:
    """The C library's ``sched_getcpu`` (glibc, musl): the core the calling thread runs on; None where there is none."""
    try:
        getcpu = ctypes.CDLL(None).sched_getcpu  # the symbols the interpreter is linked with, the C library among them
    except (OSError, AttributeError):
        return None
    getcpu.restype = ctypes.c_int
    getcpu.argtypes = []
    return lambda: int(getcpu())


def poller_thread() -> threading.Thread | None:
    """grpc.aio's poller thread, once a server or channel has started it; None before (or on other engines)."""
    return next((t for t in threading.enumerate() if POLLER_NAME in t.name and t.is_alive()), None)


class PollerFollower:
    """Moves grpc.aio's poller thread to the event loop's core, on that loop, until :meth:`stop`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = FOLLOW_SECONDS) -> None:
        self.loop = loop
        self.interval = interval
        #: The core the poller was last kept on (None: not yet, or following is off).
        self.cpu: int | None = None
        self._getcpu = _current_cpu()
        self._handle: asyncio.TimerHandle | None = None
        self._stopped = False

    def start(self) -> None:
        """Begin following (call on the loop's thread). A no-op where the platform cannot say or set a core."""
        if self._getcpu is None or not hasattr(os, "sched_setaffinity"):
            log.info("the gRPC poller thread is not kept on the event loop's core: no sched_getcpu here")
            return
        self._follow()

    def stop(self) -> None:
        """Stop following (call on the loop's thread); the poller keeps its last core."""
        self._stopped = True
        if self._handle is not None:
            self._handle.cancel()

    def _follow(self) -> None:
        if self._stopped:
            return
        poller = poller_thread()
        cpu = self._getcpu() if self._getcpu is not None else -1
        if poller is not None and poller.native_id is not None and cpu >= 0:
            try:
                if os.sched_getaffinity(poller.native_id) != {cpu}:  # asked each time: others may change it too
                    os.sched_setaffinity(poller.native_id, {cpu})
                self.cpu = cpu
            except OSError as exc:  # e.g. a cpuset that does not allow it: leave the poller to the kernel
                log.warning("stopped keeping the gRPC poller thread on the event loop's core: %s", exc)
                self.cpu = None
                return
        self._handle = self.loop.call_later(self.interval, self._follow)
