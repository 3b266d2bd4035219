"""Loading PyCUDA, the driver calls PyCUDA does not wrap, and the viability probe.

Nothing here imports PyCUDA at module import time: discovering the plugin must work on a
machine with neither PyCUDA nor a driver. :func:`unavailable_reason` says, in one sentence,
why the backend cannot run; :func:`diagnose` checks PyCUDA and the driver apart, one line each,
for ``vramcore doctor``; :func:`load_api` returns the pieces the backend uses, bundled so that
tests can hand the backend a stand-in driver.

PyCUDA wraps no ``cuPointerGetAttribute`` and no ``cuDeviceGetUuid``; those two come from the
driver library PyCUDA itself loaded (``libcuda.so.1``), through :mod:`ctypes`.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.metadata
import importlib.util
import threading
from collections.abc import Callable
from typing import Any

import attrs

from vramcore.backend import CUDA_DRIVER_CHECK, MemoryKind, ProbeCheck, cuda_driver_check
from vramcore.backend import find_libcuda as _find_libcuda  # the tests' seam
from vramcore.errors import BackendUnavailable
from vramcore.validation import scrub_text

__all__ = [
    "INSTALL_HINT",
    "LIBCUDA",
    "DriverApi",
    "classify_pointer",
    "diagnose",
    "format_uuid",
    "load_api",
    "unavailable_reason",
]

#: The driver library every NVIDIA driver installation provides.
LIBCUDA = "libcuda.so.1"
#: What to install; the extra pulls PyCUDA from the index (which builds it from source).
INSTALL_HINT = (
    "from a clone of the vramcore repository: pip install './plugins/allocator_pycuda[pycuda]' "
    "on a machine with the CUDA toolkit and driver (or install a wheel built by "
    "scripts/build-pycuda-wheel)"
)

# cuPointerGetAttribute attributes and CUmemorytype values (cuda.h; stable since CUDA 4/6).
_ATTR_MEMORY_TYPE = 2
_ATTR_IS_MANAGED = 8
_MEMORYTYPE_HOST = 1
_MEMORYTYPE_DEVICE = 2
_MEMORYTYPE_ARRAY = 3
_MEMORYTYPE_UNIFIED = 4


def classify_pointer(memory_type: int | None, is_managed: bool | None) -> MemoryKind:
    """Map the driver's answers for one pointer to a :class:`~vramcore.backend.MemoryKind`.

    ``None`` means the driver did not answer (the pointer is unknown to CUDA: pageable host
    memory). Managed memory reports ``DEVICE`` as its type, so ``is_managed`` is read first.
    """
    if is_managed:
        return MemoryKind.MANAGED
    if memory_type == _MEMORYTYPE_DEVICE:
        return MemoryKind.DEVICE
    if memory_type == _MEMORYTYPE_HOST:
        return MemoryKind.HOST_MAPPED
    if memory_type == _MEMORYTYPE_UNIFIED:
        return MemoryKind.MANAGED
    if memory_type is None and is_managed is None:
        return MemoryKind.HOST
    return MemoryKind.UNKNOWN


def format_uuid(raw: bytes) -> str:
    """A 16-byte device UUID in ``nvidia-smi``'s form: ``GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxx…``."""
    if len(raw) != 16:
        raise ValueError("a CUDA UUID has 16 bytes")
    h = raw.hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class _LibCuda:
    """The two driver entry points PyCUDA lacks, through ctypes on ``libcuda.so.1``."""

    def __init__(self) -> None:
        self._lib = ctypes.CDLL(LIBCUDA)
        self._lib.cuPointerGetAttribute.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_uint64,
        ]
        self._lib.cuPointerGetAttribute.restype = ctypes.c_int

    def _attribute(self, ptr: int, attr: int) -> int | None:
        value = ctypes.c_uint(0)
        rc = self._lib.cuPointerGetAttribute(ctypes.byref(value), attr, ctypes.c_uint64(ptr))
        return int(value.value) if rc == 0 else None

    def pointer_kind(self, ptr: int) -> MemoryKind:
        """Ask the driver what memory ``ptr`` points to (a context must be current)."""
        managed = self._attribute(ptr, _ATTR_IS_MANAGED)
        return classify_pointer(
            self._attribute(ptr, _ATTR_MEMORY_TYPE), None if managed is None else bool(managed)
        )

    def device_uuid(self, ordinal: int) -> str | None:
        """The device's UUID (``cuDeviceGetUuid``), ``None`` when the driver does not say."""
        dev = ctypes.c_int(0)
        if self._lib.cuDeviceGet(ctypes.byref(dev), ctypes.c_int(ordinal)) != 0:
            return None
        raw = (ctypes.c_ubyte * 16)()
        fn = getattr(self._lib, "cuDeviceGetUuid_v2", None) or self._lib.cuDeviceGetUuid
        if fn(raw, dev) != 0:
            return None
        return format_uuid(bytes(raw))


@attrs.define(eq=False)
class DriverApi:
    """What :class:`~vramcore_allocator_pycuda.PyCudaBackend` needs from PyCUDA and the driver.

    :attr driver: ``pycuda.driver`` (initialised).
    :attr module_from_buffer: ``pycuda.driver.module_from_buffer`` (``cuModuleLoadData`` of a
        cubin or PTX image; no compiler involved).
    :attr pointer_kind: asks the driver where a device address lives (context current).
    :attr device_uuid: the UUID of a device ordinal, or ``None``.
    :attr nvml: the ``pynvml`` module when the ``nvml`` extra is installed, else ``None``.
    :attr gpuarray: ``pycuda.gpuarray`` (for views of a shard), or ``None``.
    """

    driver: Any
    module_from_buffer: Callable[[bytes], Any]
    pointer_kind: Callable[[int], MemoryKind]
    device_uuid: Callable[[int], str | None]
    nvml: Any = None
    gpuarray: Any = None
    #: Primary contexts this process retained, by device ordinal (see ``_contexts``).
    primary: dict[int, Any] = attrs.field(factory=dict)
    lock: threading.Lock = attrs.field(factory=threading.Lock)


def _import_nvml() -> Any:
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        return None


def _describe_import_error(exc: BaseException) -> str:
    text = scrub_text(str(exc))[:300]
    if LIBCUDA in text or "libcuda" in text:
        return (
            f"PyCUDA is installed but the CUDA driver library ({LIBCUDA}) cannot be loaded: "
            "no NVIDIA driver on this machine"
        )
    return f"PyCUDA does not import: {type(exc).__name__}: {text}"


@functools.cache
def _load() -> tuple[DriverApi | None, str | None, str | None]:
    """Import and initialise PyCUDA once per process: ``(api, None, None)``, or ``(None,
    reason, package problem)`` where the package problem is ``None`` when PyCUDA itself is
    fine and the driver or device is what is missing."""
    if importlib.util.find_spec("pycuda") is None:
        return None, f"PyCUDA is not installed; {INSTALL_HINT}", "not installed"
    try:
        driver = importlib.import_module("pycuda.driver")
    except Exception as exc:  # ImportError, OSError from the loader: report, never raise
        reason = _describe_import_error(exc)
        broken = None if "libcuda" in reason else reason.removeprefix("PyCUDA ")
        return None, reason, broken
    try:
        driver.init()
        count = int(driver.Device.count())
    except Exception as exc:  # pycuda.driver.Error: no usable driver or device
        return None, f"the CUDA driver does not start: {scrub_text(str(exc))[:300]}", None
    if count < 1:
        return None, "the CUDA driver reports no device", None
    try:
        lib = _LibCuda()
    except OSError as exc:
        reason = f"cannot open {LIBCUDA} for pointer checks: {scrub_text(str(exc))[:200]}"
        return None, reason, None
    try:
        gpuarray = importlib.import_module("pycuda.gpuarray")
    except Exception:  # views are a convenience; the backend works without them
        gpuarray = None
    api = DriverApi(
        driver=driver,
        module_from_buffer=driver.module_from_buffer,
        pointer_kind=lib.pointer_kind,
        device_uuid=lib.device_uuid,
        nvml=_import_nvml(),
        gpuarray=gpuarray,
    )
    return api, None, None


def _pycuda_version() -> str:
    try:
        return scrub_text(importlib.metadata.version("pycuda"))[:40]
    except Exception:  # metadata missing or unreadable: the version only decorates the line
        return "unknown version"


def diagnose() -> list[ProbeCheck]:
    """Two checks for ``vramcore doctor``: PyCUDA, then the CUDA driver and GPU. Never raises.

    When PyCUDA is missing or broken the driver is looked for as its library (``libcuda``),
    which tells "install PyCUDA" apart from "this machine has no NVIDIA driver".
    """
    driver = CUDA_DRIVER_CHECK
    try:
        api, reason, package = _load()
    except Exception as exc:  # the probe must not raise; neither may its diagnosis
        detail = f"probe failed: {type(exc).__name__}: {scrub_text(str(exc))[:200]}"
        return [ProbeCheck(what="PyCUDA", ok=False, detail=detail)]
    if package is not None:
        pycuda = ProbeCheck(what="PyCUDA", ok=False, detail=package, install=True)
        return [pycuda, cuda_driver_check("PyCUDA", _find_libcuda)]
    pycuda = ProbeCheck(what="PyCUDA", ok=True, detail=f"installed ({_pycuda_version()})")
    if api is None:
        return [pycuda, ProbeCheck(what=driver, ok=False, detail=str(reason))]
    try:
        count = int(api.driver.Device.count())
    except Exception:  # counted once already by the probe; this only words the line
        count = 0
    return [pycuda, ProbeCheck(what=driver, ok=True, detail=f"{count} GPU(s) visible")]


def unavailable_reason() -> str | None:
    """``None`` when PyCUDA and a driver with a device are here, else why not. Never raises."""
    try:
        return _load()[1]
    except Exception as exc:  # a probe must not raise
        return f"PyCUDA probe failed: {type(exc).__name__}: {scrub_text(str(exc))[:200]}"


def load_api() -> DriverApi:
    """The process's :class:`DriverApi`; :class:`BackendUnavailable` says why there is none."""
    api, reason, _package = _load()
    if api is None:
        raise BackendUnavailable(f"pycuda backend: {reason}", choices=("pycuda",))
    return api
