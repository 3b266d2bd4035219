"""``CupyBackend``: plain device memory through the CUDA runtime that CuPy binds.

* Allocation is ``cudaMalloc`` (never CuPy's memory pool, never managed or host-mapped
  memory), checked with ``cudaPointerGetAttributes`` before use; a free goes straight back to
  the driver.
* Copies to the device run on one non-blocking stream per device. A chunk read into the pinned
  staging memory the backend lends (:meth:`CupyBackend.staging`) is copied by DMA with
  ``cudaMemcpyAsync`` and an event recorded after it is the copy's
  :class:`~vramcore.backend.CopyHandle`, so file reads, transfers and hashing overlap. Other
  host memory is copied before ``copy_in`` returns.
* The digest runs on the device (:mod:`vramcore.kernels`), on the same stream, so it always
  sees every copy queued before it.

Device addresses stay in this module's private records: reprs and errors never show one.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from collections.abc import Iterator, Sequence

from vramcore import kernels
from vramcore.backend import (
    AllocatorBackend,
    CopyHandle,
    DeviceBuffer,
    DeviceDigest,
    DeviceInfo,
    MemoryKind,
)
from vramcore.digest import leaf_count
from vramcore.errors import (
    AllocationFailed,
    DeviceDigestUnavailable,
    InsufficientVram,
    InvalidInput,
    PolicyViolation,
    VramError,
)
from vramcore.validation import check_leaf_size, scrub_text
from vramcore_allocator_cupy._cuda import (
    ERROR_MEMORY_ALLOCATION,
    MEMORY_DEVICE,
    MEMORY_HOST,
    MEMORY_MANAGED,
    MEMORY_UNREGISTERED,
    CudaApi,
    CudaError,
)
from vramcore_allocator_cupy._memory import DeviceMemory
from vramcore_allocator_cupy._probe import device_info
from vramcore_allocator_cupy._tensors import CupyTensorSource

__all__ = ["BackendClosed", "CupyBackend", "CupyDigestUnavailable"]

log = logging.getLogger(__name__)

#: Pinned staging memory kept idle between loads (reused: pinning is slow).
DEFAULT_STAGING_KEEP = 512 << 20

_KINDS = {
    MEMORY_DEVICE: MemoryKind.DEVICE,
    MEMORY_MANAGED: MemoryKind.MANAGED,
    MEMORY_HOST: MemoryKind.HOST_MAPPED,
    MEMORY_UNREGISTERED: MemoryKind.HOST,
}


class CupyDigestUnavailable(DeviceDigestUnavailable):
    """The cupy backend cannot digest on the GPU this time: the kernels do not build or
    load, a launch or a copy failed, or there is no scratch memory (the reason, without a
    pointer, is the message). The core hashes on the host instead."""


class BackendClosed(VramError):
    """The backend was closed; create a new one (the manager does)."""


class _Alloc:
    """The backend's private record of one allocation (holds the address)."""

    __slots__ = ("device", "freed", "nbytes", "ptr")

    def __init__(self, device: int, ptr: int, nbytes: int) -> None:
        self.device = device
        self.ptr = ptr
        self.nbytes = nbytes
        self.freed = False

    def __repr__(self) -> str:
        return f"<allocation GPU{self.device} {self.nbytes} bytes>"


class _EventHandle:
    """A :class:`~vramcore.backend.CopyHandle`: an event recorded after one async copy."""

    __slots__ = ("_api", "_error", "_event", "_keep", "_lock")

    def __init__(self, api: CudaApi, event: int, keep: object) -> None:
        self._api = api
        self._event: int | None = event
        self._keep: object = keep  # the host memory the copy reads, alive until done
        self._error: VramError | None = None
        self._lock = threading.Lock()

    def wait(self) -> None:
        """Block until the copy has read its host buffer; raise its error, if any."""
        with self._lock:
            if self._event is not None:
                event, self._event = self._event, None
                try:
                    self._api.event_synchronize(event)
                except CudaError as exc:
                    self._error = AllocationFailed(f"copy to the GPU failed: {exc}")
                finally:
                    self._keep = None
                    with contextlib.suppress(CudaError):
                        self._api.event_destroy(event)
            if self._error is not None:
                raise self._error

    def __repr__(self) -> str:
        return "<cupy copy handle>"


def _address(data: memoryview, writable: bool) -> tuple[int, object]:
    """The host address of a contiguous buffer and an object keeping it alive."""
    import numpy

    if not data.contiguous:
        raise InvalidInput("host buffers must be contiguous")
    if writable and data.readonly:
        raise InvalidInput("the output buffer is read-only")
    arr = numpy.frombuffer(data, dtype=numpy.uint8)
    return int(arr.ctypes.data), arr


class CupyBackend(AllocatorBackend):
    """Device memory, copies and the device digest on CUDA GPUs, through CuPy.

    :param api: the CUDA runtime (default :class:`~vramcore_allocator_cupy._cuda.CupyCuda`;
        tests pass a fake).
    :param staging_keep: bytes of idle pinned staging memory kept for reuse.
    :param nvml: read ECC counters and the addressing mode through NVML when ``pynvml`` is
        installed (the ``nvml`` extra).
    """

    name = "cupy"

    def __init__(
        self,
        api: CudaApi | None = None,
        *,
        staging_keep: int = DEFAULT_STAGING_KEEP,
        nvml: bool = True,
    ) -> None:
        if api is None:
            from vramcore_allocator_cupy._cuda import CupyCuda

            api = CupyCuda()
        self._api = api
        self._nvml = nvml
        self._staging_keep = staging_keep
        self._lock = threading.Lock()
        self._closed = False
        self._live: dict[int, _Alloc] = {}  # id(DeviceBuffer) -> record
        self._streams: dict[int, int] = {}
        self._idle_pinned: list[tuple[int, int]] = []  # (ptr, nbytes)
        self._lent_pinned: dict[int, int] = {}  # ptr -> nbytes
        self._kernel_origin: dict[int, str] = {}
        try:
            self._count = api.device_count()
        except CudaError as exc:
            raise BackendClosed(f"CUDA is not usable: {exc}") from None

    # -- bookkeeping --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise BackendClosed("the cupy backend is closed")

    def _check_device(self, device: int) -> None:
        if isinstance(device, bool) or not isinstance(device, int):
            raise InvalidInput("device must be an integer")
        if not 0 <= device < self._count:
            raise InvalidInput(f"GPU {device} does not exist ({self._count} visible)")

    def _record(self, buf: DeviceBuffer) -> _Alloc:
        with self._lock:
            self._check_open()
            rec = self._live.get(id(buf)) if isinstance(buf, DeviceBuffer) else None
        if rec is None or rec.freed:
            raise InvalidInput(f"{buf!r} was freed or does not belong to this cupy backend")
        return rec

    def _stream(self, device: int) -> int:
        with self._lock:
            self._check_open()
            stream = self._streams.get(device)
            if stream is None:
                try:
                    stream = self._api.stream_create(device)
                except CudaError as exc:
                    raise AllocationFailed(f"cannot create a CUDA stream: {exc}") from None
                self._streams[device] = stream
            return stream

    @staticmethod
    def _bounds(rec: _Alloc, offset: int, n: int) -> None:
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidInput("offset must be a non-negative integer")
        if offset + n > rec.nbytes:
            raise InvalidInput(f"{n} bytes at offset {offset} overrun the {rec.nbytes}-byte buffer")

    # -- probing ------------------------------------------------------------------------

    def devices(self) -> Sequence[DeviceInfo]:
        """Every visible device, with the flags the VRAM-only policy reads."""
        self._check_open()
        try:
            return [device_info(self._api, i, nvml=self._nvml) for i in range(self._count)]
        except CudaError as exc:
            raise VramError(f"probing the GPUs failed: {exc}") from None

    def mem_info(self, device: int) -> tuple[int, int]:
        """``(free, total)`` bytes of ``device``, from the driver."""
        self._check_open()
        self._check_device(device)
        try:
            return self._api.mem_info(device)
        except CudaError as exc:
            raise VramError(f"cudaMemGetInfo failed: {exc}") from None

    # -- allocation ---------------------------------------------------------------------

    def allocate(self, device: int, nbytes: int) -> DeviceBuffer:
        """``cudaMalloc`` ``nbytes`` on ``device``; refuse anything but plain device memory."""
        self._check_open()
        self._check_device(device)
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            raise InvalidInput(f"allocation size must be a positive integer, got {nbytes!r}")
        try:
            ptr = self._api.malloc(device, nbytes)
        except CudaError as exc:
            if exc.status == ERROR_MEMORY_ALLOCATION:
                free = self._free_bytes(device)
                raise InsufficientVram(nbytes, free, device=device) from None
            raise AllocationFailed(f"cudaMalloc of {nbytes} bytes failed: {exc}") from None
        rec = _Alloc(device, ptr, nbytes)
        try:
            kind = self._kind(rec)
            if kind is not MemoryKind.DEVICE:
                raise PolicyViolation(
                    f"the driver reports a fresh allocation on GPU {device} as {kind.value} "
                    "memory, not plain device memory",
                    rule="managed" if kind is MemoryKind.MANAGED else "host_memory",
                    device=device,
                )
            buf = DeviceBuffer(
                device=device, nbytes=nbytes, backend=self.name, native=DeviceMemory(self, rec)
            )
            with self._lock:
                self._check_open()
                self._live[id(buf)] = rec
        except BaseException:
            with contextlib.suppress(CudaError):
                self._api.free(device, ptr)
            raise
        return buf

    def _free_bytes(self, device: int) -> int:
        try:
            return self._api.mem_info(device)[0]
        except CudaError:
            return 0

    def _kind(self, rec: _Alloc) -> MemoryKind:
        try:
            mem_type, dev = self._api.pointer_type(rec.ptr)
        except CudaError:
            return MemoryKind.UNKNOWN
        if dev != rec.device and mem_type == MEMORY_DEVICE:
            return MemoryKind.UNKNOWN  # device memory, but not on the device we asked for
        return _KINDS.get(mem_type, MemoryKind.UNKNOWN)

    def tensor_source(self, buf: DeviceBuffer) -> CupyTensorSource:
        """CuPy views and DLPack of ``buf``'s tensors (:mod:`._tensors`)."""
        return CupyTensorSource(self, self._record(buf))

    def memory_kind(self, buf: DeviceBuffer) -> MemoryKind:
        """Ask the driver, every time, where ``buf`` lives."""
        return self._kind(self._record(buf))

    def free(self, buf: DeviceBuffer) -> None:
        """Wait for queued work on the buffer's device, then ``cudaFree`` it.

        If the driver refuses the free, the buffer stays allocated (and usable) and the call
        raises :class:`~vramcore.errors.AllocationFailed`; freeing it again may succeed.
        """
        with self._lock:
            self._check_open()
            rec = self._live.get(id(buf)) if isinstance(buf, DeviceBuffer) else None
            if rec is None or rec.freed:
                raise InvalidInput(f"{buf!r} was already freed or is not from this backend")
            rec.freed = True  # refuse concurrent use while the free runs
            stream = self._streams.get(rec.device)
        try:
            if stream is not None:
                self._api.stream_synchronize(rec.device, stream)
            self._api.free(rec.device, rec.ptr)
        except CudaError as exc:
            rec.freed = False
            raise AllocationFailed(f"cudaFree failed: {exc}") from None
        with self._lock:
            self._live.pop(id(buf), None)
        buf.freed = True

    # -- copies -------------------------------------------------------------------------

    @contextlib.contextmanager
    def staging(self, count: int, nbytes: int) -> Iterator[list[memoryview]]:
        """Lend ``count`` pinned host buffers of ``nbytes``, reused across loads.

        When pinned memory cannot be had (locked-memory limits), ordinary memory is lent
        instead and copies from it are synchronous.
        """
        self._check_open()
        if count <= 0 or nbytes <= 0:
            raise InvalidInput("staging needs a positive count and size")
        taken: list[tuple[int, int]] = []
        failure: CudaError | None = None
        try:
            for _ in range(count):
                taken.append(self._take_pinned(nbytes))
        except CudaError as exc:
            failure = exc
        if failure is not None:
            self._return_pinned(taken)
            log.warning(
                "cupy backend: no pinned staging memory (%s); copies are synchronous", failure
            )
            yield [memoryview(bytearray(nbytes)) for _ in range(count)]
            return
        try:
            yield [
                memoryview((ctypes.c_char * n).from_address(ptr)).cast("B")[:nbytes]
                for ptr, n in taken
            ]
        finally:
            self._return_pinned(taken)

    def _take_pinned(self, nbytes: int) -> tuple[int, int]:
        with self._lock:
            self._check_open()
            for i, (ptr, n) in enumerate(self._idle_pinned):
                if n >= nbytes:
                    del self._idle_pinned[i]
                    self._lent_pinned[ptr] = n
                    return ptr, n
        ptr = self._api.host_alloc(nbytes)
        with self._lock:
            self._lent_pinned[ptr] = nbytes
        return ptr, nbytes

    def _return_pinned(self, taken: list[tuple[int, int]]) -> None:
        drop = []
        with self._lock:
            for ptr, n in taken:
                self._lent_pinned.pop(ptr, None)
                idle = sum(m for _, m in self._idle_pinned)
                if self._closed or idle + n > self._staging_keep:
                    drop.append(ptr)
                else:
                    self._idle_pinned.append((ptr, n))
        for ptr in drop:
            with contextlib.suppress(CudaError):
                self._api.free_host(ptr)

    def _is_pinned(self, addr: int, n: int) -> bool:
        with self._lock:
            return any(p <= addr and addr + n <= p + m for p, m in self._lent_pinned.items())

    def copy_in(self, buf: DeviceBuffer, offset: int, data: memoryview) -> CopyHandle | None:
        """Copy ``data`` to ``buf[offset:]``: async from lent pinned memory, else at once."""
        rec = self._record(buf)
        view = memoryview(data)
        n = view.nbytes
        self._bounds(rec, offset, n)
        if n == 0:
            return None
        addr, keep = _address(view, writable=False)
        stream = self._stream(rec.device)
        pinned = self._is_pinned(addr, n)
        try:
            self._api.memcpy_async(rec.device, rec.ptr + offset, addr, n, True, stream)
            if not pinned:  # pageable memory: done before returning, as the contract allows
                self._api.stream_synchronize(rec.device, stream)
                return None
            event = self._api.event_create(rec.device)
        except CudaError as exc:
            raise AllocationFailed(f"copy to the GPU failed: {exc}") from None
        try:
            self._api.event_record(rec.device, event, stream)
        except CudaError as exc:
            with contextlib.suppress(CudaError):
                self._api.event_destroy(event)
                self._api.stream_synchronize(rec.device, stream)
            raise AllocationFailed(f"copy to the GPU failed: {exc}") from None
        return _EventHandle(self._api, event, keep)

    def read_into(self, buf: DeviceBuffer, offset: int, out: memoryview) -> None:
        """Copy ``len(out)`` bytes of ``buf`` from ``offset`` to host ``out``, synchronously."""
        rec = self._record(buf)
        view = memoryview(out)
        n = view.nbytes
        self._bounds(rec, offset, n)
        if n == 0:
            return
        self._copy_out(rec, offset, view)

    def _copy_out(self, rec: _Alloc, offset: int, view: memoryview) -> None:
        """Copy ``len(view)`` bytes at ``offset`` of an allocation to host ``view``, and wait."""
        addr, _keep = _address(view, writable=True)
        stream = self._stream(rec.device)
        try:
            self._api.memcpy_async(rec.device, addr, rec.ptr + offset, view.nbytes, False, stream)
            self._api.stream_synchronize(rec.device, stream)
        except CudaError as exc:
            raise AllocationFailed(f"copy from the GPU failed: {exc}") from None

    # -- device digest ------------------------------------------------------------------

    def digest(
        self,
        buf: DeviceBuffer,
        leaf_size: int,
        leaf_range: tuple[int, int] | None = None,
        leaf_indices: Sequence[int] | None = None,
    ) -> DeviceDigest:
        """The ``rfc6962-sha256`` digest of ``buf`` computed on its GPU (see kernels), or the
        hashes of the listed leaves (``leaf_indices``, by the kernels' cost model).

        :raises InvalidInput: a bad leaf size, range or index list (before anything runs).
        :raises CupyDigestUnavailable: the kernels do not build, load or launch, a copy
            failed, or there is no room for the scratch memory (48 bytes per leaf): the core
            then hashes on the host.
        """
        rec = self._record(buf)
        check_leaf_size(leaf_size)
        n = leaf_count(rec.nbytes, leaf_size)
        if leaf_indices is not None:
            kernels.check_leaf_indices(n, leaf_indices)
        elif leaf_range is not None and not (
            len(leaf_range) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in leaf_range)
            and 0 <= leaf_range[0] < leaf_range[1] <= n
        ):
            raise InvalidInput(f"leaf range {leaf_range!r:.40} is not within the {n} leaves")
        try:
            origin = self._api.load_kernels(rec.device)
        except Exception as exc:  # any kind: the compiler's, the loader's, the driver's
            raise CupyDigestUnavailable(
                f"cupy backend: the digest kernels do not load on GPU {rec.device}: "
                f"{type(exc).__name__}: {scrub_text(str(exc))[:300]}"
            ) from None
        self._kernel_origin[rec.device] = origin
        ops = _KernelOps(self._api, rec, self._stream(rec.device))
        try:
            if leaf_indices is not None:
                return kernels.device_leaves_at(ops, rec.nbytes, leaf_size, leaf_indices)
            return kernels.device_merkle(ops, rec.nbytes, leaf_size, leaf_range)
        except (InvalidInput, CupyDigestUnavailable):
            raise
        except Exception as exc:  # CudaError, or anything a launch raised
            raise CupyDigestUnavailable(
                f"cupy backend: device digest failed on GPU {rec.device}: "
                f"{type(exc).__name__}: {scrub_text(str(exc))[:300]}"
            ) from None

    def kernel_origin(self, device: int) -> str | None:
        """Where the loaded digest kernels of ``device`` came from, once loaded."""
        return self._kernel_origin.get(device)

    # -- lifetime -----------------------------------------------------------------------

    def live_allocations(self) -> int:
        """How many allocations are not freed yet (for leak checks)."""
        with self._lock:
            return len(self._live)

    def close(self) -> None:
        """Free what is left (allocations, pinned memory, streams); later calls raise."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            live, self._live = list(self._live.values()), {}
            pinned = [p for p, _ in self._idle_pinned]
            self._idle_pinned = []
            streams, self._streams = dict(self._streams), {}
        for device, stream in streams.items():
            with contextlib.suppress(CudaError):
                self._api.stream_synchronize(device, stream)
        for rec in live:
            rec.freed = True
            with contextlib.suppress(CudaError):
                self._api.free(rec.device, rec.ptr)
        for ptr in pinned:
            with contextlib.suppress(CudaError):
                self._api.free_host(ptr)
        for device, stream in streams.items():
            with contextlib.suppress(CudaError):
                self._api.stream_destroy(device, stream)

    def _read_bytes(self, rec: _Alloc, offset: int, n: int) -> bytes:
        """``n`` bytes at ``offset`` of an allocation (for :class:`DeviceMemory` views)."""
        out = bytearray(n)
        if n:
            self._copy_out(rec, offset, memoryview(out))
        return bytes(out)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._count} GPU(s)"
        return f"<CupyBackend {state}>"


class _KernelOps:
    """:class:`vramcore.kernels.KernelOps` on one allocation, one stream, scratch by cudaMalloc."""

    def __init__(self, api: CudaApi, rec: _Alloc, stream: int) -> None:
        self._api = api
        self._rec = rec
        self._stream = stream
        self._keep = bytearray()

    def alloc(self, nbytes: int) -> int:
        try:
            return self._api.malloc(self._rec.device, nbytes)
        except CudaError as exc:
            if exc.status == ERROR_MEMORY_ALLOCATION:
                raise CupyDigestUnavailable(
                    f"cupy backend: no room on GPU {self._rec.device} for the digest's "
                    f"{nbytes}-byte scratch memory"
                ) from None
            raise

    def free(self, scratch: int) -> None:
        # The stream may still run a launch that writes the scratch memory.
        try:
            self._api.stream_synchronize(self._rec.device, self._stream)
        finally:
            self._api.free(self._rec.device, scratch)

    def leaf_hashes(
        self,
        nbytes: int,
        leaf_size: int,
        first_leaf: int,
        count: int,
        out: int,
        geometry: tuple[int, int],
    ) -> None:
        args = (self._rec.ptr, nbytes, leaf_size, first_leaf, count, out)
        self._launch(kernels.LEAF_KERNEL, geometry, args)

    def leaf_hashes_at(
        self,
        nbytes: int,
        leaf_size: int,
        indices: int,
        count: int,
        out: int,
        geometry: tuple[int, int],
    ) -> None:
        args = (self._rec.ptr, nbytes, leaf_size, indices, count, out)
        self._launch(kernels.INDEX_KERNEL, geometry, args)

    def merkle_level(self, src: int, n: int, dst: int, geometry: tuple[int, int]) -> None:
        self._launch(kernels.LEVEL_KERNEL, geometry, (src, n, dst))

    def write(self, scratch: int, data: bytes) -> None:
        # A pageable source: cudaMemcpyAsync has read it when it returns, and the copy is
        # ordered before every later launch on the stream. Kept alive until the read anyway.
        self._keep = bytearray(data)
        addr, _ = _address(memoryview(self._keep), writable=True)
        self._api.memcpy_async(self._rec.device, scratch, addr, len(data), True, self._stream)

    def _launch(self, name: str, geometry: tuple[int, int], args: Sequence[int]) -> None:
        grid, block = geometry
        self._api.launch(self._rec.device, name, grid, block, args, self._stream)

    def read(self, scratch: int, nbytes: int) -> bytes:
        out = bytearray(nbytes)
        addr, _keep = _address(memoryview(out), writable=True)
        self._api.memcpy_async(self._rec.device, addr, scratch, nbytes, False, self._stream)
        self._api.stream_synchronize(self._rec.device, self._stream)
        return bytes(out)
