"""Copy machinery: events as completion handles, and the pinned staging pool.

PyCUDA frees an event, a stream or a page-locked buffer by activating the context it was
made in, which it refuses to do from another thread unless that context is current there. So
the backend owns every such object for its whole life and releases them in ``close`` with
its context pushed; a handle only borrows its event, and hands it back when waited on or
dropped (re-recording an event that has not completed yet is legal in CUDA).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from vramcore.errors import AllocationFailed
from vramcore.validation import scrub_text

from ._api import DriverApi
from ._contexts import activated

__all__ = ["EventHandle", "EventPool", "PinnedPool"]

#: Idle page-locked memory kept for reuse between staging blocks, in bytes.
PINNED_KEEP_BYTES = 512 << 20


class EventHandle:
    """Completion of one asynchronous host-to-device copy (a recorded CUDA event).

    ``wait()`` returns once the copy no longer reads its host buffer, raises the copy's
    error as :class:`~vramcore.errors.AllocationFailed` (again on later calls), and may be
    called from any thread.
    """

    def __init__(self, pool: EventPool, event: Any, context: Any, device: int) -> None:
        self._pool = pool
        self._event = event
        self._context = context
        self._device = device
        self._lock = threading.Lock()
        self._done = False
        self._error: AllocationFailed | None = None
        self._finalizer = weakref.finalize(self, pool.give_back, event)

    def wait(self) -> None:
        """Block until the copy finished reading its host buffer."""
        with self._lock:
            if not self._done:
                self._done = True
                try:
                    self._synchronize()
                finally:
                    self._finalizer()  # the event goes back to the pool, exactly once
            if self._error is not None:
                raise self._error

    def _synchronize(self) -> None:
        drv = self._pool.api.driver
        if self._pool.closed:
            return  # close() synchronised every event before destroying it
        try:
            with activated(self._pool.api, self._context, self._device):
                self._event.synchronize()
        except drv.Error as exc:
            self._error = AllocationFailed(
                f"host-to-device copy on GPU {self._device} failed: "
                f"{type(exc).__name__}: {scrub_text(str(exc))[:200]}"
            )

    def __repr__(self) -> str:
        state = "done" if self._done else "pending"
        return f"<pycuda copy handle GPU{self._device} {state}>"


class EventPool:
    """The events of one device's context, recycled between copies."""

    def __init__(self, api: DriverApi) -> None:
        self.api = api
        self._lock = threading.Lock()
        self._idle: list[Any] = []
        self._all: list[Any] = []
        self.closed = False

    def record(self, stream: Any, context: Any, device: int) -> EventHandle:
        """Record an event on ``stream`` (context current) and wrap it in a handle."""
        drv = self.api.driver
        with self._lock:
            event = self._idle.pop() if self._idle else None
        if event is None:
            event = drv.Event(drv.event_flags.DISABLE_TIMING)
            with self._lock:
                self._all.append(event)
        try:
            event.record(stream)
        except BaseException:
            self.give_back(event)
            raise
        return EventHandle(self, event, context, device)

    def give_back(self, event: Any) -> None:
        """Return an event (from a waited or dropped handle) for reuse."""
        with self._lock:
            if not self.closed:
                self._idle.append(event)

    def close(self) -> None:
        """Wait for and destroy every event (the context must be current)."""
        with self._lock:
            self.closed = True
            events, self._all, self._idle = self._all, [], []
        for event in events:
            event.synchronize()
        events.clear()


class PinnedPool:
    """Page-locked, portable host buffers lent by ``staging`` and kept for reuse.

    ``holds(data)`` tells whether a view lies inside a buffer currently lent, which is when a
    copy may run asynchronously (DMA from pageable memory is not possible).
    """

    def __init__(self, api: DriverApi) -> None:
        self._api = api
        self._lock = threading.Lock()
        self._idle: dict[int, list[Any]] = {}
        self._idle_bytes = 0
        self._lent: dict[int, tuple[int, int]] = {}  # id(array) -> (start, stop) addresses

    @staticmethod
    def _address(view: memoryview) -> int:
        import numpy as np

        return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)

    def take(self, count: int, nbytes: int) -> list[tuple[Any, memoryview]]:
        """``count`` buffers of ``nbytes`` (context current), pinned ones reused first."""
        import numpy as np

        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise AllocationFailed("staging count must be a non-negative integer")
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            raise AllocationFailed("staging size must be a positive integer")
        drv = self._api.driver
        taken: list[tuple[Any, memoryview]] = []
        try:
            for _ in range(count):
                with self._lock:
                    pool = self._idle.get(nbytes)
                    array = pool.pop() if pool else None
                    if array is not None:
                        self._idle_bytes -= nbytes
                if array is None:
                    array = drv.pagelocked_empty(
                        nbytes, np.uint8, mem_flags=drv.host_alloc_flags.PORTABLE
                    )
                view = memoryview(array).cast("B")
                start = self._address(view)
                with self._lock:
                    self._lent[id(array)] = (start, start + nbytes)
                taken.append((array, view))
        except drv.Error as exc:
            self.give_back(taken)
            raise AllocationFailed(
                f"cannot allocate {nbytes} bytes of pinned host memory: "
                f"{scrub_text(str(exc))[:200]}"
            ) from None
        return taken

    def holds(self, data: memoryview) -> bool:
        """Whether ``data`` lies wholly inside a buffer that is lent right now."""
        with self._lock:
            if not self._lent:
                return False
            ranges = list(self._lent.values())
        start = self._address(data)
        stop = start + data.nbytes
        return any(lo <= start and stop <= hi for lo, hi in ranges)

    def give_back(self, lent: list[tuple[Any, memoryview]]) -> None:
        """End a loan (context current): keep buffers for reuse up to a limit, free the rest."""
        excess = []
        with self._lock:
            for array, _ in lent:
                self._lent.pop(id(array), None)
                if self._idle_bytes + array.nbytes <= PINNED_KEEP_BYTES:
                    self._idle.setdefault(array.nbytes, []).append(array)
                    self._idle_bytes += array.nbytes
                else:
                    excess.append(array)
        for array in excess:
            array.base.free()

    def close(self) -> None:
        """Free every idle pinned buffer (context current)."""
        with self._lock:
            idle = [a for arrays in self._idle.values() for a in arrays]
            self._idle, self._idle_bytes = {}, 0
        for array in idle:
            array.base.free()
