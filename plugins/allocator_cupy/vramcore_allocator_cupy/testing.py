"""A fake CUDA runtime over host memory, so code using the cupy backend runs without a GPU.

:class:`FakeCuda` implements the backend's small :class:`~vramcore_allocator_cupy._cuda.CudaApi`:
"device" memory is host memory from ctypes, kernels are the real digest kernels built for the
host (:func:`vramcore.kernels.build_host_library`), and streams are honest queues: a launch, or
a copy between the device and *pinned* host memory, runs only when an event after it, or the
stream, is synchronised. Copies follow CUDA's "API synchronization behavior" for
``cudaMemcpyAsync``:

* host to device from pinned memory (``host_alloc``) is fully asynchronous: the source is read
  when the queued copy runs, so a caller that reuses the buffer before waiting copies the *new*
  bytes, and one that frees it (``free_host``) copies what was left there (the fake fills freed
  pinned memory with ``0xDB`` and keeps it mapped, so the mistake shows as wrong bytes, not a
  crash). Both are counted: ``raced`` (the source changed between the call and the copy) and
  ``freed_pending`` (pinned memory freed while a queued copy still read it);
* host to device from pageable memory is staged by the driver before the call returns: the
  source may be reused at once; the device sees the bytes in stream order;
* device to pageable host memory returns only once the copy has completed (the stream's earlier
  work included); device to pinned memory is queued like any other work.

A backend that let the core reuse or release a staging buffer before its copy finished would
therefore copy the wrong bytes here, as it would on a GPU.

Stricter than a kind fake where CUDA bites: loading the kernels is a step of its own that can
fail with any exception kind (``compile_error``: CuPy's ``CompileException``, an ``OSError``
for a missing ``libnvrtc``...), as can any call (``fail`` takes any exception, not only
:class:`CudaError`); a launch before the kernels are loaded, with a block over the kernels'
launch bound (``cudaErrorLaunchOutOfResources``), an empty grid or the wrong number of
arguments fails as the driver fails it; free memory moves in whole 2 MiB pages, as
``cudaMemGetInfo`` reports it, not byte by byte.
"""

from __future__ import annotations

import ctypes
import hashlib
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vramcore_allocator_cupy._cuda import (
    MEMORY_DEVICE,
    MEMORY_HOST,
    MEMORY_UNREGISTERED,
    CudaApi,
    CudaError,
)

__all__ = ["FakeCuda", "h100_properties", "host_kernels"]

from vramcore import kernels

GiB = 1 << 30
#: Granularity of device memory as ``cudaMemGetInfo`` sees it: an allocation takes whole pages.
PAGE = 2 << 20

_HOST_LIB: list[ctypes.CDLL] = []


def host_kernels(tmp: Path) -> ctypes.CDLL:
    """The digest kernels built for the host once per session."""
    if not _HOST_LIB:
        _HOST_LIB.append(kernels.load_host_library(kernels.build_host_library(tmp)))
    return _HOST_LIB[0]


def h100_properties(index: int = 0) -> dict[str, Any]:
    """Device properties shaped like CuPy's ``getDeviceProperties`` of an H100."""
    return {
        "name": b"NVIDIA H100 80GB HBM3",
        "totalGlobalMem": 80 * GiB,
        "major": 9,
        "minor": 0,
        "uuid": bytes(range(16)),
        "pciBusID": 0x1B + index,
        "pciDeviceID": 0,
        "pciDomainID": 0,
        "integrated": 0,
        "managedMemory": 1,
        "pageableMemoryAccess": 1,
        "pageableMemoryAccessUsesHostPageTables": 0,
        "ECCEnabled": 1,
    }


#: The byte freed pinned memory is filled with (what a copy that read it too late finds).
POISON = 0xDB


class _PinnedCopy:
    """A queued host-to-device copy from pinned memory: reads its source when it runs."""

    __slots__ = ("dst", "fake", "issued", "nbytes", "src")

    def __init__(self, fake: FakeCuda, dst: int, src: int, nbytes: int) -> None:
        self.fake = fake
        self.dst = dst
        self.src = src
        self.nbytes = nbytes
        self.issued = hashlib.sha256(ctypes.string_at(src, nbytes)).digest()

    def reads(self, ptr: int, nbytes: int) -> bool:
        """Whether this copy reads any byte of ``[ptr, ptr + nbytes)``."""
        return self.src < ptr + nbytes and ptr < self.src + self.nbytes

    def __call__(self) -> None:
        if hashlib.sha256(ctypes.string_at(self.src, self.nbytes)).digest() != self.issued:
            self.fake.raced += 1
        ctypes.memmove(self.dst, self.src, self.nbytes)


class FakeCuda(CudaApi):
    """Host-memory CUDA runtime (see the module docstring).

    :param lib: the host-built kernels (:func:`host_kernels`), or ``None`` for no launches.
    :param devices: device count (0: a driver with no GPU).
    :param capacity: bytes per device.
    :param pointer_kind: cudaMemoryType reported for device allocations (2 = device).

    Attributes tests poke: ``fail`` (operation name -> the exception raised by the next such
    call, once: ``"malloc"``, ``"memcpy_h2d"``, ``"memcpy_d2h"``, ``"free"``,
    ``"load_kernels"``, ``"launch:<kernel>"``...), ``compile_error`` (raised by every
    ``load_kernels``), ``attrs`` (device attribute overrides), ``props``, ``mem``
    (address -> (device, ctypes buffer)), ``pinned``, ``calls`` (every call, in order), and the
    copy-misuse counters ``raced`` and ``freed_pending`` (see the module docstring).
    """

    def __init__(
        self,
        lib: ctypes.CDLL | None,
        *,
        devices: int = 1,
        capacity: int = 64 << 20,
        pointer_kind: int = MEMORY_DEVICE,
    ) -> None:
        self.lib = lib
        self.devices = devices
        self.capacity = capacity
        self.pointer_kind = pointer_kind
        self.props = [h100_properties(i) for i in range(devices)]
        self.attrs: dict[str, int | None] = {}
        self.fail: dict[str, BaseException] = {}
        self.compile_error: BaseException | None = None
        self.loaded: set[int] = set()
        self.calls: list[str] = []
        self.mem: dict[int, tuple[int, ctypes.Array[ctypes.c_char]]] = {}  # ptr -> (dev, buf)
        self.pinned: dict[int, ctypes.Array[ctypes.c_char]] = {}
        #: Freed pinned buffers, kept mapped (filled with POISON) so a late copy reads garbage.
        self.freed_pinned: list[ctypes.Array[ctypes.c_char]] = []
        #: Pinned-source copies whose source changed before the copy ran (reused too early).
        self.raced = 0
        #: Pinned buffers freed while a queued copy still read them.
        self.freed_pending = 0
        self.streams: dict[int, list[Callable[[], object] | int]] = {}
        self.events: dict[int, tuple[int, bool]] = {}  # event -> (stream, recorded)
        self._next = 1
        self._lock = threading.RLock()

    # -- helpers --------------------------------------------------------------------------

    def _enter(self, op: str) -> None:
        self.calls.append(op)
        err = self.fail.pop(op, None)
        if err is not None:
            raise err

    def _id(self) -> int:
        self._next += 1
        return self._next

    def used(self, device: int = 0) -> int:
        """Bytes of "device" memory allocated on ``device``."""
        return sum(len(b) for d, b in self.mem.values() if d == device)

    def _run(self, stream: int, until: int | None = None) -> None:
        """Run the queued work of ``stream`` (up to the event ``until``)."""
        with self._lock:
            queue = self.streams[stream]
            while queue:
                item = queue.pop(0)
                if isinstance(item, int):
                    if item == until:
                        return
                    continue
                item()

    # -- CudaApi ----------------------------------------------------------------------------

    def device_count(self) -> int:
        self._enter("device_count")
        return self.devices

    def driver_version(self) -> int:
        return 13000

    def runtime_version(self) -> int:
        return 12090

    def properties(self, device: int) -> dict[str, Any]:
        self._enter("properties")
        return dict(self.props[device])

    def attribute(self, name: str, device: int) -> int | None:
        self._enter("attribute")
        return self.attrs.get(name)

    def pages(self, device: int = 0) -> int:
        """Bytes of "device" memory taken on ``device``, each allocation in whole pages."""
        return sum(-(-len(b) // PAGE) * PAGE for d, b in self.mem.values() if d == device)

    def mem_info(self, device: int) -> tuple[int, int]:
        self._enter("mem_info")
        return self.capacity - self.pages(device), self.capacity

    def malloc(self, device: int, nbytes: int) -> int:
        self._enter("malloc")
        with self._lock:
            if self.pages(device) + -(-nbytes // PAGE) * PAGE > self.capacity:
                raise CudaError(2, "cudaErrorMemoryAllocation", "cudaMalloc")
            buf = ctypes.create_string_buffer(nbytes)
            ptr = ctypes.addressof(buf)
            self.mem[ptr] = (device, buf)
            return ptr

    def free(self, device: int, ptr: int) -> None:
        self._enter("free")
        with self._lock:
            if ptr not in self.mem:
                raise CudaError(1, "cudaErrorInvalidValue", "cudaFree")
            del self.mem[ptr]

    def pointer_type(self, ptr: int) -> tuple[int, int]:
        self._enter("pointer_type")
        for base, (dev, buf) in self.mem.items():
            if base <= ptr < base + len(buf):
                return self.pointer_kind, dev
        if ptr in self.pinned:
            return MEMORY_HOST, -1
        return MEMORY_UNREGISTERED, -2

    def host_alloc(self, nbytes: int) -> int:
        self._enter("host_alloc")
        buf = ctypes.create_string_buffer(nbytes)
        self.pinned[ctypes.addressof(buf)] = buf
        return ctypes.addressof(buf)

    def _pinned_at(self, addr: int, nbytes: int) -> bool:
        """Whether ``[addr, addr + nbytes)`` lies inside one live pinned allocation."""
        return any(p <= addr and addr + nbytes <= p + len(b) for p, b in self.pinned.items())

    def free_host(self, ptr: int) -> None:
        self._enter("free_host")
        with self._lock:
            buf = self.pinned.pop(ptr)
            n = len(buf)
            pending = [
                item
                for queue in self.streams.values()
                for item in queue
                if isinstance(item, _PinnedCopy) and item.reads(ptr, n)
            ]
            if pending:
                self.freed_pending += 1
            ctypes.memset(ptr, POISON, n)
            self.freed_pinned.append(buf)

    def stream_create(self, device: int) -> int:
        self._enter("stream_create")
        sid = self._id()
        self.streams[sid] = []
        return sid

    def stream_destroy(self, device: int, stream: int) -> None:
        self._enter("stream_destroy")
        self._run(stream)
        del self.streams[stream]

    def stream_synchronize(self, device: int, stream: int) -> None:
        self._enter("stream_synchronize")
        self._run(stream)

    def memcpy_async(
        self, device: int, dst: int, src: int, nbytes: int, to_device: bool, stream: int
    ) -> None:
        self._enter("memcpy_h2d" if to_device else "memcpy_d2h")
        with self._lock:
            queue = self.streams[stream]
            if to_device and self._pinned_at(src, nbytes):
                queue.append(_PinnedCopy(self, dst, src, nbytes))  # DMA reads it later
            elif to_device:
                staged = ctypes.create_string_buffer(ctypes.string_at(src, nbytes), nbytes)
                queue.append(lambda: ctypes.memmove(dst, staged, nbytes))  # read now
            elif self._pinned_at(dst, nbytes):
                queue.append(lambda: ctypes.memmove(dst, src, nbytes))
            else:  # into pageable memory: done, earlier work included, before returning
                self._run(stream)
                ctypes.memmove(dst, src, nbytes)

    def event_create(self, device: int) -> int:
        self._enter("event_create")
        eid = self._id()
        self.events[eid] = (0, False)
        return eid

    def event_record(self, device: int, event: int, stream: int) -> None:
        self._enter("event_record")
        with self._lock:
            self.events[event] = (stream, True)
            self.streams[stream].append(event)

    def event_synchronize(self, event: int) -> None:
        self._enter("event_synchronize")
        stream, recorded = self.events[event]
        if recorded and stream in self.streams and event in self.streams[stream]:
            self._run(stream, until=event)

    def event_destroy(self, event: int) -> None:
        self._enter("event_destroy")
        del self.events[event]

    def load_kernels(self, device: int) -> str:
        self._enter("load_kernels")
        if self.compile_error is not None:
            raise self.compile_error
        self.loaded.add(device)
        return "host build (fake)"

    def launch(
        self,
        device: int,
        kernel: str,
        grid: int,
        block: int,
        args: Sequence[int],
        stream: int,
    ) -> None:
        self._enter(f"launch:{kernel}")
        assert self.lib is not None, "this FakeCuda has no host kernels"
        if device not in self.loaded:
            raise CudaError(400, "cudaErrorInvalidResourceHandle", f"launch of {kernel}")
        arity = {kernels.LEAF_KERNEL: 6, kernels.INDEX_KERNEL: 6, kernels.LEVEL_KERNEL: 3}
        if len(args) != arity[kernel]:
            raise CudaError(1, "cudaErrorInvalidValue", f"launch of {kernel} (argument count)")
        if block > kernels.MAX_BLOCK:
            raise CudaError(701, "cudaErrorLaunchOutOfResources", f"launch of {kernel}")
        if grid < 1 or block < 1:
            raise CudaError(9, "cudaErrorInvalidConfiguration", f"launch of {kernel}")
        fn = {
            kernels.LEAF_KERNEL: self.lib.vc_host_leaf_hashes,
            kernels.INDEX_KERNEL: self.lib.vc_host_leaf_hashes_at,
            kernels.LEVEL_KERNEL: self.lib.vc_host_merkle_level,
        }[kernel]
        with self._lock:
            self.streams[stream].append(lambda: fn(grid, block, *args))
