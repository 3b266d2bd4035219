"""Asynchronous copies: one in-order "stream" completed by a worker thread, like a CUDA stream.

A copy reads its host buffer only when it completes, never in ``copy_in``: a caller that
reuses the buffer before waiting on the handle gets the new bytes in device memory, as it
would with ``cudaMemcpyAsync`` from pinned memory. A copy completes, in issue order, when

* its handle's :meth:`MockCopyHandle.wait` is called (earlier copies complete first),
* the backend synchronises (a read, a free, a digest, ``close``), or
* the worker thread gets to it, ``delay`` seconds after it was issued.

The worker thread exists only while copies are pending.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

from vramcore.errors import AllocationFailed, VramError

#: ``(error class, message)``: a fresh exception is raised on every ``wait()``.
Failure = tuple[type[VramError], str]


class PendingCopy:
    """One queued copy of ``data`` into ``target[offset:]``."""

    __slots__ = ("data", "deadline", "done", "failure", "offset", "target")

    def __init__(self, target: bytearray, offset: int, data: memoryview, deadline: float) -> None:
        self.target = target
        self.offset = offset
        # Our own view pins the caller's buffer (it cannot be resized under a pending copy).
        self.data: memoryview | None = memoryview(data)
        self.deadline = deadline
        self.done = False
        self.failure: Failure | None = None


class MockCopyHandle:
    """Completion handle of a mock copy (a :class:`vramcore.backend.CopyHandle`).

    ``wait()`` completes the copy (and every copy issued before it) if the worker has not
    yet, then raises the copy's error, if any, on every call.
    """

    __slots__ = ("_item", "_stream")

    def __init__(self, stream: CopyStream | None, item: PendingCopy) -> None:
        self._stream = stream
        self._item = item

    @property
    def done(self) -> bool:
        """Whether the copy has completed (successfully or not)."""
        return self._item.done

    def wait(self) -> None:
        """Block until the copy no longer reads its host buffer; raise its error if it failed."""
        if self._stream is not None:
            self._stream.complete_through(self._item)
        if self._item.failure is not None:
            cls, message = self._item.failure
            raise cls(message)

    def __repr__(self) -> str:
        state = "done" if self._item.done else "pending"
        return f"<MockCopyHandle {state}>"


def finished_handle(failure: Failure | None = None) -> MockCopyHandle:
    """A handle for a copy that already finished (or failed, with ``failure``)."""
    item = PendingCopy(bytearray(), 0, memoryview(b""), 0.0)
    item.done, item.data, item.failure = True, None, failure
    return MockCopyHandle(None, item)


class CopyStream:
    """The in-order queue of pending copies and the worker thread that completes them.

    :param delay: seconds after which the worker completes a copy nobody waited for.
    :param on_failure: called (under the stream's lock) with the message of a copy that
        failed when it completed; the backend uses it to poison itself (sticky errors).
    """

    def __init__(self, delay: float, on_failure: Callable[[str], None]) -> None:
        self._delay = delay
        self._on_failure = on_failure
        self._cond = threading.Condition()
        self._queue: collections.deque[PendingCopy] = collections.deque()
        self._worker: threading.Thread | None = None

    def submit(
        self, target: bytearray, offset: int, data: memoryview, fail: str | None = None
    ) -> MockCopyHandle:
        """Queue a copy; it reads ``data`` only when it completes. With ``fail``, it fails
        then instead (nothing lands) and its handle raises :class:`AllocationFailed`."""
        item = PendingCopy(target, offset, data, time.monotonic() + self._delay)
        if fail is not None:
            item.failure = (AllocationFailed, f"mock copy failed: {fail}")
        with self._cond:
            self._queue.append(item)
            if self._worker is None:
                self._worker = threading.Thread(
                    target=self._run, name="vramcore-mock-copy", daemon=True
                )
                self._worker.start()
            self._cond.notify_all()
        return MockCopyHandle(self, item)

    @property
    def pending(self) -> int:
        """Copies issued and not completed yet."""
        with self._cond:
            return len(self._queue)

    def complete_through(self, item: PendingCopy) -> None:
        """Complete every copy up to and including ``item``, in issue order."""
        with self._cond:
            while not item.done and self._queue:
                self._perform(self._queue.popleft())
            self._cond.notify_all()  # the worker re-reads the queue (and leaves when empty)

    def drain(self) -> None:
        """Complete every pending copy (a device synchronisation)."""
        with self._cond:
            while self._queue:
                self._perform(self._queue.popleft())
            self._cond.notify_all()

    def cancel(self, failure: Failure) -> None:
        """Drop every pending copy unperformed; their handles raise ``failure``."""
        with self._cond:
            for item in self._queue:
                item.done, item.data, item.failure = True, None, failure
            self._queue.clear()
            self._cond.notify_all()

    def _perform(self, item: PendingCopy) -> None:
        # Called with the lock held, so copies land strictly in issue order.
        data, item.data = item.data, None
        if item.failure is None and data is not None:
            with data:
                item.target[item.offset : item.offset + data.nbytes] = data
        item.done = True
        if item.failure is not None:
            self._on_failure(item.failure[1])

    def _run(self) -> None:
        with self._cond:
            while self._queue:
                wait = self._queue[0].deadline - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                self._perform(self._queue.popleft())
            self._worker = None
