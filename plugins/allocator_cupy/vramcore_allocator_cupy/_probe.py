"""Can the cupy backend run here, and what does each GPU look like?

:func:`why_not` is the backend's viability probe: cheap, never raises, and says in one line
why not (CuPy missing, no driver, a driver older than CuPy's CUDA, no device). Discovering the
plugin therefore never fails on a machine without a GPU. :func:`diagnose` checks the two
things apart for ``vramcore doctor``: CuPy (installed, and which version), and the CUDA driver
and GPU (through CuPy when it imports, else by looking for the driver's ``libcuda``).

:func:`device_info` builds a :class:`~vramcore.backend.DeviceInfo` from the CUDA device
properties and attributes, and, with the ``nvml`` extra, NVML's ECC counters and addressing
mode (:mod:`vramcore_allocator_cupy._nvml`).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

from vramcore.backend import (
    CUDA_DRIVER_CHECK,
    DeviceInfo,
    ProbeCheck,
    cuda_driver_check,
    find_libcuda,
)
from vramcore.validation import scrub_text
from vramcore_allocator_cupy._cuda import CudaApi, CudaError

__all__ = ["INSTALL_HINT", "device_info", "diagnose", "why_not"]

INSTALL_HINT = (
    "from a clone of the vramcore repository: pip install './plugins/allocator_cupy[cuda12x]' "
    "(or [cuda13x] for a CUDA 13 driver)"
)


def _cupy_installed() -> bool:
    return importlib.util.find_spec("cupy") is not None


def _import_cupy() -> Any:
    return importlib.import_module("cupy")


def _default_api() -> CudaApi:
    from vramcore_allocator_cupy._cuda import CupyCuda

    return CupyCuda()


def _version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def why_not(
    import_cupy: Callable[[], Any] = _import_cupy,
    make_api: Callable[[], CudaApi] = _default_api,
) -> str | None:
    """``None`` when CuPy, a CUDA driver and at least one GPU are here, else the reason."""
    if import_cupy is _import_cupy and not _cupy_installed():
        return "CuPy is not installed"  # the core adds the install hint
    try:
        import_cupy()
    except ImportError as exc:
        return f"CuPy is not installed or failed to import ({scrub_text(str(exc))[:200]})"
    except Exception as exc:  # a broken CuPy install: report, never raise
        return f"CuPy failed to import: {type(exc).__name__}: {scrub_text(str(exc))[:200]}"
    return _gpu_problem(make_api)[0]


def _gpu_problem(make_api: Callable[[], CudaApi]) -> tuple[str | None, int]:
    """``(why the GPU is not usable through CuPy or None, visible device count)``."""
    try:
        api = make_api()
        count = api.device_count()
    except CudaError as exc:
        return _explain(exc, make_api), 0
    except Exception as exc:
        detail = scrub_text(str(exc))[:200]
        return f"CUDA is not usable through CuPy: {type(exc).__name__}: {detail}", 0
    if count <= 0:
        return "no CUDA device is visible (check CUDA_VISIBLE_DEVICES)", 0
    return None, count


def _broken(exc: Exception) -> str:
    return f"installed but does not import: {type(exc).__name__}: {scrub_text(str(exc))[:200]}"


def diagnose(
    import_cupy: Callable[[], Any] = _import_cupy,
    make_api: Callable[[], CudaApi] = _default_api,
    find_libcuda: Callable[[], str | None] = find_libcuda,
) -> list[ProbeCheck]:
    """Two checks for ``vramcore doctor``: CuPy, then the CUDA driver and GPU. Never raises.

    Without CuPy the driver is looked for as its library (``libcuda``), which tells "install
    CuPy" apart from "this machine has no NVIDIA driver"; GPUs are counted only through CuPy.
    """
    driver = CUDA_DRIVER_CHECK
    if import_cupy is _import_cupy and not _cupy_installed():
        cupy = ProbeCheck(what="CuPy", ok=False, detail="not installed", install=True)
    else:
        try:
            module = import_cupy()
        except ModuleNotFoundError as exc:
            detail = "not installed" if exc.name == "cupy" else _broken(exc)
            cupy = ProbeCheck(what="CuPy", ok=False, detail=detail, install=True)
        except Exception as exc:  # ImportError, or whatever a broken install raises
            cupy = ProbeCheck(what="CuPy", ok=False, detail=_broken(exc), install=True)
        else:
            version = scrub_text(str(getattr(module, "__version__", "unknown version")))[:40]
            cupy = ProbeCheck(what="CuPy", ok=True, detail=f"installed ({version})")
    if not cupy.ok:
        return [cupy, cuda_driver_check("CuPy", find_libcuda)]
    problem, count = _gpu_problem(make_api)
    if problem is not None:
        return [cupy, ProbeCheck(what=driver, ok=False, detail=problem)]
    return [cupy, ProbeCheck(what=driver, ok=True, detail=f"{count} GPU(s) visible")]


def _explain(exc: CudaError, make_api: Callable[[], CudaApi]) -> str:
    """Turn a failed cudaGetDeviceCount into what the operator should do."""
    driver = runtime = 0
    try:
        api = make_api()
        driver, runtime = api.driver_version(), api.runtime_version()
    except Exception:  # noqa: S110 - versions only refine the message
        pass
    if "InsufficientDriver" in exc.name or "insufficient" in exc.name.lower():
        if driver == 0:
            return "no CUDA driver found (no NVIDIA GPU or driver on this machine)"
        return (
            f"the CUDA driver ({_version(driver)}) is older than CuPy's CUDA runtime "
            f"({_version(runtime)}): install the CuPy build for this driver ([cuda12x] or "
            "[cuda13x])"
        )
    if "NoDevice" in exc.name:
        return "no CUDA device found (driver present, no GPU visible)"
    return f"CUDA is not usable: {exc}"


def _text(value: object) -> str:
    if isinstance(value, bytes):
        value = value.split(b"\x00", 1)[0].decode("utf-8", errors="replace")
    return scrub_text(str(value))[:200]


def _uuid(value: object) -> str | None:
    if isinstance(value, bytes | bytearray) and len(value) == 16:
        h = bytes(value).hex()
        return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    return None


def device_info(api: CudaApi, index: int, *, nvml: bool = True) -> DeviceInfo:
    """Describe GPU ``index``: properties, the policy's memory-model flags, ECC (NVML)."""
    props = api.properties(index)

    def attr(name: str, prop: str) -> int:
        value = api.attribute(name, index)
        if value is None:
            value = int(props.get(prop, 0) or 0)
        return value

    free, total = api.mem_info(index)
    bus = attr("PciBusId", "pciBusID")
    domain = attr("PciDomainId", "pciDomainID")
    dev = int(props.get("pciDeviceID", 0) or 0)
    pci = f"{domain:08x}:{bus:02x}:{dev:02x}.0"
    info: dict[str, Any] = {
        "index": index,
        "name": _text(props.get("name", f"CUDA device {index}")),
        "total_bytes": total,  # as cudaMemGetInfo reports it, so mem_info agrees
        "free_bytes": free,
        "compute_capability": (int(props.get("major", 0)), int(props.get("minor", 0))),
        "uuid": _uuid(props.get("uuid")),
        "pci_bus_id": pci,
        "integrated": bool(attr("Integrated", "integrated")),
        "managed_memory": bool(attr("ManagedMemory", "managedMemory")),
        "pageable_memory_access": bool(attr("PageableMemoryAccess", "pageableMemoryAccess")),
        "host_page_tables": bool(
            attr("PageableMemoryAccessUsesHostPageTables", "pageableMemoryAccessUsesHostPageTables")
        ),
        "ecc_enabled": bool(attr("EccEnabled", "ECCEnabled")),
        "ecc_errors": None,
    }
    if nvml:
        from vramcore_allocator_cupy._nvml import nvml_health

        health = nvml_health(index, pci)
        if health is not None:
            info["ecc_errors"] = health.uncorrected_ecc
            if health.ecc_enabled is not None:
                info["ecc_enabled"] = health.ecc_enabled
            info["health"] = {
                "retired_pages": health.retired_pages,
                "remapped_rows_uncorrectable": health.remapped_rows_uncorrectable,
                "remap_pending": health.remap_pending,
                "remap_failed": health.remap_failed,
                "addressing_mode": health.addressing_mode,
            }
    return DeviceInfo(**info)
