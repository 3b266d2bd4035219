"""``MockBackend``: host memory standing in for VRAM, kind by default, faithful on request."""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from vramcore.backend import (
    AllocatorBackend,
    DeviceBuffer,
    DeviceDigest,
    DeviceInfo,
    MemoryKind,
)
from vramcore.digest import hash_leaves, leaf_count, merkle_root
from vramcore.errors import (
    AllocationFailed,
    ConfigError,
    InsufficientVram,
    InvalidInput,
    VramError,
)
from vramcore_allocator_mock._config import FAITHFUL, FAULT_OPS, options_from_env
from vramcore_allocator_mock._copies import CopyStream, MockCopyHandle, finished_handle
from vramcore_allocator_mock._tensors import MockTensorSource

#: Copies from this size on run without the GIL (:func:`_copy_bytes`).
_GIL_FREE_COPY = 1 << 16
_GARBAGE_BLOCK = 4096


class BackendClosed(VramError):
    """A call reached a mock backend built with ``strict_close=True`` after its ``close()``.

    Fatal: a closed backend never works again (on CUDA, its context is destroyed).
    """


class DevicePoisoned(VramError):
    """The mock device hit a sticky error: every call fails until :meth:`MockBackend.reset`.

    Fatal for the work in flight, like a CUDA sticky error (an illegal address, an ECC
    failure): the context is unusable and every allocation on it is lost.
    """


class MockDeviceArray:
    """What ``DeviceBuffer.native`` is with ``opaque_native=True``: no host access at all.

    Real device memory cannot be read as a host buffer; with this native object, a test that
    tries (``bytes(buffer.native)``) fails instead of passing on the mock only.
    """

    __slots__ = ("device", "nbytes")

    def __init__(self, device: int, nbytes: int) -> None:
        self.device = device
        self.nbytes = nbytes

    def __repr__(self) -> str:
        return f"<MockDeviceArray GPU{self.device} {self.nbytes} bytes>"


class _Allocation:
    __slots__ = ("kind", "mem", "view")

    def __init__(self, mem: bytearray, kind: MemoryKind) -> None:
        self.mem = mem
        self.view = memoryview(mem)
        self.kind = kind


def _copy_bytes(dst: bytearray, offset: int, data: memoryview) -> None:
    """``dst[offset:offset + len(data)] = data``, without holding the GIL for large copies.

    A device copy engine runs beside the host's threads; ``ctypes.memmove`` releases the GIL
    as a DMA would, so the seal's hashing threads keep running while the mock copies.
    """
    n = data.nbytes
    if n < _GIL_FREE_COPY or data.readonly:
        dst[offset : offset + n] = data
        return
    target = (ctypes.c_char * n).from_buffer(dst, offset)
    source = (ctypes.c_char * n).from_buffer(data)
    ctypes.memmove(target, source, n)


def _garbage(nbytes: int) -> bytearray:
    """``nbytes`` of junk, as fresh device memory holds: one random block repeated (cheap)."""
    block = bytearray(os.urandom(_GARBAGE_BLOCK))
    mem = block * (nbytes // _GARBAGE_BLOCK + 1)
    del mem[nbytes:]
    return mem


class MockBackend(AllocatorBackend):
    """Host-memory backend for tests and demos.

    By default it is kind: zero-filled memory, synchronous copies, calls after ``close()``
    still work, nothing fails unless a test asks. The options make it behave like a GPU:

    :param devices: number of devices.
    :param capacity: bytes per device.
    :param name: backend name reported in events.
    :param cache_bytes: host memory of freed allocations kept for reuse, like a CUDA caching
        allocator (first-touching fresh host pages costs more than the copies on many VMs).
        A reused allocation keeps its old bytes, as device memory does.
    :param async_copies: ``copy_in`` queues the copy and returns a :class:`MockCopyHandle`;
        the copy reads the host buffer only when it completes (see ``_copies``).
    :param copy_delay: seconds after which a queued copy completes by itself.
    :param uninitialised: fresh allocations hold garbage, not zeros.
    :param strict_close: every call after ``close()`` raises :class:`BackendClosed`.
    :param sticky_errors: an injected failure poisons the device: every later call raises
        :class:`DevicePoisoned` until :meth:`reset`.
    :param device_digest: the plugin's ``vramcore_device_digest`` answers for this backend
        (computed from the mock's memory with :mod:`vramcore.digest`).
    :param opaque_native: ``DeviceBuffer.native`` is a :class:`MockDeviceArray`, which no
        code can read as host memory.
    :param fail_at: ``{op: n}``: the ``n``-th call of ``op`` (one of ``allocate``, ``copy``,
        ``wait``, ``read``, ``free``, ``digest``) fails once.
    """

    name = "mock"
    host_memory = True

    def __init__(
        self,
        devices: int = 1,
        capacity: int = 24 << 30,
        *,
        name: str = "mock",
        cache_bytes: int = 512 << 20,
        async_copies: bool = False,
        copy_delay: float = 0.005,
        uninitialised: bool = False,
        strict_close: bool = False,
        sticky_errors: bool = False,
        device_digest: bool = False,
        opaque_native: bool = False,
        fail_at: Mapping[str, int] | None = None,
    ) -> None:
        if devices < 1 or capacity < 1:
            raise ConfigError("the mock needs at least one device of at least one byte")
        if not 0 <= copy_delay <= 60:
            raise ConfigError("copy_delay must be between 0 and 60 seconds")
        unknown = set(fail_at or ()) - set(FAULT_OPS)
        if unknown:
            raise ConfigError(f"fail_at: unknown operation(s) {sorted(unknown)}; use {FAULT_OPS}")
        self.name = name
        self.async_copies = async_copies
        self.uninitialised = uninitialised
        self.strict_close = strict_close
        self.sticky_errors = sticky_errors
        self.device_digest = device_digest
        self.opaque_native = opaque_native
        self._lock = threading.Lock()
        self._capacity = capacity
        self._used = [0] * devices
        # Keyed by id(buffer); the buffer is kept alive with it so its id cannot be reused.
        self._live: dict[int, tuple[DeviceBuffer, _Allocation]] = {}
        self._flags: list[dict[str, bool]] = [{} for _ in range(devices)]
        self._faults: dict[str, list[str]] = {op: [] for op in FAULT_OPS}
        self._fail_at = dict(fail_at or {})
        self._calls = dict.fromkeys(FAULT_OPS, 0)
        self._poison: str | None = None
        self._next_kind = MemoryKind.DEVICE
        self._stream = CopyStream(copy_delay, self._copy_failed)
        self.allocations = 0  #: allocations made so far (tests read it)
        self.closed = False
        self._cache: dict[int, list[bytearray]] = {}
        self._cache_limit = cache_bytes
        self._cached = 0
        self._staging: list[bytearray] = []

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> MockBackend:
        """Build from the ``VRAMCORE_MOCK_*`` variables (see the package docstring)."""
        return cls(**options_from_env(os.environ if env is None else env))

    @classmethod
    def faithful(cls, devices: int = 1, capacity: int = 24 << 30, **options: Any) -> MockBackend:
        """A mock as unforgiving as a GPU: asynchronous copies, garbage in fresh memory,
        strict close and an opaque ``native``; ``options`` override any of them."""
        return cls(devices, capacity, **(dict.fromkeys(FAITHFUL, True) | options))

    # -- fault injection -------------------------------------------------------------

    def flip_bit(self, buf: DeviceBuffer, offset: int, bit: int = 0) -> None:
        """Flip bit ``bit`` (0-7) of the byte at ``offset`` in a live allocation."""
        alloc = self._get(buf)
        if not 0 <= offset < buf.nbytes or not 0 <= bit < 8:
            raise InvalidInput(f"offset {offset} / bit {bit} outside the {buf.nbytes}-byte buffer")
        self._stream.drain()  # after the copies already issued, as a later kernel would
        alloc.mem[offset] ^= 1 << bit

    def fail_next(self, op: str, reason: str | None = None) -> None:
        """Make the next ``op`` (``allocate``, ``copy``, ``wait``, ``read``, ``free``,
        ``digest``) fail once with :class:`AllocationFailed` (queued: call it twice to fail
        twice)."""
        if op not in FAULT_OPS:
            raise InvalidInput(f"unknown mock operation {op!r}; choose one of {FAULT_OPS}")
        with self._lock:
            self._faults[op].append(reason or f"injected {op} failure")

    def fail_next_allocation(self, reason: str = "injected allocation failure") -> None:
        """Make the next :meth:`allocate` raise :class:`AllocationFailed`."""
        self.fail_next("allocate", reason)

    def fail_next_copy(self, reason: str = "injected copy failure") -> None:
        """Make the next :meth:`copy_in` raise :class:`AllocationFailed` (nothing is copied)."""
        self.fail_next("copy", reason)

    def fail_next_wait(self, reason: str = "injected copy failure") -> None:
        """Make the next :meth:`copy_in` return a handle whose ``wait()`` raises
        :class:`AllocationFailed` (nothing is copied), in both copy modes."""
        self.fail_next("wait", reason)

    def fail_next_read(self, reason: str = "injected read failure") -> None:
        """Make the next :meth:`read_into` raise :class:`AllocationFailed` (``out`` untouched)."""
        self.fail_next("read", reason)

    def fail_next_free(self, reason: str = "injected free failure") -> None:
        """Make the next :meth:`free` raise :class:`AllocationFailed`; the buffer stays
        allocated and a second ``free`` releases it."""
        self.fail_next("free", reason)

    def fail_next_digest(self, reason: str = "injected digest failure") -> None:
        """Make the next device digest (``device_digest=True``) raise :class:`AllocationFailed`."""
        self.fail_next("digest", reason)

    def poison(self, reason: str = "injected sticky error") -> None:
        """Poison the device now: every call raises :class:`DevicePoisoned` until :meth:`reset`."""
        with self._lock:
            self._poison = self._poison or reason

    @property
    def poisoned(self) -> bool:
        """Whether a sticky error is pending (see :meth:`reset`)."""
        return self._poison is not None

    def reset(self) -> None:
        """Recover from a sticky error, as ``cudaDeviceReset`` does: pending copies are
        dropped (their handles raise), every allocation is lost (its buffer counts as freed)
        and pending injected failures are forgotten."""
        if self.strict_close and self.closed:
            raise BackendClosed("mock backend is closed; reset() cannot reopen it")
        self._stream.cancel((DevicePoisoned, "mock device was reset before the copy completed"))
        with self._lock:
            for buf, _alloc in self._live.values():
                buf.freed = True
            self._live.clear()
            self._used = [0] * len(self._used)
            self._faults = {op: [] for op in FAULT_OPS}
            self._poison = None

    def set_device_flags(self, device: int, **flags: bool) -> None:
        """Override policy flags of a device (``integrated``, ``pageable_memory_access``,
        ``host_page_tables``, ``managed_memory``, ``ecc_enabled``)."""
        allowed = {
            "integrated",
            "pageable_memory_access",
            "host_page_tables",
            "managed_memory",
            "ecc_enabled",
        }
        if not set(flags) <= allowed:
            raise InvalidInput(f"unknown device flag(s): {sorted(set(flags) - allowed)}")
        self._flags[device].update(flags)

    def hand_out(self, kind: MemoryKind) -> None:
        """Report later allocations as ``kind`` memory (e.g. ``MANAGED``)."""
        self._next_kind = kind

    @property
    def pending_copies(self) -> int:
        """Asynchronous copies issued and not completed yet."""
        return self._stream.pending

    def _check_usable(self) -> None:
        if self.strict_close and self.closed:
            raise BackendClosed(
                "mock backend is closed (strict_close): no call is allowed after close()"
            )
        reason = self._poison
        if reason is not None:
            raise DevicePoisoned(f"mock device poisoned by a sticky error ({reason}); reset() it")

    def _injected(self, op: str) -> str | None:
        """Consume a failure scheduled for this call of ``op``, if any (lock held)."""
        self._calls[op] += 1
        if self._faults[op]:
            return self._faults[op].pop(0)
        if self._fail_at.get(op) == self._calls[op]:
            return f"{op} #{self._calls[op]} failed (fail_at)"
        return None

    def _fail(self, op: str) -> None:
        """Raise the failure scheduled for this call of ``op``, if any."""
        with self._lock:
            reason = self._injected(op)
            if reason is not None and self.sticky_errors:
                self._poison = self._poison or reason
        if reason is None:
            return
        if self.sticky_errors:
            raise DevicePoisoned(f"mock {op} failed with a sticky error ({reason}); reset() it")
        raise AllocationFailed(f"mock {op} failed: {reason}")

    def _copy_failed(self, message: str) -> None:
        if self.sticky_errors:
            self.poison(message)

    # -- AllocatorBackend --------------------------------------------------------------

    def devices(self) -> Sequence[DeviceInfo]:
        """One record per mock device."""
        self._check_usable()
        out = []
        for i, used in enumerate(self._used):
            flags = self._flags[i]
            out.append(
                DeviceInfo(
                    index=i,
                    name="vramcore mock GPU",
                    total_bytes=self._capacity,
                    free_bytes=self._capacity - used,
                    uuid=f"MOCK-{i:04d}",
                    pci_bus_id=f"0000:{i:02x}:00.0",
                    integrated=flags.get("integrated", False),
                    managed_memory=flags.get("managed_memory", True),
                    pageable_memory_access=flags.get("pageable_memory_access", False),
                    host_page_tables=flags.get("host_page_tables", False),
                    ecc_enabled=flags.get("ecc_enabled", True),
                    ecc_errors=0,
                )
            )
        return out

    def _check_device(self, device: int) -> None:
        if not 0 <= device < len(self._used):
            raise InvalidInput(f"mock device {device} does not exist ({len(self._used)} devices)")

    def mem_info(self, device: int) -> tuple[int, int]:
        """``(free, total)`` from the mock's bookkeeping."""
        self._check_usable()
        self._check_device(device)
        with self._lock:
            return self._capacity - self._used[device], self._capacity

    def used_bytes(self, device: int = 0) -> int:
        """Bytes currently allocated on ``device``."""
        with self._lock:
            return self._used[device]

    @property
    def live_allocations(self) -> int:
        """Number of allocations not yet freed."""
        with self._lock:
            return len(self._live)

    def allocate(self, device: int, nbytes: int) -> DeviceBuffer:
        """Allocate ``nbytes`` of (host) memory accounted to ``device``."""
        self._check_usable()
        self._check_device(device)
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            raise InvalidInput(f"allocation size must be a positive integer, got {nbytes!r}")
        self._fail("allocate")
        with self._lock:
            free = self._capacity - self._used[device]
            if nbytes > free:
                raise InsufficientVram(nbytes, free, device=device)
            self._used[device] += nbytes
            kind = self._next_kind
        try:
            mem = self._take_cached(nbytes)
            if mem is None:
                mem = _garbage(nbytes) if self.uninitialised else bytearray(nbytes)
            alloc = _Allocation(mem, kind)
        except MemoryError:
            with self._lock:
                self._used[device] -= nbytes
            raise AllocationFailed(
                f"mock allocation of {nbytes} bytes: host out of memory"
            ) from None
        native = MockDeviceArray(device, nbytes) if self.opaque_native else alloc.view
        buf = DeviceBuffer(device=device, nbytes=nbytes, backend=self.name, native=native)
        with self._lock:
            self._live[id(buf)] = (buf, alloc)
            self.allocations += 1
        return buf

    def _get(self, buf: DeviceBuffer) -> _Allocation:
        entry = self._live.get(id(buf))
        if entry is None or entry[0] is not buf or buf.freed:
            raise InvalidInput(f"{buf!r} was freed or does not belong to this mock backend")
        return entry[1]

    def _bounds(self, buf: DeviceBuffer, offset: int, n: int, what: str) -> None:
        if offset < 0 or n < 0 or offset + n > buf.nbytes:
            raise InvalidInput(
                f"{what} of {n} bytes at offset {offset} is outside the {buf.nbytes}-byte buffer"
            )

    def copy_in(self, buf: DeviceBuffer, offset: int, data: memoryview) -> MockCopyHandle | None:
        """Copy host bytes into the allocation (bounds-checked).

        Synchronous (returns ``None``) by default; with ``async_copies`` the copy is queued
        and a :class:`MockCopyHandle` returned: ``data`` is read when the copy completes.
        """
        self._check_usable()
        alloc = self._get(buf)
        n = data.nbytes
        self._bounds(buf, offset, n, "copy")
        self._fail("copy")
        with self._lock:
            wait_failure = self._injected("wait")
        if self.async_copies:
            return self._stream.submit(alloc.mem, offset, data, wait_failure)
        if wait_failure is not None:  # a synchronous copy that fails "on the device"
            self._copy_failed(wait_failure)
            return finished_handle((AllocationFailed, f"mock copy failed: {wait_failure}"))
        _copy_bytes(alloc.mem, offset, data)
        return None

    def read_into(self, buf: DeviceBuffer, offset: int, out: memoryview) -> None:
        """Copy bytes of the allocation into host ``out`` (bounds-checked), after every
        copy already issued has landed (stream order)."""
        self._check_usable()
        alloc = self._get(buf)
        self._bounds(buf, offset, out.nbytes, "read")
        self._fail("read")
        self._stream.drain()
        out[:] = alloc.view[offset : offset + out.nbytes]

    def tensor_source(self, buf: DeviceBuffer) -> MockTensorSource:
        """NumPy views over the allocation (see :mod:`vramcore_allocator_mock._tensors`)."""
        with self._lock:
            alloc = self._get(buf)
        return MockTensorSource(buf, alloc)

    def host_view(self, buf: DeviceBuffer) -> memoryview | None:
        """The allocation's bytes, zero-copy (the mock's "VRAM" is host memory), after every
        copy already issued has landed; ``None`` with ``opaque_native``, which then hashes
        through :meth:`read_into` as on a GPU. Counts as a read for fault injection."""
        if self.opaque_native:
            return None
        self._check_usable()
        alloc = self._get(buf)
        self._fail("read")
        self._stream.drain()
        return alloc.view

    def free(self, buf: DeviceBuffer) -> None:
        """Release the allocation, after its pending copies; the buffer is unusable afterwards."""
        self._check_usable()
        self._get(buf)
        self._fail("free")
        self._stream.drain()
        with self._lock:
            entry = self._live.get(id(buf))
            if entry is None or entry[0] is not buf or buf.freed:
                raise InvalidInput(f"{buf!r} was already freed or is not from this backend")
            del self._live[id(buf)]
            alloc = entry[1]
            self._used[buf.device] -= buf.nbytes
            buf.freed = True
        try:
            alloc.view.release()
        except BufferError:  # a caller still holds a view: never hand this memory out again
            return
        with self._lock:
            if self._cached + buf.nbytes <= self._cache_limit:
                self._cache.setdefault(buf.nbytes, []).append(alloc.mem)
                self._cached += buf.nbytes

    def _take_cached(self, nbytes: int) -> bytearray | None:
        with self._lock:
            pool = self._cache.get(nbytes)
            if not pool:
                return None
            self._cached -= nbytes
            return pool.pop()

    def memory_kind(self, buf: DeviceBuffer) -> MemoryKind:
        """What :meth:`hand_out` said when the buffer was allocated (``DEVICE`` by default)."""
        self._check_usable()
        return self._get(buf).kind

    @contextlib.contextmanager
    def staging(self, count: int, nbytes: int) -> Iterator[list[memoryview]]:
        """Lend ``count`` reusable host buffers of ``nbytes`` (a pinned pool on CUDA).

        With ``async_copies`` the buffers are scribbled over when the block ends, so a copy
        still pending from them lands junk, as a reused pinned buffer would.
        """
        self._check_usable()
        if count < 0 or nbytes < 0:
            raise InvalidInput("staging needs a non-negative count and size")
        with self._lock:
            mine = [b for b in self._staging if len(b) == nbytes][:count]
            for b in mine:
                self._staging.remove(b)
        mine += [bytearray(nbytes) for _ in range(count - len(mine))]
        views = [memoryview(b) for b in mine]
        try:
            yield views
        finally:
            for view in views:
                view.release()
            if self.async_copies:
                for b in mine:
                    b[:] = b"\xa5" * nbytes
            with self._lock:
                self._staging = (self._staging + mine)[-4:]

    def digest(
        self, buf: DeviceBuffer, leaf_size: int, leaf_range: tuple[int, int] | None = None
    ) -> DeviceDigest:
        """The "device-side" digest the plugin's ``vramcore_device_digest`` returns: root and
        packed leaves of the whole buffer, or packed leaves of ``leaf_range`` (``root=None``).
        """
        self._check_usable()
        alloc = self._get(buf)
        if isinstance(leaf_size, bool) or not isinstance(leaf_size, int) or leaf_size <= 0:
            raise InvalidInput("leaf_size must be a positive integer")
        total = leaf_count(buf.nbytes, leaf_size)
        first, stop = (0, total) if leaf_range is None else leaf_range
        if not (isinstance(first, int) and isinstance(stop, int) and 0 <= first < stop <= total):
            raise InvalidInput(f"leaf range {leaf_range!r} is not within the {total} leaves")
        self._fail("digest")
        self._stream.drain()
        view = alloc.view[first * leaf_size : min(stop * leaf_size, buf.nbytes)]
        leaves = hash_leaves(view, leaf_size)
        packed = b"".join(leaves)
        root = merkle_root(leaves) if leaf_range is None else None
        return DeviceDigest(root=root, leaves=packed, first_leaf=first)

    def close(self) -> None:
        """Wait for pending copies and mark the backend closed (idempotent).

        Allocations stay until freed, as on a device; with ``strict_close`` every later call
        (a second ``close()`` excepted) raises :class:`BackendClosed`.
        """
        self._stream.drain()
        self.closed = True
