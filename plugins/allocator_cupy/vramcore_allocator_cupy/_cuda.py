"""The few CUDA runtime calls the backend makes, behind one small interface.

:class:`CupyCuda` implements :class:`CudaApi` with ``cupy.cuda.runtime`` (imported lazily:
importing this module never needs CuPy) and turns CuPy's ``CUDARuntimeError`` into
:class:`CudaError`, which carries the status and the error's name, never a pointer. Tests
drive the backend through a fake :class:`CudaApi` over host memory, so every path except the
driver itself runs on machines without a GPU.

Pointers are plain ``int`` addresses here; they never leave the backend's private state.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

#: cudaMemoryType values of cudaPointerGetAttributes.
MEMORY_UNREGISTERED, MEMORY_HOST, MEMORY_DEVICE, MEMORY_MANAGED = 0, 1, 2, 3
#: cudaErrorMemoryAllocation: out of device memory.
ERROR_MEMORY_ALLOCATION = 2

#: The device attributes the probe reads (cudaDeviceAttr names without the prefix).
ATTRIBUTES = (
    "Integrated",
    "ManagedMemory",
    "ConcurrentManagedAccess",
    "PageableMemoryAccess",
    "PageableMemoryAccessUsesHostPageTables",
    "EccEnabled",
    "MultiProcessorCount",
    "PciBusId",
    "PciDomainId",
)


class CudaError(Exception):
    """A CUDA runtime call failed: ``status`` and the error's name, no pointer."""

    def __init__(self, status: int, name: str, what: str) -> None:
        super().__init__(f"{what} failed: {name}")
        self.status = status
        self.name = name
        self.what = what


class CudaApi(Protocol):
    """The CUDA runtime as the backend uses it (see :class:`CupyCuda`)."""

    def device_count(self) -> int:
        """Number of visible devices (raises :class:`CudaError` without a driver)."""

    def driver_version(self) -> int:
        """The driver's CUDA version (``12040`` for 12.4), 0 without a driver."""

    def runtime_version(self) -> int:
        """The CUDA runtime version CuPy was built against."""

    def properties(self, device: int) -> dict[str, Any]:
        """``cudaGetDeviceProperties`` as a mapping (``name``, ``uuid``, ``major``...)."""

    def attribute(self, name: str, device: int) -> int | None:
        """One ``cudaDevAttr<name>`` value, ``None`` when this runtime does not know it."""

    def mem_info(self, device: int) -> tuple[int, int]:
        """``(free, total)`` bytes of ``device``."""

    def malloc(self, device: int, nbytes: int) -> int:
        """``cudaMalloc`` on ``device``."""

    def free(self, device: int, ptr: int) -> None:
        """``cudaFree``."""

    def pointer_type(self, ptr: int) -> tuple[int, int]:
        """``(cudaMemoryType, device)`` from ``cudaPointerGetAttributes``."""

    def host_alloc(self, nbytes: int) -> int:
        """Pinned, portable host memory (``cudaHostAlloc``)."""

    def free_host(self, ptr: int) -> None:
        """``cudaFreeHost``."""

    def stream_create(self, device: int) -> int:
        """A non-blocking stream on ``device``."""

    def stream_destroy(self, device: int, stream: int) -> None:
        """``cudaStreamDestroy``."""

    def stream_synchronize(self, device: int, stream: int) -> None:
        """Wait for everything queued on ``stream``."""

    def memcpy_async(
        self, device: int, dst: int, src: int, nbytes: int, to_device: bool, stream: int
    ) -> None:
        """``cudaMemcpyAsync`` host to device (``to_device``) or device to host."""

    def event_create(self, device: int) -> int:
        """An event without timing."""

    def event_record(self, device: int, event: int, stream: int) -> None:
        """Record ``event`` on ``stream``."""

    def event_synchronize(self, event: int) -> None:
        """Wait for ``event``."""

    def event_destroy(self, event: int) -> None:
        """``cudaEventDestroy``."""

    def load_kernels(self, device: int) -> str:
        """Build and load the digest module on ``device`` (once; later calls return at once).

        :return: where the image came from ("CuPy NVRTC", "NVRTC 12.9 sm_90", "shipped PTX
            compute_80").
        :raises Exception: whatever the compiler or the driver raised: the backend turns any
            failure here into its typed :class:`~vramcore_allocator_cupy.CupyDigestUnavailable`.
        """

    def launch(
        self,
        device: int,
        kernel: str,
        grid: int,
        block: int,
        args: Sequence[int],
        stream: int,
    ) -> None:
        """Launch ``kernel`` of the digest module (loaded by :meth:`load_kernels`); every
        argument is a 64-bit integer."""


class CupyCuda:
    """:class:`CudaApi` over ``cupy.cuda.runtime`` and a CuPy ``RawModule`` of the kernel."""

    def __init__(self) -> None:
        import cupy  # type: ignore[import-untyped]  # the plugin's probe has shown it imports

        self._cupy = cupy
        self._rt = cupy.cuda.runtime
        self._errors: tuple[type[BaseException], ...] = (
            self._rt.CUDARuntimeError,
            cupy.cuda.driver.CUDADriverError,
            cupy.cuda.compiler.CompileException,
        )
        self._functions: dict[tuple[int, str], Any] = {}
        self._modules: dict[int, Any] = {}  # device -> loaded module (kept alive here)
        self._origins: dict[int, str] = {}
        self._streams: dict[int, Any] = {}  # handle -> cupy.cuda.Stream (kept alive here)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _call(self, what: str, device: int | None = None) -> Iterator[None]:
        """Run a runtime call on ``device`` (current device per thread), mapping its error."""
        try:
            if device is None:
                yield
            else:
                with self._cupy.cuda.Device(device):
                    yield
        except self._errors as exc:
            status = int(getattr(exc, "status", -1))
            if isinstance(exc, self._cupy.cuda.compiler.CompileException):
                name = "NVRTC could not compile the digest kernel"
            else:
                name = str(exc).split(":", 1)[0].strip()[:80] or f"CUDA error {status}"
            raise CudaError(status, name, what) from None

    def device_count(self) -> int:
        with self._call("cudaGetDeviceCount"):
            return int(self._rt.getDeviceCount())

    def driver_version(self) -> int:
        with self._call("cudaDriverGetVersion"):
            return int(self._rt.driverGetVersion())

    def runtime_version(self) -> int:
        with self._call("cudaRuntimeGetVersion"):
            return int(self._rt.runtimeGetVersion())

    def properties(self, device: int) -> dict[str, Any]:
        with self._call("cudaGetDeviceProperties"):
            return dict(self._rt.getDeviceProperties(device))

    def attribute(self, name: str, device: int) -> int | None:
        code = getattr(self._rt, f"cudaDevAttr{name}", None)
        if code is None:
            return None
        with self._call(f"cudaDeviceGetAttribute({name})"):
            return int(self._rt.deviceGetAttribute(code, device))

    def mem_info(self, device: int) -> tuple[int, int]:
        with self._call("cudaMemGetInfo", device):
            free, total = self._rt.memGetInfo()
            return int(free), int(total)

    def malloc(self, device: int, nbytes: int) -> int:
        with self._call("cudaMalloc", device):
            return int(self._rt.malloc(nbytes))

    def free(self, device: int, ptr: int) -> None:
        with self._call("cudaFree", device):
            self._rt.free(ptr)

    def pointer_type(self, ptr: int) -> tuple[int, int]:
        with self._call("cudaPointerGetAttributes"):
            attrs = self._rt.pointerGetAttributes(ptr)
            return int(attrs.type), int(attrs.device)

    def host_alloc(self, nbytes: int) -> int:
        with self._call("cudaHostAlloc"):
            return int(self._rt.hostAlloc(nbytes, self._rt.hostAllocPortable))

    def free_host(self, ptr: int) -> None:
        with self._call("cudaFreeHost"):
            self._rt.freeHost(ptr)

    def stream_create(self, device: int) -> int:
        # A CuPy-made stream, so kernels can be launched on it (``with stream:``).
        with self._call("cudaStreamCreateWithFlags", device):
            stream = self._cupy.cuda.Stream(non_blocking=True)
        with self._lock:
            self._streams[int(stream.ptr)] = stream
        return int(stream.ptr)

    def stream_destroy(self, device: int, stream: int) -> None:
        with self._lock:
            owned = self._streams.pop(stream, None)
        with self._call("cudaStreamDestroy", device):
            if owned is None:
                self._rt.streamDestroy(stream)
            else:
                owned.synchronize()
                del owned  # CuPy destroys the stream it made

    def stream_synchronize(self, device: int, stream: int) -> None:
        with self._call("cudaStreamSynchronize", device):
            self._rt.streamSynchronize(stream)

    def memcpy_async(
        self, device: int, dst: int, src: int, nbytes: int, to_device: bool, stream: int
    ) -> None:
        kind = self._rt.memcpyHostToDevice if to_device else self._rt.memcpyDeviceToHost
        with self._call("cudaMemcpyAsync", device):
            self._rt.memcpyAsync(dst, src, nbytes, kind, stream)

    def event_create(self, device: int) -> int:
        with self._call("cudaEventCreateWithFlags", device):
            return int(self._rt.eventCreateWithFlags(self._rt.eventDisableTiming))

    def event_record(self, device: int, event: int, stream: int) -> None:
        with self._call("cudaEventRecord", device):
            self._rt.eventRecord(event, stream)

    def event_synchronize(self, event: int) -> None:
        with self._call("cudaEventSynchronize"):
            self._rt.eventSynchronize(event)

    def event_destroy(self, event: int) -> None:
        with self._call("cudaEventDestroy"):
            self._rt.eventDestroy(event)

    def load_kernels(self, device: int) -> str:
        """CuPy's NVRTC (``RawModule``, cached on disk) first; if it fails in any way (no
        ``libnvrtc`` for this CUDA, no headers), :func:`vramcore.kernels._nvrtc.kernel_image`:
        the ``nvidia-cuda-nvrtc`` wheel's or the system's NVRTC, else the shipped PTX, loaded
        with ``cuModuleLoadData``. No ``nvcc`` either way."""
        from vramcore import kernels
        from vramcore.kernels._nvrtc import kernel_image

        with self._lock:
            origin = self._origins.get(device)
            if origin is not None:
                return origin
            with self._cupy.cuda.Device(device):
                try:
                    module: Any = self._cupy.RawModule(
                        code=kernels.kernel_source(), options=kernels.NVRTC_OPTIONS
                    )
                    functions = {n: module.get_function(n) for n in kernels.KERNEL_NAMES}
                    origin = "CuPy NVRTC"
                except Exception:  # any kind: CompileException, RuntimeError, OSError...
                    props = self._rt.getDeviceProperties(device)
                    arch = f"sm_{props['major']}{props['minor']}"
                    image = kernel_image(kernels.kernel_source(), arch, kernels.NVRTC_OPTIONS)
                    module = self._cupy.cuda.function.Module()
                    module.load(image.data)
                    functions = {n: module.get_function(n) for n in kernels.KERNEL_NAMES}
                    origin = image.origin
            self._modules[device] = module
            for name, fn in functions.items():
                self._functions[(device, name)] = fn
            self._origins[device] = origin
            return origin

    def launch(
        self,
        device: int,
        kernel: str,
        grid: int,
        block: int,
        args: Sequence[int],
        stream: int,
    ) -> None:
        import numpy

        with self._lock:
            cupy_stream = self._streams[stream]
            fn = self._functions[(device, kernel)]
        with self._call(f"launch of {kernel}", device), cupy_stream:
            # Pointers go as 64-bit integers: the same bytes as a pointer parameter.
            fn((grid,), (block,), tuple(numpy.uint64(a) for a in args))
