"""A stand-in PyCUDA over host memory, so the pycuda backend's logic runs without a GPU.

:class:`FakeDriver` mimics the part of ``pycuda.driver`` the backend uses, with PyCUDA's
rules where they bite:

* contexts are current per thread (a per-thread stack), objects are made in the current
  context (none current: ``LogicError``), and freeing an allocation from a thread where its
  context is not current and which did not create that context fails, as PyCUDA's
  "cannot activate out-of-thread context" does;
* "device" memory is ctypes memory with real addresses, so the digest kernels built for the
  host (:func:`vramcore.kernels.build_host_library`) run on it once a module is loaded;
* ``module_from_buffer`` is as strict as ``cuModuleLoadData``: it takes only a cubin for the
  device's architecture (the ELF flags) or NUL-terminated PTX, ``get_function`` finds only
  kernels the image holds, and a load error can be injected (``compile_error``);
* launches are checked as the driver checks them: a block over the kernels' launch bound
  (``LaunchError``, too many resources), an empty grid, the wrong number of arguments, an
  argument that is not a ``numpy`` scalar or an allocation;
* free memory moves in whole 2 MiB pages, as ``cuMemGetInfo`` reports it;
* errors are PyCUDA's kinds: ``MemoryError`` for allocations, ``LaunchError`` for copies
  and completions (as after a fault on the device), ``LogicError`` for misuse;
* streams are honest queues, and ``memcpy_htod_async`` follows CUDA's "API synchronization
  behavior": from page-locked memory (``pagelocked_empty``) the copy reads its source only when
  an event recorded after it, or a synchronous call, drains the queue, so a backend that let
  the core reuse a staging buffer too early copies the new bytes (counted in ``raced``) and one
  that freed it too early copies what freed memory holds (``HostAllocation.free`` fills it with
  ``0xDB``; counted in ``freed_pending``), as on a GPU; from pageable memory the driver stages
  the source before the call returns, so it may be reused at once;
* faults can be injected (allocation, copy, copy completion, read, free).
"""

from __future__ import annotations

import ctypes
import hashlib
import struct
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from vramcore_allocator_pycuda import DriverApi
from vramcore_allocator_pycuda._api import classify_pointer

from vramcore import kernels
from vramcore.backend import MemoryKind

MiB = 1 << 20
#: Granularity of device memory as the driver reports it: an allocation takes whole pages.
PAGE = 2 * MiB
_HOST_LIB: list[ctypes.CDLL] = []


def host_kernels(tmp: Path) -> ctypes.CDLL:
    """The shared digest kernels built for the host, once per session."""
    if not _HOST_LIB:
        _HOST_LIB.append(kernels.load_host_library(kernels.build_host_library(tmp)))
    return _HOST_LIB[0]


class Error(Exception):
    """pycuda._driver.Error."""


class MemoryError_(Error):  # noqa: N801 - mirrors pycuda._driver.MemoryError
    """pycuda._driver.MemoryError."""


class LogicError(Error):
    """pycuda._driver.LogicError."""


class LaunchError(Error):
    """pycuda._driver.LaunchError."""


class FakeDevice:
    def __init__(self, driver: FakeDriver, ordinal: int) -> None:
        if not 0 <= ordinal < len(driver.specs):
            raise LogicError("cuDeviceGet failed: invalid device ordinal")
        self.driver = driver
        self.ordinal = ordinal

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FakeDevice) and other.ordinal == self.ordinal

    def __hash__(self) -> int:
        return self.ordinal

    def name(self) -> str:
        return str(self.driver.specs[self.ordinal]["name"])

    def compute_capability(self) -> tuple[int, int]:
        return (9, 0)

    def total_memory(self) -> int:
        return int(self.driver.specs[self.ordinal]["total"])

    def pci_bus_id(self) -> str:
        return f"0000:{self.ordinal + 1:02x}:00.0"

    def get_attribute(self, attr: str) -> int:
        return int(self.driver.specs[self.ordinal]["attributes"].get(attr, 0))

    def retain_primary_context(self) -> FakeContext:
        self.driver.calls.append(("retain_primary", self.ordinal))
        return self.driver.primary_contexts[self.ordinal]

    def make_context(self) -> FakeContext:
        ctx = FakeContext(self.driver, self.ordinal, primary=False)
        ctx.push()
        return ctx


class FakeContext:
    def __init__(self, driver: FakeDriver, ordinal: int, *, primary: bool) -> None:
        self.driver = driver
        self.ordinal = ordinal
        self.primary = primary
        self.creator = threading.get_ident()
        self.handle = id(self)

    def push(self) -> None:
        self.driver.stack().append(self)

    @staticmethod
    def _driver_of_current_thread() -> FakeDriver:
        return FakeDriver.current

    @classmethod
    def pop(cls) -> None:
        stack = cls._driver_of_current_thread().stack()
        if not stack:
            raise LogicError("context::pop failed: cannot pop non-current context")
        stack.pop()

    @classmethod
    def get_current(cls) -> FakeContext | None:
        stack = cls._driver_of_current_thread().stack()
        return stack[-1] if stack else None

    @classmethod
    def get_device(cls) -> FakeDevice:
        driver = cls._driver_of_current_thread()
        ctx = cls.get_current()
        if ctx is None:
            raise LogicError("cuCtxGetDevice failed: invalid context")
        return FakeDevice(driver, ctx.ordinal)


class FakeAllocation:
    def __init__(self, driver: FakeDriver, ctx: FakeContext, nbytes: int) -> None:
        self.driver = driver
        self.ctx = ctx
        self.nbytes = nbytes
        self.memory = ctypes.create_string_buffer(nbytes)
        self.ptr = ctypes.addressof(self.memory)
        self.valid = True
        self.kind = MemoryKind.DEVICE

    def __int__(self) -> int:
        if not self.valid:
            raise LogicError("device_allocation: invalid handle")
        return self.ptr

    def free(self) -> None:
        if not self.valid:
            raise LogicError("device_allocation::free failed: invalid handle")
        current = FakeContext.get_current()
        if current is not self.ctx and threading.get_ident() != self.ctx.creator:
            self.driver.out_of_thread_frees += 1
            raise LogicError("cannot activate out-of-thread context")
        self.driver.fault("free")
        self.driver.synchronize_all()
        self.valid = False
        self.driver.used[self.ctx.ordinal] -= self.nbytes
        del self.driver.allocations[self.ptr]


#: The byte freed page-locked memory is filled with (what a copy that read it too late finds).
POISON = 0xDB


class PinnedMemory(bytearray):
    """The base of a page-locked array: PyCUDA's HostAllocation has ``free()``.

    Freed memory stays mapped in the fake, filled with :data:`POISON`, so a queued copy that
    still reads it copies garbage rather than crashing the test process.
    """

    freed = False
    driver: FakeDriver

    def address(self) -> int:
        """Where the buffer starts."""
        return int(np.frombuffer(self, dtype=np.uint8).ctypes.data)

    def free(self) -> None:
        start = self.address()
        with self.driver.lock:
            if any(
                isinstance(op, PinnedCopy) and op.reads(start, len(self))
                for stream in self.driver.streams
                for op in stream.queue
            ):
                self.driver.freed_pending += 1
            self[:] = bytes([POISON]) * len(self)
            self.freed = True


class PinnedCopy:
    """A queued host-to-device copy from page-locked memory: DMA reads the source when it runs."""

    def __init__(self, driver: FakeDriver, target: int, address: int, n: int, keep: Any) -> None:
        self.driver = driver
        self.target = target
        self.address = address
        self.n = n
        self.keep: Any = keep
        self.issued = hashlib.sha256(ctypes.string_at(address, n)).digest()

    def reads(self, start: int, n: int) -> bool:
        """Whether this copy reads any byte of ``[start, start + n)``."""
        return self.address < start + n and start < self.address + self.n

    def __call__(self) -> None:
        if hashlib.sha256(ctypes.string_at(self.address, self.n)).digest() != self.issued:
            self.driver.raced += 1
        ctypes.memmove(self.target, self.address, self.n)
        self.keep = None


class FakeStream:
    def __init__(self, driver: FakeDriver) -> None:
        driver.require_context("Stream")
        self.driver = driver
        self.queue: list[Callable[[], None]] = []
        driver.streams.append(self)

    def drain(self, upto: int | None = None) -> None:
        with self.driver.lock:
            n = len(self.queue) if upto is None else min(upto, len(self.queue))
            ops, self.queue = self.queue[:n], self.queue[n:]
        for op in ops:
            op()


class FakeEvent:
    def __init__(self, driver: FakeDriver, flags: int = 0) -> None:
        driver.require_context("Event")
        self.driver = driver
        self.flags = flags
        self.stream: FakeStream | None = None
        self.mark = 0
        driver.events_made += 1

    def record(self, stream: FakeStream) -> FakeEvent:
        self.stream = stream
        with self.driver.lock:
            self.mark = len(stream.queue)
        return self

    def synchronize(self) -> FakeEvent:
        if self.stream is not None:
            self.stream.drain(self.mark)
            self.mark = 0
        self.driver.fault("wait")
        return self


#: Parameters of each kernel (the driver does not check; a wrong count reads garbage).
_ARITY = {kernels.LEAF_KERNEL: 6, kernels.INDEX_KERNEL: 6, kernels.LEVEL_KERNEL: 3}
_HOST_ENTRY = {
    kernels.LEAF_KERNEL: "vc_host_leaf_hashes",
    kernels.INDEX_KERNEL: "vc_host_leaf_hashes_at",
    kernels.LEVEL_KERNEL: "vc_host_merkle_level",
}


class FakeFunction:
    def __init__(self, driver: FakeDriver, name: str) -> None:
        self.driver = driver
        self.name = name

    @staticmethod
    def _value(arg: Any) -> int:
        if isinstance(arg, FakeAllocation):
            return int(arg)
        if isinstance(arg, np.uint64 | np.uintp):
            return int(arg)
        raise TypeError(f"invalid type on parameter: {type(arg).__name__}")

    def __call__(self, *args: Any, block: tuple[int, int, int], grid: tuple[int, int]) -> None:
        self.driver.require_context("launch")
        if len(args) != _ARITY[self.name]:
            raise LogicError(f"{self.name} takes {_ARITY[self.name]} arguments, got {len(args)}")
        values = [self._value(a) for a in args]
        threads = block[0] * block[1] * block[2]
        if threads > kernels.MAX_BLOCK:
            raise LaunchError("cuLaunchKernel failed: too many resources requested for launch")
        if min(*block, *grid) < 1 or grid[0] > 2**31 - 1:
            raise LogicError("cuLaunchKernel failed: invalid argument")
        assert block[1:] == (1, 1) and grid[1] == 1
        self.driver.fault("launch")
        self.driver.synchronize_all()  # the default stream follows every blocking stream
        getattr(self.driver.host_lib, _HOST_ENTRY[self.name])(grid[0], block[0], *values)
        self.driver.launches.append(self.name)


class FakeModule:
    def __init__(self, driver: FakeDriver, image: bytes) -> None:
        ctx = driver.require_context("cuModuleLoadData")
        if driver.compile_error is not None:
            raise driver.compile_error
        if not isinstance(image, bytes):
            raise TypeError("module_from_buffer wants a bytes-like image")
        if image.startswith(b"\x7fELF"):
            major, minor = FakeDevice(driver, ctx.ordinal).compute_capability()
            (flags,) = struct.unpack_from("<I", image, 48)
            if flags & 0xFF != 10 * major + minor:
                raise LogicError(
                    "cuModuleLoadData failed: no kernel image is available for execution "
                    "on the device"
                )
            self.names = {n for n in kernels.KERNEL_NAMES if n.encode() + b"\0" in image}
            driver.loaded.append("cubin")
        elif image.endswith(b"\0") and b".version" in image:
            text = image.decode("ascii")
            self.names = {n for n in kernels.KERNEL_NAMES if f".entry {n}(" in text}
            driver.loaded.append("ptx")
        else:
            raise LogicError("cuModuleLoadData failed: device kernel image is invalid")
        self.driver = driver
        driver.compiles += 1

    def get_function(self, name: str) -> FakeFunction:
        if name not in self.names:
            raise LogicError(f"cuModuleGetFunction failed: named symbol not found ({name})")
        return FakeFunction(self.driver, name)


class FakeDriver:
    """``pycuda.driver`` over host memory (see the module docstring)."""

    current: FakeDriver
    #: What freed page-locked memory holds (for tests, which cannot import this module).
    POISON = POISON

    def __init__(self, devices: int = 1, total: int = 256 * MiB, host_lib: Any = None) -> None:
        FakeDriver.current = self
        self.Error = Error
        self.MemoryError = MemoryError_
        self.LogicError = LogicError
        self.LaunchError = LaunchError
        self.specs: list[dict[str, Any]] = [
            {
                "name": "NVIDIA H100 80GB HBM3 (fake)",
                "total": total,
                "attributes": {"MANAGED_MEMORY": 1, "ECC_ENABLED": 1},
            }
            for _ in range(devices)
        ]
        self.used = [0] * devices
        self.lock = threading.RLock()
        self._local = threading.local()
        self.primary_contexts = [FakeContext(self, i, primary=True) for i in range(devices)]
        self.allocations: dict[int, FakeAllocation] = {}
        self.streams: list[FakeStream] = []
        self.calls: list[tuple[str, int]] = []
        self.launches: list[str] = []
        self.faults: dict[str, list[str]] = {}
        self.host_lib = host_lib
        self.compile_error: Exception | None = None
        self.compiles = 0
        self.loaded: list[str] = []
        self.events_made = 0
        self.out_of_thread_frees = 0
        self.pinned: list[PinnedMemory] = []
        #: Copies from page-locked memory whose source changed before the copy ran.
        self.raced = 0
        #: Page-locked buffers freed while a queued copy still read them.
        self.freed_pending = 0
        self.device_attribute = types.SimpleNamespace(
            **{
                name: name
                for name in (
                    "INTEGRATED",
                    "MANAGED_MEMORY",
                    "PAGEABLE_MEMORY_ACCESS",
                    "PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES",
                    "ECC_ENABLED",
                )
            }
        )
        self.event_flags = types.SimpleNamespace(DISABLE_TIMING=2)
        self.host_alloc_flags = types.SimpleNamespace(PORTABLE=1)
        driver = self

        class Device(FakeDevice):
            def __init__(self, ordinal: int) -> None:
                super().__init__(driver, ordinal)

            @staticmethod
            def count() -> int:
                return len(driver.specs)

        self.Device = Device
        self.Context = FakeContext
        self.Stream = lambda flags=0: FakeStream(self)
        self.Event = lambda flags=0: FakeEvent(self, flags)

    # -- thread state -------------------------------------------------------------------

    def stack(self) -> list[FakeContext]:
        stack: list[FakeContext] | None = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def require_context(self, what: str) -> FakeContext:
        ctx = FakeContext.get_current()
        if ctx is None:
            raise LogicError(f"{what}: no currently active context")
        return ctx

    # -- faults -------------------------------------------------------------------------

    def inject(self, kind: str, reason: str) -> None:
        with self.lock:
            self.faults.setdefault(kind, []).append(reason)

    def fault(self, kind: str) -> None:
        with self.lock:
            pending = self.faults.get(kind)
            reason = pending.pop(0) if pending else None
        if reason is not None:
            kind_error = {"alloc": MemoryError_, "free": LogicError}.get(kind, LaunchError)
            raise kind_error(f"injected: {reason}")

    # -- memory -------------------------------------------------------------------------

    def init(self) -> None:
        pass

    def pages(self, ordinal: int) -> int:
        """Device memory taken on ``ordinal``, each allocation in whole 2 MiB pages."""
        return sum(
            -(-a.nbytes // PAGE) * PAGE
            for a in self.allocations.values()
            if a.ctx.ordinal == ordinal
        )

    def mem_get_info(self) -> tuple[int, int]:
        ctx = self.require_context("mem_get_info")
        total = int(self.specs[ctx.ordinal]["total"])
        return total - self.pages(ctx.ordinal), total

    def mem_alloc(self, nbytes: int) -> FakeAllocation:
        ctx = self.require_context("mem_alloc")
        self.fault("alloc")
        with self.lock:
            if (
                self.pages(ctx.ordinal) + -(-nbytes // PAGE) * PAGE
                > self.specs[ctx.ordinal]["total"]
            ):
                raise MemoryError_("cuMemAlloc failed: out of memory")
            self.used[ctx.ordinal] += nbytes
        alloc = FakeAllocation(self, ctx, nbytes)
        self.allocations[alloc.ptr] = alloc
        return alloc

    def resolve(self, ptr: int, nbytes: int) -> int:
        for base, alloc in self.allocations.items():
            if base <= ptr and ptr + nbytes <= base + alloc.nbytes:
                return ptr
        raise LogicError("cuMemcpy failed: invalid argument (not a live allocation)")

    def pointer_kind(self, ptr: int) -> MemoryKind:
        self.require_context("cuPointerGetAttribute")
        alloc = self.allocations.get(ptr)
        if alloc is None:
            return classify_pointer(None, None)
        return alloc.kind

    @staticmethod
    def _address(host: Any) -> tuple[int, int, Any]:
        view = memoryview(host).cast("B")
        array = np.frombuffer(view, dtype=np.uint8)
        return int(array.ctypes.data), view.nbytes, array

    def synchronize_all(self) -> None:
        for stream in list(self.streams):
            stream.drain()

    def memcpy_htod(self, dest: Any, src: Any) -> None:
        self.require_context("memcpy_htod")
        self.synchronize_all()
        address, n, keep = self._address(src)
        target = self.resolve(int(dest), n)
        self.fault("copy")
        self.fault("wait")  # a synchronous copy's completion error surfaces here
        ctypes.memmove(target, address, n)
        del keep

    def is_pinned(self, address: int, n: int) -> bool:
        """Whether ``[address, address + n)`` lies inside live page-locked memory."""
        return any(
            not p.freed and p.address() <= address and address + n <= p.address() + len(p)
            for p in self.pinned
        )

    def memcpy_htod_async(self, dest: Any, src: Any, stream: FakeStream) -> None:
        self.require_context("memcpy_htod_async")
        address, n, keep = self._address(src)
        target = self.resolve(int(dest), n)
        self.fault("copy")
        with self.lock:
            if self.is_pinned(address, n):
                stream.queue.append(PinnedCopy(self, target, address, n, keep))
                return
            staged = ctypes.create_string_buffer(ctypes.string_at(address, n), n)  # read now
            stream.queue.append(lambda: ctypes.memmove(target, staged, n))

    def memcpy_dtoh(self, dest: Any, src: Any) -> None:
        self.require_context("memcpy_dtoh")
        self.synchronize_all()
        address, n, keep = self._address(dest)
        source = self.resolve(int(src), n)
        self.fault("read")
        ctypes.memmove(address, source, n)
        del keep

    def pagelocked_empty(self, shape: int, dtype: Any, mem_flags: int = 0) -> np.ndarray:
        self.require_context("pagelocked_empty")
        assert mem_flags == self.host_alloc_flags.PORTABLE
        base = PinnedMemory(shape)
        base.driver = self
        self.pinned.append(base)
        return np.ndarray((shape,), dtype=dtype, buffer=base)

    def module_from_buffer(self, image: bytes) -> FakeModule:
        return FakeModule(self, image)


class FakeFaults:
    """:class:`vramcore.testing.FaultInjector` over the fake driver."""

    def __init__(self, driver: FakeDriver) -> None:
        self.driver = driver

    def fail_next_allocation(self, reason: str = "injected") -> None:
        self.driver.inject("alloc", reason)

    def fail_next_copy(self, reason: str = "injected") -> None:
        self.driver.inject("copy", reason)

    def fail_next_wait(self, reason: str = "injected") -> None:
        self.driver.inject("wait", reason)

    def fail_next_read(self, reason: str = "injected") -> None:
        self.driver.inject("read", reason)

    def fail_next_free(self, reason: str = "injected") -> None:
        self.driver.inject("free", reason)


class FakeNvml:
    """The part of ``pynvml`` the probe uses, for one device at PCI bus id 0000:01:00.0."""

    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_VOLATILE_ECC = 0

    def __init__(self, ecc_errors: int = 3, fail_init: bool = False) -> None:
        self.ecc_errors = ecc_errors
        self.fail_init = fail_init

    def nvmlInit(self) -> None:  # noqa: N802
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetHandleByPciBusId(self, bus: str) -> str:  # noqa: N802
        if bus != "0000:01:00.0":
            raise RuntimeError("Not Found")
        return "handle0"

    def nvmlDeviceGetUUID(self, handle: str) -> bytes:  # noqa: N802
        return b"GPU-nvml-0000"

    def nvmlDeviceGetEccMode(self, handle: str) -> tuple[int, int]:  # noqa: N802
        return (0, 1)

    def nvmlDeviceGetTotalEccErrors(self, handle: str, kind: int, counter: int) -> int:  # noqa: N802
        return self.ecc_errors


def make_api(driver: FakeDriver, nvml: Any = None) -> DriverApi:
    """A :class:`DriverApi` over ``driver``."""
    return DriverApi(
        driver=driver,
        module_from_buffer=driver.module_from_buffer,
        pointer_kind=driver.pointer_kind,
        device_uuid=lambda ordinal: f"GPU-fake-{ordinal:04d}",
        nvml=nvml,
        gpuarray=None,
    )


@pytest.fixture
def fake_driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeDriver]:
    """A fresh fake driver with the host-built kernels; checks the test left no context."""
    lib = host_kernels(tmp_path_factory.getbasetemp() / "pycuda-host-kernels")
    driver = FakeDriver(host_lib=lib)
    yield driver
    assert driver.stack() == [], "a context was left pushed on the test's thread"


@pytest.fixture
def fake_api(fake_driver: FakeDriver) -> DriverApi:
    """A :class:`DriverApi` over ``fake_driver`` (no NVML)."""
    return make_api(fake_driver)


@pytest.fixture
def fake_faults(fake_driver: FakeDriver) -> FakeFaults:
    """Fault injection into ``fake_driver``."""
    return FakeFaults(fake_driver)


@pytest.fixture
def fake_nvml() -> type[FakeNvml]:
    """The fake NVML class (build one with the ECC count or init failure you need)."""
    return FakeNvml
