"""Optional device health from NVML (the ``nvml`` extra, ``nvidia-ml-py``).

NVML knows what the CUDA runtime does not: uncorrected ECC error counts, retired pages
(older GPUs) or remapped rows (A100 and later), and the addressing mode the driver runs the
GPU in (HMM, ATS or none). Every query is best effort: a missing library, an old driver or an
unsupported query yields ``None`` for that field, never an exception.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from typing import Any

import attrs

__all__ = ["NvmlHealth", "nvml_health"]

_lock = threading.Lock()


@attrs.frozen(kw_only=True)
class NvmlHealth:
    """What NVML reports about one GPU (``None``: unknown or unsupported).

    :attr ecc_enabled: current ECC mode.
    :attr uncorrected_ecc: aggregate uncorrected ECC errors since the counters were reset.
    :attr retired_pages: pages retired for double-bit errors (pre-Ampere GPUs).
    :attr remapped_rows_uncorrectable: rows remapped after uncorrectable errors (Ampere+).
    :attr remap_pending: a row remap waits for a GPU reset.
    :attr remap_failed: a row remap failed: the GPU should be serviced.
    :attr addressing_mode: ``"hmm"``, ``"ats"`` or ``"none"``.
    """

    ecc_enabled: bool | None = None
    uncorrected_ecc: int | None = None
    retired_pages: int | None = None
    remapped_rows_uncorrectable: int | None = None
    remap_pending: bool | None = None
    remap_failed: bool | None = None
    addressing_mode: str | None = None

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready mapping."""
        return attrs.asdict(self)


def _try(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception:  # unsupported query, old driver: unknown, not an error
        return None


def nvml_health(
    index: int, pci_bus_id: str | None, import_nvml: Callable[[], Any] | None = None
) -> NvmlHealth | None:
    """NVML's view of a GPU found by PCI bus id (else by index), or ``None`` without NVML."""
    try:
        nv = import_nvml() if import_nvml else importlib.import_module("pynvml")
    except Exception:
        return None
    with _lock:
        try:
            nv.nvmlInit()
        except Exception:
            return None
        try:
            handle = None
            if pci_bus_id:
                handle = _try(lambda: nv.nvmlDeviceGetHandleByPciBusId(pci_bus_id))
            if handle is None:
                handle = _try(lambda: nv.nvmlDeviceGetHandleByIndex(index))
            if handle is None:
                return None
            return _health(nv, handle)
        finally:
            _try(nv.nvmlShutdown)


def _health(nv: Any, handle: Any) -> NvmlHealth:
    mode = _try(lambda: nv.nvmlDeviceGetEccMode(handle))
    ecc = _try(
        lambda: nv.nvmlDeviceGetTotalEccErrors(
            handle, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_AGGREGATE_ECC
        )
    )
    pages = _try(
        lambda: nv.nvmlDeviceGetRetiredPages(
            handle, nv.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
        )
    )
    rows = _try(lambda: nv.nvmlDeviceGetRemappedRows(handle))
    addressing = _try(lambda: nv.nvmlDeviceGetAddressingMode(handle))
    names = {
        getattr(nv, "NVML_DEVICE_ADDRESSING_MODE_HMM", -1): "hmm",
        getattr(nv, "NVML_DEVICE_ADDRESSING_MODE_ATS", -2): "ats",
        getattr(nv, "NVML_DEVICE_ADDRESSING_MODE_NONE", -3): "none",
    }
    return NvmlHealth(
        ecc_enabled=bool(mode[0]) if mode else None,
        uncorrected_ecc=int(ecc) if ecc is not None else None,
        retired_pages=len(pages) if pages is not None else None,
        remapped_rows_uncorrectable=int(rows[1]) if rows else None,
        remap_pending=bool(rows[2]) if rows else None,
        remap_failed=bool(rows[3]) if rows else None,
        addressing_mode=names.get(addressing) if addressing is not None else None,
    )
