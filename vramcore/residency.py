"""Which shards a manager holds, who is using them, and how many bytes they take.

A :class:`Residency` is the manager's one piece of shared mutable state, behind one lock:

* a shard id is *reserved* while its seal runs, so two seals cannot claim the same id;
* a sealed shard is *resident* until it is taken for deallocation;
* threads inside ``verified()`` blocks are *readers* of a resident; taking a shard waits until
  its readers have left, so a buffer is never freed under a running inference;
* once :meth:`Residency.take_all` ran (the manager is closing), nothing new becomes resident.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import attrs

from vramcore.backend import DeviceBuffer
from vramcore.errors import InvalidInput, NotSealed, VramError
from vramcore.shard import SealedShard

__all__ = ["Residency", "Resident"]


@attrs.define(eq=False)
class Resident:
    """A shard held in VRAM: its seal, its buffer and its leaf hashes (for range reports)."""

    shard: SealedShard
    buffer: DeviceBuffer
    leaves: list[bytes]
    readers: dict[int, int] = attrs.Factory(dict)  # thread id -> open verified() blocks


class Residency:
    """The resident shards of one manager (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._released = threading.Condition(self._lock)
        self._residents: dict[str, Resident] = {}
        self._reserved: set[str] = set()
        self._used = 0
        self._closing = False

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
        :raises VramError: the manager is closing.
        """
        with self._lock:
            if self._closing:
                raise VramError("this VramManager is closed; create a new one")
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
