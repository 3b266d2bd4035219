"""Describe a CUDA device for the VRAM-only policy, from PyCUDA's attributes and NVML.

The flags are the driver's own device attributes, the same ones the CuPy backend reads, so
both backends feed the policy identical records: ``INTEGRATED``, ``MANAGED_MEMORY``,
``PAGEABLE_MEMORY_ACCESS`` (HMM or ATS) and ``PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES``
(ATS), ``ECC_ENABLED``. With the ``nvml`` extra (``nvidia-ml-py``), NVML adds the
uncorrected ECC error count and confirms the ECC mode; the device is found by PCI bus id,
because CUDA and NVML may number devices differently.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from vramcore.backend import DeviceInfo

from ._api import DriverApi

__all__ = ["nvml_details", "probe_device"]

_NVML_LOCK = threading.Lock()
_NVML_STARTED: dict[int, bool] = {}


def _attribute(drv: Any, device: Any, name: str) -> int | None:
    """One device attribute, ``None`` when this PyCUDA/driver does not know it."""
    attr = getattr(drv.device_attribute, name, None)
    if attr is None:
        return None
    try:
        return int(device.get_attribute(attr))
    except drv.Error:
        return None


def _nvml_started(nvml: Any) -> bool:
    with _NVML_LOCK:
        if id(nvml) not in _NVML_STARTED:
            try:
                nvml.nvmlInit()
                _NVML_STARTED[id(nvml)] = True
            except Exception:  # NVMLError: no NVML library, no permission
                _NVML_STARTED[id(nvml)] = False
        return _NVML_STARTED[id(nvml)]


def nvml_details(nvml: Any, pci_bus_id: str | None) -> dict[str, Any]:
    """What NVML adds for the device at ``pci_bus_id``: uuid, ECC mode and error count.

    Empty when NVML is absent, does not start or does not know the device; a field NVML
    refuses (ECC on a GeForce card) is simply left out.
    """
    if nvml is None or pci_bus_id is None or not _nvml_started(nvml):
        return {}
    try:
        handle = nvml.nvmlDeviceGetHandleByPciBusId(pci_bus_id)
    except Exception:
        return {}
    out: dict[str, Any] = {}
    # Each query stands alone: a card without ECC (GeForce) refuses some and answers others.
    with contextlib.suppress(Exception):
        uuid = nvml.nvmlDeviceGetUUID(handle)
        out["uuid"] = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
    with contextlib.suppress(Exception):
        current, _pending = nvml.nvmlDeviceGetEccMode(handle)
        out["ecc_enabled"] = bool(current)
    with contextlib.suppress(Exception):
        out["ecc_errors"] = int(
            nvml.nvmlDeviceGetTotalEccErrors(
                handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC
            )
        )
    return out


def probe_device(api: DriverApi, ordinal: int, free: int, total: int) -> DeviceInfo:
    """The :class:`~vramcore.backend.DeviceInfo` of CUDA device ``ordinal``."""
    drv = api.driver
    device = drv.Device(ordinal)
    try:
        pci_bus_id: str | None = str(device.pci_bus_id())
    except drv.Error:
        pci_bus_id = None
    ecc = _attribute(drv, device, "ECC_ENABLED")
    fields: dict[str, Any] = {
        "uuid": api.device_uuid(ordinal),
        "ecc_enabled": None if ecc is None else bool(ecc),
        "ecc_errors": None,
    }
    fields |= nvml_details(api.nvml, pci_bus_id)
    major, minor = device.compute_capability()
    return DeviceInfo(
        index=ordinal,
        name=str(device.name()),
        total_bytes=int(total),
        free_bytes=int(free),
        compute_capability=(int(major), int(minor)),
        pci_bus_id=pci_bus_id,
        integrated=bool(_attribute(drv, device, "INTEGRATED")),
        managed_memory=bool(_attribute(drv, device, "MANAGED_MEMORY")),
        pageable_memory_access=bool(_attribute(drv, device, "PAGEABLE_MEMORY_ACCESS")),
        host_page_tables=bool(
            _attribute(drv, device, "PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES")
        ),
        **fields,
    )
