"""Which shards a manager holds, who is using them, and how many bytes they take.

A :class:`Residency` is the manager's one piece of shared mutable state, behind one lock:

* a shard id is *reserved* while its seal runs, so two seals cannot claim the same id;
* a sealed shard is *resident* until it is taken for deallocation;
* threads inside ``verified()`` blocks are *readers* of a resident; taking a shard waits until
  its readers have left, so a buffer is never freed under a running inference;
* every seal and verification in progress holds an *operation lease*
  (:meth:`Residency.operation`); closing refuses new leases and waits, bounded, for the held
  ones, so the backend is never closed under a running copy, digest or free;
* once :meth:`Residency.take_all` ran (the manager is closing), nothing new becomes resident.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import attrs

from vramcore.backend import DeviceBuffer
from vramcore.digest import ShardDigest
from vramcore.errors import InvalidInput, ManagerClosed, NotSealed
from vramcore.shard import SealedShard

_CLOSED = "this VramManager is closed; create a new one"

__all__ = ["Residency", "Resident"]


@attrs.define(eq=False)
class Resident:
    """A shard held in VRAM: its seal, its buffer and its digest (packed leaves for reports).

    :attr leaves_checked: the packed leaves were checked to give the sealed root (sampled
        checks compare against them, so they must be trusted first).
    :attr quarantined: why the shard may not be used until it is resealed (a scrubber found
        it corrupted), or ``""``.
    """

    shard: SealedShard
    buffer: DeviceBuffer
    digest: ShardDigest
    readers: dict[int, int] = attrs.Factory(dict)  # thread id -> open verified() blocks
    leaves_checked: bool = False
    quarantined: str = ""


class Residency:
    """The resident shards of one manager (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._released = threading.Condition(self._lock)
        self._residents: dict[str, Resident] = {}
        self._reserved: set[str] = set()
        self._used = 0
        self._closing = False
        self._in_flight = 0
        self._aborting = False

    @property
    def closing(self) -> bool:
        """Whether close began: operations in progress should stop at their next step."""
        return self._closing

    def check_running(self) -> None:
        """Raise :class:`ManagerClosed` when close gave up waiting (a step boundary check)."""
        if self._aborting:
            raise ManagerClosed("the VramManager was closed while this operation ran")

    @contextlib.contextmanager
    def operation(self) -> Iterator[None]:
        """Hold an operation lease for the block; refused once the manager is closing.

        :raises ManagerClosed: the manager is closed or closing.
        """
        with self._lock:
            if self._closing:
                raise ManagerClosed(_CLOSED)
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                self._released.notify_all()

    def wait_idle(self, timeout: float) -> int:
        """After :meth:`take_all`: wait up to ``timeout`` s for held leases; return those left.

        Operations still running after that are told to stop at their next step
        (:meth:`check_running` raises there) and get a short grace period.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._in_flight and self._released.wait(max(0.0, deadline - time.monotonic())):
                pass
            if self._in_flight:
                self._aborting = True
                grace = time.monotonic() + min(5.0, max(0.1, timeout))
                while self._in_flight and self._released.wait(max(0.0, grace - time.monotonic())):
                    pass
            return self._in_flight

    @property
    def used(self) -> int:
        """Bytes allocated for resident shards and seals in progress."""
        with self._lock:
            return self._used

    def add_bytes(self, nbytes: int) -> None:
        """Account ``nbytes`` allocated (negative: freed)."""
        with self._lock:
            self._used += nbytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._residents)

    def reserve(self, shard_id: str) -> None:
        """Claim ``shard_id`` for a seal in progress.

        :raises InvalidInput: the id is resident or being sealed.
        :raises ManagerClosed: the manager is closing.
        """
        with self._lock:
            if self._closing:
                raise ManagerClosed(_CLOSED)
            if shard_id in self._residents or shard_id in self._reserved:
                raise InvalidInput(
                    f"shard_id {shard_id} is already sealed on this manager; deallocate it first "
                    "or choose another id"
                )
            self._reserved.add(shard_id)

    def cancel(self, shard_id: str) -> None:
        """Give up a reservation (the seal failed)."""
        with self._lock:
            self._reserved.discard(shard_id)

    def commit(self, resident: Resident) -> bool:
        """Make a reserved shard resident; ``False`` (and nothing kept) when closing."""
        with self._lock:
            self._reserved.discard(resident.shard.shard_id)
            if self._closing:
                return False
            self._residents[resident.shard.shard_id] = resident
            return True

    def get(self, shard_id: str) -> Resident | None:
        """The resident shard with this id, if any."""
        with self._lock:
            return self._residents.get(shard_id)

    def seals(self) -> list[SealedShard]:
        """The seals of every resident shard."""
        with self._lock:
            return [r.shard for r in self._residents.values()]

    @contextlib.contextmanager
    def reading(self, shard_id: str) -> Iterator[Resident | None]:
        """Hold the resident (if any) as the current thread's for the block."""
        me = threading.get_ident()
        with self._lock:
            resident = self._residents.get(shard_id)
            if resident is not None:
                resident.readers[me] = resident.readers.get(me, 0) + 1
        try:
            yield resident
        finally:
            if resident is not None:
                with self._lock:
                    count = resident.readers.pop(me) - 1
                    if count:
                        resident.readers[me] = count
                    self._released.notify_all()

    def take(self, shard_id: str) -> Resident:
        """Remove a shard, waiting until no other thread reads it.

        :raises NotSealed: it is not resident.
        :raises InvalidInput: the current thread is reading it (would wait for itself).
        """
        me = threading.get_ident()
        with self._lock:
            resident = self._residents.get(shard_id)
            if resident is None:
                raise NotSealed(f"shard {shard_id} is not resident on this manager")
            if me in resident.readers:
                raise InvalidInput(
                    f"cannot deallocate shard {shard_id} inside its own verified() block"
                )
            del self._residents[shard_id]
            while resident.readers:
                self._released.wait()
        return resident

    def take_all(self) -> list[Resident] | None:
        """Close: remove every shard once no thread reads it; ``None`` if already closing.

        New operation leases are refused from here on; :meth:`wait_idle` waits for held ones.

        :raises InvalidInput: the current thread is inside a ``verified()`` block.
        """
        me = threading.get_ident()
        with self._lock:
            if self._closing:
                return None
            residents = list(self._residents.values())
            if any(me in r.readers for r in residents):
                raise InvalidInput("cannot close the manager inside one of its verified() blocks")
            self._closing = True
            self._residents.clear()
            while any(r.readers for r in residents):
                self._released.wait()
        return residents
