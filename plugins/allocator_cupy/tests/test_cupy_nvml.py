"""NVML health: read through a stand-in pynvml, carried on DeviceInfo, unknowns left unknown."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import vramcore_allocator_cupy._nvml as nvml_mod
from vramcore_allocator_cupy._nvml import NvmlHealth, nvml_health
from vramcore_allocator_cupy._probe import device_info


def fake_pynvml(*, refuse: frozenset[str] = frozenset(), pci_known: bool = True) -> Any:
    calls: list[str] = []

    def call(name: str, value: Any) -> Any:
        def fn(*_args: Any) -> Any:
            calls.append(name)
            if name in refuse:
                raise RuntimeError(f"NVMLError_NotSupported ({name})")
            return value

        return fn

    return SimpleNamespace(
        calls=calls,
        nvmlInit=call("init", None),
        nvmlShutdown=call("shutdown", None),
        nvmlDeviceGetHandleByPciBusId=call("by_pci", "h0" if pci_known else None),
        nvmlDeviceGetHandleByIndex=call("by_index", "h0"),
        nvmlDeviceGetEccMode=call("ecc_mode", (1, 1)),
        nvmlDeviceGetTotalEccErrors=call("ecc_errors", 3),
        nvmlDeviceGetRetiredPages=call("retired", ["p1", "p2"]),
        nvmlDeviceGetRemappedRows=call("remapped", (0, 2, True, False)),
        nvmlDeviceGetAddressingMode=call("addressing", 7),
        NVML_MEMORY_ERROR_TYPE_UNCORRECTED=1,
        NVML_AGGREGATE_ECC=1,
        NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR=1,
        NVML_DEVICE_ADDRESSING_MODE_HMM=7,
        NVML_DEVICE_ADDRESSING_MODE_ATS=8,
        NVML_DEVICE_ADDRESSING_MODE_NONE=0,
    )


def test_health_is_read_and_nvml_is_shut_down() -> None:
    nv = fake_pynvml()
    health = nvml_health(0, "00000000:17:00.0", import_nvml=lambda: nv)
    assert health == NvmlHealth(
        ecc_enabled=True,
        uncorrected_ecc=3,
        retired_pages=2,
        remapped_rows_uncorrectable=2,
        remap_pending=True,
        remap_failed=False,
        addressing_mode="hmm",
    )
    assert nv.calls[0] == "init" and nv.calls[-1] == "shutdown"


def test_queries_a_card_refuses_stay_unknown() -> None:
    nv = fake_pynvml(
        refuse=frozenset({"ecc_mode", "ecc_errors", "retired", "remapped", "addressing"})
    )
    health = nvml_health(0, None, import_nvml=lambda: nv)
    assert health == NvmlHealth()  # every field None: unknown, not zero
    assert "by_pci" not in nv.calls  # no PCI id: found by index


def test_no_pynvml_means_no_health() -> None:
    def missing() -> Any:
        raise ImportError("No module named 'pynvml'")

    assert nvml_health(0, None, import_nvml=missing) is None


def test_device_info_carries_the_health(fake_cuda: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    reported = NvmlHealth(
        ecc_enabled=True,
        uncorrected_ecc=0,
        retired_pages=None,
        remapped_rows_uncorrectable=1,
        remap_pending=False,
        remap_failed=True,
        addressing_mode="ats",
    )
    monkeypatch.setattr(nvml_mod, "nvml_health", lambda index, pci: reported)
    info = device_info(fake_cuda, 0, nvml=True)
    assert info.ecc_errors == 0
    assert info.health["remap_failed"] is True
    assert info.health["addressing_mode"] == "ats"
    assert info.health["retired_pages"] is None
    assert info.to_dict()["health"]["remapped_rows_uncorrectable"] == 1  # type: ignore[index]
    assert device_info(fake_cuda, 0, nvml=False).health == {}
