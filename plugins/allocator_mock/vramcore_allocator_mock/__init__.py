"""vramcore-allocator-mock: host memory standing in for VRAM, with fault injection.

The mock behaves like a device where it matters to vramcore: allocations are bounded by a
per-device capacity, copies are bounds-checked, a freed buffer cannot be used again, and it
reports :class:`~vramcore.backend.DeviceInfo` with the policy flags. It also lets tests break
things on purpose: flip bits in a live allocation, fail the next allocation or copy, make a
device look integrated or ATS-capable, hand out managed memory.

Configuration (when built from the entry point):

``VRAMCORE_MOCK_DEVICES``
    Number of devices (default 1).
``VRAMCORE_MOCK_VRAM``
    Capacity per device: ``24GiB``, ``512MiB``, ``1000000`` (bytes), or ``2x24GiB``, which
    also sets the device count (default ``1x24GiB``).

Capacity is bookkeeping: the host memory used is what is allocated, not the capacity.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Mapping, Sequence

from vramcore.backend import AllocatorBackend, BackendSpec, DeviceBuffer, DeviceInfo, MemoryKind
from vramcore.errors import AllocationFailed, ConfigError, InsufficientVram, InvalidInput
from vramcore.hookspecs import hookimpl

__all__ = ["MockBackend", "parse_vram", "vramcore_allocator_backends"]

__version__ = "0.1.0"

_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_UNITS |= {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE = re.compile(r"\s*(?:(\d+)\s*x\s*)?(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_vram(text: str) -> tuple[int | None, int]:
    """Parse ``"24GiB"`` or ``"2x24GiB"`` into ``(device count or None, bytes per device)``."""
    m = _SIZE.fullmatch(text)
    unit = m.group(3).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ConfigError(
            f"VRAMCORE_MOCK_VRAM={text[:40]!r} is not a size; write e.g. 24GiB, 512MiB or 2x24GiB"
        )
    count = int(m.group(1)) if m.group(1) else None
    size = int(float(m.group(2)) * _UNITS[unit])
    if size <= 0 or count == 0:
        raise ConfigError(f"VRAMCORE_MOCK_VRAM={text[:40]!r} must describe at least one byte")
    return count, size


class _Allocation:
    __slots__ = ("kind", "mem", "view")

    def __init__(self, mem: bytearray, kind: MemoryKind) -> None:
        self.mem = mem
        self.view = memoryview(mem)
        self.kind = kind


class MockBackend(AllocatorBackend):
    """Host-memory backend for tests and demos.

    :param devices: number of devices.
    :param capacity: bytes per device.
    :param name: backend name reported in events.
    :param cache_bytes: host memory of freed allocations kept for reuse, like a CUDA caching
        allocator (first-touching fresh host pages costs more than the copies on many VMs).
        A reused allocation keeps its old bytes, as device memory does.
    """

    name = "mock"

    def __init__(
        self,
        devices: int = 1,
        capacity: int = 24 << 30,
        *,
        name: str = "mock",
        cache_bytes: int = 512 << 20,
    ) -> None:
        if devices < 1 or capacity < 1:
            raise ConfigError("the mock needs at least one device of at least one byte")
        self.name = name
        self._lock = threading.Lock()
        self._capacity = capacity
        self._used = [0] * devices
        # Keyed by id(buffer); the buffer is kept alive with it so its id cannot be reused.
        self._live: dict[int, tuple[DeviceBuffer, _Allocation]] = {}
        self._flags: list[dict[str, bool]] = [{} for _ in range(devices)]
        self._fail_alloc: list[str] = []
        self._fail_copy: list[str] = []
        self._next_kind = MemoryKind.DEVICE
        self.allocations = 0  #: allocations made so far (tests read it)
        self.closed = False
        self._cache: dict[int, list[bytearray]] = {}
        self._cache_limit = cache_bytes
        self._cached = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> MockBackend:
        """Build from ``VRAMCORE_MOCK_DEVICES`` / ``VRAMCORE_MOCK_VRAM``."""
        env = os.environ if env is None else env
        count, size = parse_vram(env.get("VRAMCORE_MOCK_VRAM", "24GiB"))
        devices_text = env.get("VRAMCORE_MOCK_DEVICES")
        if devices_text is not None:
            if not devices_text.strip().isdigit() or int(devices_text) < 1:
                raise ConfigError(
                    f"VRAMCORE_MOCK_DEVICES={devices_text[:20]!r} must be a positive integer"
                )
            count = int(devices_text)
        return cls(devices=count or 1, capacity=size)

    # -- fault injection -------------------------------------------------------------

    def flip_bit(self, buf: DeviceBuffer, offset: int, bit: int = 0) -> None:
        """Flip bit ``bit`` (0-7) of the byte at ``offset`` in a live allocation."""
        alloc = self._get(buf)
        if not 0 <= offset < buf.nbytes or not 0 <= bit < 8:
            raise InvalidInput(f"offset {offset} / bit {bit} outside the {buf.nbytes}-byte buffer")
        alloc.mem[offset] ^= 1 << bit

    def fail_next_allocation(self, reason: str = "injected allocation failure") -> None:
        """Make the next :meth:`allocate` raise :class:`AllocationFailed`."""
        with self._lock:
            self._fail_alloc.append(reason)

    def fail_next_copy(self, reason: str = "injected copy failure") -> None:
        """Make the next :meth:`copy_in` raise :class:`AllocationFailed`."""
        with self._lock:
            self._fail_copy.append(reason)

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

    # -- AllocatorBackend --------------------------------------------------------------

    def devices(self) -> Sequence[DeviceInfo]:
        """One record per mock device."""
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
        self._check_device(device)
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            raise InvalidInput(f"allocation size must be a positive integer, got {nbytes!r}")
        with self._lock:
            if self._fail_alloc:
                raise AllocationFailed(f"mock allocation failed: {self._fail_alloc.pop(0)}")
            free = self._capacity - self._used[device]
            if nbytes > free:
                raise InsufficientVram(nbytes, free, device=device)
            self._used[device] += nbytes
            kind = self._next_kind
        try:
            alloc = _Allocation(self._take_cached(nbytes) or bytearray(nbytes), kind)
        except MemoryError:
            with self._lock:
                self._used[device] -= nbytes
            raise AllocationFailed(
                f"mock allocation of {nbytes} bytes: host out of memory"
            ) from None
        buf = DeviceBuffer(device=device, nbytes=nbytes, backend=self.name, native=alloc.view)
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

    def copy_in(self, buf: DeviceBuffer, offset: int, data: memoryview) -> None:
        """Copy host bytes into the allocation (bounds-checked)."""
        alloc = self._get(buf)
        n = data.nbytes
        self._bounds(buf, offset, n, "copy")
        with self._lock:
            reason = self._fail_copy.pop(0) if self._fail_copy else None
        if reason is not None:
            raise AllocationFailed(f"mock copy failed: {reason}")
        alloc.mem[offset : offset + n] = data

    def read_into(self, buf: DeviceBuffer, offset: int, out: memoryview) -> None:
        """Copy bytes of the allocation into host ``out`` (bounds-checked)."""
        alloc = self._get(buf)
        self._bounds(buf, offset, out.nbytes, "read")
        out[:] = alloc.view[offset : offset + out.nbytes]

    def free(self, buf: DeviceBuffer) -> None:
        """Release the allocation; the buffer is unusable afterwards."""
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
        return self._get(buf).kind

    def close(self) -> None:
        """Mark the backend closed (allocations stay until freed, as on a device)."""
        self.closed = True


@hookimpl
def vramcore_allocator_backends() -> Sequence[BackendSpec]:
    """Offer the ``mock`` backend at the lowest priority, so any real GPU backend wins."""
    return [
        BackendSpec(
            name="mock",
            priority=-100,
            probe=lambda: None,
            factory=MockBackend.from_env,
            install_hint="pip install vramcore-allocator-mock",
            description="host memory standing in for VRAM (tests, demos); fault injection",
        )
    ]
