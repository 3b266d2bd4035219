"""The PyCUDA allocator backend: device memory through ``mem_alloc``, copies through streams."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from vramcore.backend import AllocatorBackend, DeviceBuffer, DeviceDigest, DeviceInfo, MemoryKind
from vramcore.digest import leaf_count
from vramcore.errors import AllocationFailed, InsufficientVram, InvalidInput, VramError
from vramcore.kernels import check_leaf_indices
from vramcore.validation import scrub_text

from ._api import DriverApi, load_api
from ._contexts import activated, current_context_device, primary_context
from ._copies import EventHandle, EventPool, PinnedPool
from ._kernels import KernelCache, check_leaf_range, digest_allocation
from ._native import PyCudaShard
from ._probe import probe_device
from ._tensors import PyCudaTensorSource

__all__ = ["PyCudaBackend"]

#: Streams per device: copies from concurrent threads overlap on the copy engines.
STREAMS_PER_DEVICE = 4


def driver_error(what: str, exc: BaseException) -> AllocationFailed:
    """A driver exception as vramcore's error: what failed and the driver's words, no pointer."""
    return AllocationFailed(f"{what}: {type(exc).__name__}: {scrub_text(str(exc))[:200]}")


class _Device:
    """One device's context and the objects that live in it (streams, events, kernels)."""

    def __init__(self, api: DriverApi, ordinal: int, context: Any) -> None:
        self.ordinal = ordinal
        self.context = context
        self.streams: list[Any] = []
        self.next_stream = 0
        self.events = EventPool(api)
        self.kernels = KernelCache(api)


class _Live:
    """Backend-side record of one allocation: the PyCUDA object and the shard view."""

    __slots__ = ("allocation", "buffer", "shard")

    def __init__(self, allocation: Any, buffer: DeviceBuffer, shard: PyCudaShard) -> None:
        self.allocation = allocation
        self.buffer = buffer
        self.shard = shard


class PyCudaBackend(AllocatorBackend):
    """vramcore's allocator backend on PyCUDA (see the package docstring).

    :param api: the PyCUDA pieces to use (tests pass a stand-in); default: the real PyCUDA,
        or :class:`~vramcore.errors.BackendUnavailable` saying why it cannot run here.
    """

    name = "pycuda"

    def __init__(self, api: DriverApi | None = None) -> None:
        self._api = api if api is not None else load_api()
        self._drv = self._api.driver
        self._count = int(self._drv.Device.count())
        self._lock = threading.RLock()
        self._devices: dict[int, _Device] = {}
        self._live: dict[int, _Live] = {}
        self._closed = False
        adopted = current_context_device(self._api, self._count)
        if adopted is not None:  # the application's own context for that device
            self._devices[adopted[1]] = _Device(self._api, adopted[1], adopted[0])
        self._pinned = PinnedPool(self._api)
        #: The device whose context allocates (and frees) every pinned buffer.
        self._pinned_home: int | None = None

    # -- contexts -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise AllocationFailed("the pycuda backend was closed")

    def _device(self, device: int) -> _Device:
        if isinstance(device, bool) or not isinstance(device, int):
            raise InvalidInput(f"device must be an integer, got {type(device).__name__}")
        if not 0 <= device < self._count:
            raise InvalidInput(f"GPU {device} does not exist ({self._count} CUDA device(s))")
        with self._lock:
            self._check_open()
            dev = self._devices.get(device)
            if dev is None:
                dev = _Device(self._api, device, primary_context(self._api, device))
                self._devices[device] = dev
            return dev

    @contextlib.contextmanager
    def _on(self, device: int) -> Iterator[_Device]:
        dev = self._device(device)
        with activated(self._api, dev.context, device):
            yield dev

    def _stream(self, dev: _Device) -> Any:
        with self._lock:
            if len(dev.streams) < STREAMS_PER_DEVICE:
                dev.streams.append(self._drv.Stream())
                return dev.streams[-1]
            dev.next_stream = (dev.next_stream + 1) % len(dev.streams)
            return dev.streams[dev.next_stream]

    # -- probing --------------------------------------------------------------------------

    def devices(self) -> Sequence[DeviceInfo]:
        """Every CUDA device: attributes, memory, UUID/PCI id, and NVML's ECC view if any."""
        out = []
        for ordinal in range(self._count):
            free, total = self.mem_info(ordinal)
            out.append(probe_device(self._api, ordinal, free, total))
        return out

    def mem_info(self, device: int) -> tuple[int, int]:
        """``(free, total)`` bytes of ``device`` from the driver, now."""
        with self._on(device):
            try:
                free, total = self._drv.mem_get_info()
            except self._drv.Error as exc:
                raise driver_error(f"cuMemGetInfo on GPU {device}", exc) from None
        return int(free), int(total)

    # -- allocation -----------------------------------------------------------------------

    def allocate(self, device: int, nbytes: int) -> DeviceBuffer:
        """``mem_alloc`` ``nbytes`` on ``device``: plain device memory, freed at once on failure."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            raise InvalidInput(f"allocation size must be a positive integer, got {nbytes!r}")
        with self._on(device):
            try:
                free, _ = self._drv.mem_get_info()
                if nbytes > free:
                    raise InsufficientVram(nbytes, int(free), device=device)
                allocation = self._drv.mem_alloc(nbytes)
            except self._drv.MemoryError:
                free, _ = self._drv.mem_get_info()
                raise InsufficientVram(nbytes, int(free), device=device) from None
            except self._drv.Error as exc:
                raise driver_error(f"cuMemAlloc of {nbytes} bytes on GPU {device}", exc) from None
            try:
                shard = PyCudaShard(allocation, nbytes, device, self._api.gpuarray)
                buf = DeviceBuffer(device=device, nbytes=nbytes, backend=self.name, native=shard)
                with self._lock:
                    self._check_open()
                    self._live[id(buf)] = _Live(allocation, buf, shard)
            except BaseException:
                allocation.free()  # nothing leaks when bookkeeping fails
                raise
        return buf

    def _get(self, buf: DeviceBuffer) -> _Live:
        with self._lock:
            live = self._live.get(id(buf))
        if live is None or live.buffer is not buf or buf.freed:
            raise InvalidInput(f"{buf!r} was freed or does not belong to this pycuda backend")
        return live

    def free(self, buf: DeviceBuffer) -> None:
        """``cuMemFree`` now; the buffer and its shard views are unusable afterwards.

        If the driver refuses, the buffer stays allocated and usable, and freeing it again
        may succeed.
        """
        with self._lock:
            live = self._live.get(id(buf))
            if live is None or live.buffer is not buf or buf.freed:
                raise InvalidInput(f"{buf!r} was already freed or is not from this backend")
            del self._live[id(buf)]  # claimed: a concurrent second free is refused above
            buf.freed = True
        try:
            with activated(self._api, self._devices[buf.device].context, buf.device):
                live.allocation.free()
        except (self._drv.Error, AllocationFailed) as exc:
            with self._lock:
                if not self._closed:
                    self._live[id(buf)] = live
                    buf.freed = False
            if isinstance(exc, AllocationFailed):
                raise
            raise driver_error(f"cuMemFree on GPU {buf.device}", exc) from None
        live.shard.release()

    def tensor_source(self, buf: DeviceBuffer) -> PyCudaTensorSource:
        """``GPUArray`` views and DLPack of ``buf``'s tensors (:mod:`._tensors`)."""
        return PyCudaTensorSource(self._get(buf).shard)

    def memory_kind(self, buf: DeviceBuffer) -> MemoryKind:
        """The driver's pointer type for ``buf`` (``cuPointerGetAttribute``)."""
        live = self._get(buf)
        with self._on(buf.device):
            return self._api.pointer_kind(int(live.allocation))

    # -- copies ---------------------------------------------------------------------------

    @staticmethod
    def _bounds(buf: DeviceBuffer, offset: int, n: int, what: str) -> None:
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise InvalidInput(f"{what} offset must be an integer")
        if offset < 0 or offset + n > buf.nbytes:
            raise InvalidInput(
                f"{what} of {n} bytes at offset {offset} is outside the {buf.nbytes}-byte buffer"
            )

    def copy_in(self, buf: DeviceBuffer, offset: int, data: memoryview) -> EventHandle | None:
        """Host to device. Pinned staging memory: asynchronous, with an event as the handle;
        any other memory: synchronous (``None``), the host bytes read before returning."""
        live = self._get(buf)
        data = memoryview(data)
        if not data.c_contiguous:
            raise InvalidInput("copy_in needs a contiguous buffer")
        if data.format != "B" or data.ndim != 1:
            data = data.cast("B")
        n = data.nbytes
        self._bounds(buf, offset, n, "copy")
        if n == 0:
            return None
        with self._on(buf.device) as dev:
            target = int(live.allocation) + offset
            try:
                if not self._pinned.holds(data):
                    self._drv.memcpy_htod(target, data)
                    return None
                stream = self._stream(dev)
                self._drv.memcpy_htod_async(target, data, stream)
                return dev.events.record(stream, dev.context, buf.device)
            except self._drv.Error as exc:
                raise driver_error(f"host-to-device copy on GPU {buf.device}", exc) from None

    def read_into(self, buf: DeviceBuffer, offset: int, out: memoryview) -> None:
        """Device to host, synchronous (after every earlier copy into ``buf``)."""
        live = self._get(buf)
        if out.readonly:
            raise InvalidInput("read_into needs a writable buffer")
        n = out.nbytes
        self._bounds(buf, offset, n, "read")
        if n == 0:
            return
        with self._on(buf.device):
            try:
                self._drv.memcpy_dtoh(out, int(live.allocation) + offset)
            except self._drv.Error as exc:
                raise driver_error(f"device-to-host copy on GPU {buf.device}", exc) from None

    @contextlib.contextmanager
    def staging(self, count: int, nbytes: int) -> Iterator[list[memoryview]]:
        """Lend ``count`` pinned (page-locked, portable) buffers of ``nbytes``, kept for reuse."""
        self._check_open()
        with self._lock:
            if self._pinned_home is None:  # a device already in use: no new context for this
                self._pinned_home = min(self._devices, default=0)
            home = self._device(self._pinned_home)
        with activated(self._api, home.context, home.ordinal):
            lent = self._pinned.take(count, nbytes)
        try:
            yield [view for _, view in lent]
        finally:
            with activated(self._api, home.context, home.ordinal):
                self._pinned.give_back(lent)

    # -- digest ---------------------------------------------------------------------------

    def device_digest(
        self,
        buf: DeviceBuffer,
        leaf_size: int,
        leaf_range: tuple[int, int] | None,
        leaf_indices: Sequence[int] | None = None,
    ) -> DeviceDigest:
        """The shared ``rfc6962-sha256`` kernels over ``buf`` (or over the listed leaves).

        :raises InvalidInput: a bad leaf size, range or index list (checked before anything
            runs on the GPU).
        :raises PyCudaDigestUnavailable: the kernels cannot run here this time (the core
            then hashes on the host; the reason is logged once).
        """
        live = self._get(buf)
        check_leaf_range(buf.nbytes, leaf_size, leaf_range)  # refused even without a compiler
        if leaf_indices is not None:
            check_leaf_indices(leaf_count(buf.nbytes, leaf_size), leaf_indices)
        with self._on(buf.device) as dev:
            return digest_allocation(
                self._api, dev.kernels, buf.device, live.allocation, buf.nbytes, leaf_size,
                leaf_range, leaf_indices,
            )  # fmt: skip

    # -- closing --------------------------------------------------------------------------

    def close(self) -> None:
        """Free every allocation, pinned buffer, event, stream and module this backend made.

        The contexts stay: an adopted one belongs to the application, a primary one to the
        process (see ``_contexts``). Later calls raise :class:`AllocationFailed`.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            live, self._live = list(self._live.values()), {}
            devices = list(self._devices.values())
        failures: list[VramError] = []
        for dev in devices:
            for record in live:
                if record.buffer.device == dev.ordinal:
                    record.buffer.freed = True
                    record.shard.release()
            try:
                with activated(self._api, dev.context, dev.ordinal):
                    failures += self._close_device(dev, live)
            except VramError as exc:  # a dead context: go on with the other devices
                failures.append(exc)
        if failures:
            raise failures[0]

    def _close_device(self, dev: _Device, live: list[_Live]) -> list[VramError]:
        """Release what lives in ``dev``'s context (pushed); the failures, cleanup going on."""
        failures: list[VramError] = []
        for record in live:
            if record.buffer.device == dev.ordinal:
                failures += _attempt(self._drv, "cuMemFree", record.allocation.free)
        failures += _attempt(self._drv, "event destroy", dev.events.close)
        failures += _attempt(self._drv, "module unload", dev.kernels.close)
        if dev.ordinal == self._pinned_home:
            failures += _attempt(self._drv, "pinned free", self._pinned.close)
        dev.streams.clear()
        return failures


def _attempt(drv: Any, what: str, step: Any) -> list[VramError]:
    """Run a cleanup step; a driver error becomes a returned failure, so cleanup goes on."""
    try:
        step()
    except drv.Error as exc:
        return [driver_error(what, exc)]
    return []
