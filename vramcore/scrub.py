"""Background scrubbing: every sealed shard re-verified continuously, within a byte budget.

Verification before each inference catches a change when the shard is next used; a scrubber
catches it while nobody uses the shard (a bit flip in a rarely used expert, a co-tenant
writing into an idle shard), and bounds how long corruption can sit unseen: one full pass
over every resident shard takes ``resident bytes / bytes_per_second`` seconds.

Start one with :meth:`vramcore.VramManager.scrub`. It walks the resident shards a leaf range at
a time, re-hashing from VRAM and comparing with the sealed leaf hashes (checked against the
signed root first), and never reads faster than its budget. A mismatch quarantines the shard
(``verified()`` refuses it with reason ``"quarantined"`` until it is deallocated and sealed
again) and is audited as a failed verification. It stops with the manager.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Protocol

import attrs

from vramcore.errors import InvalidInput, ManagerClosed
from vramcore.shard import SealedShard

__all__ = ["ScrubStats", "Scrubbable", "Scrubber", "ScrubberSlot"]

log = logging.getLogger("vramcore.scrub")


@attrs.frozen
class ScrubStats:
    """What a scrubber has done so far.

    :attr passes: full passes over every resident shard completed.
    :attr bytes_scrubbed: bytes re-hashed from VRAM.
    :attr last_pass_seconds: how long the last full pass took (``None`` before the first).
    :attr corrupted: ids of the shards it found corrupted (and quarantined).
    :attr running: whether its thread still runs.
    """

    passes: int
    bytes_scrubbed: int
    last_pass_seconds: float | None
    corrupted: tuple[str, ...]
    running: bool


class Scrubbable(Protocol):
    """What a scrubber walks: the resident shards of one manager."""

    leaf_size: int

    def shards(self) -> Sequence[SealedShard]:
        """The seals of the resident shards."""
        ...

    def scrub_slice(self, shard_id: str, first: int, stop: int) -> bool | None:
        """Re-verify leaves ``first`` to ``stop - 1``; ``None`` when the shard is gone."""
        ...


class Scrubber:
    """A daemon thread re-verifying a manager's shards (see the module docstring).

    :param manager: the shards it scrubs (what :meth:`vramcore.VramManager.scrub` hands it).
    :param bytes_per_second: the read budget (at least one leaf per second).
    :param slice_seconds: the budget one step spends; each step re-hashes
        ``bytes_per_second * slice_seconds`` bytes (whole leaves, at least one).
    """

    def __init__(
        self, manager: Scrubbable, bytes_per_second: int, *, slice_seconds: float = 0.1
    ) -> None:
        if (
            isinstance(bytes_per_second, bool)
            or not isinstance(bytes_per_second, int)
            or bytes_per_second < manager.leaf_size
        ):
            raise InvalidInput(
                f"bytes_per_second must be an integer of at least one leaf ({manager.leaf_size})"
                f", got {bytes_per_second!r:.40}"
            )
        if isinstance(slice_seconds, bool) or not (
            isinstance(slice_seconds, int | float) and 0.001 <= slice_seconds <= 60
        ):
            raise InvalidInput("slice_seconds must be a number from 0.001 to 60")
        self._manager = manager
        self.bytes_per_second = bytes_per_second
        self._leaves_per_step = max(1, int(bytes_per_second * slice_seconds) // manager.leaf_size)
        self._stop = threading.Event()
        self._lock = threading.Condition()
        self._passes = 0
        self._bytes = 0
        self._last_pass: float | None = None
        self._corrupted: list[str] = []
        self._thread = threading.Thread(target=self._run, name="vramcore-scrub", daemon=True)

    def start(self) -> None:
        """Start the thread (the manager does this)."""
        self._thread.start()

    @property
    def running(self) -> bool:
        """Whether the thread runs."""
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop and wait up to ``timeout`` seconds for the current step to finish."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def stats(self) -> ScrubStats:
        """A snapshot of the counters."""
        with self._lock:
            return ScrubStats(
                self._passes, self._bytes, self._last_pass, tuple(self._corrupted), self.running
            )

    def wait_for_passes(self, passes: int, timeout: float) -> bool:
        """Block until ``passes`` full passes completed (``False`` on timeout or stop)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._passes < passes and self.running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.05))
            return self._passes >= passes

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                shards = self._manager.shards()
                if not shards:
                    self._stop.wait(0.05)
                    continue
                started = time.monotonic()
                for shard in shards:
                    if not self._scrub_shard(shard.shard_id, shard.vram_bytes):
                        return
                with self._lock:
                    self._passes += 1
                    self._last_pass = time.monotonic() - started
                    self._lock.notify_all()
        except ManagerClosed:
            return
        except Exception as exc:  # a scrubber must never take the worker down
            log.error("scrubber stopped: %s: %s", type(exc).__name__, exc)
        finally:
            with self._lock:
                self._lock.notify_all()

    def _scrub_shard(self, shard_id: str, nbytes: int) -> bool:
        """Scrub one shard step by step; ``False`` when the scrubber must stop."""
        leaf = self._manager.leaf_size
        leaves = max(1, -(-nbytes // leaf))
        for first in range(0, leaves, self._leaves_per_step):
            if self._stop.is_set():
                return False
            stop = min(leaves, first + self._leaves_per_step)
            began = time.monotonic()
            try:
                ok = self._manager.scrub_slice(shard_id, first, stop)
            except ManagerClosed:
                return False
            except Exception as exc:  # audited by the manager; the other shards go on
                log.error("scrub of shard %s failed: %s: %s", shard_id, type(exc).__name__, exc)
                ok = None
            if ok is None:  # gone (deallocated) or unreadable: move on
                return True
            step_bytes = min(nbytes, stop * leaf) - first * leaf
            with self._lock:
                self._bytes += step_bytes
                if not ok and shard_id not in self._corrupted:
                    self._corrupted.append(shard_id)
            if not ok:
                return True
            # Stay within the budget: this step may take no less than its share of time.
            self._stop.wait(max(0.0, began + step_bytes / self.bytes_per_second - time.monotonic()))
        return True


class ScrubberSlot:
    """Where a manager keeps its one scrubber: at most one runs at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scrubber: Scrubber | None = None

    def start(self, scrubber: Scrubber) -> Scrubber:
        """Start ``scrubber`` in the slot and return it.

        :raises InvalidInput: a scrubber already runs here.
        """
        with self._lock:
            if self._scrubber is not None and self._scrubber.running:
                raise InvalidInput("a scrubber already runs on this manager; stop it first")
            self._scrubber = scrubber
        scrubber.start()
        return scrubber

    def stop(self) -> None:
        """Stop the scrubber in the slot, if any, and empty it."""
        with self._lock:
            scrubber, self._scrubber = self._scrubber, None
        if scrubber is not None:
            scrubber.stop()
