"""The VRAM-only policy: devices refused at start, non-device allocations refused on seal."""

from __future__ import annotations

from typing import Any

import pytest
from vramcore_allocator_mock import MockBackend

from vramcore import MemoryKind, VramPolicy
from vramcore.backend import DeviceInfo
from vramcore.errors import PolicyViolation
from vramcore.testing import CapturingSink


@pytest.mark.parametrize(
    ("flags", "rule"),
    [
        ({"integrated": True}, "integrated"),
        ({"pageable_memory_access": True, "host_page_tables": True}, "ats"),
        ({"pageable_memory_access": True, "host_page_tables": False}, "hmm"),
        ({"ecc_enabled": False}, "ecc"),
    ],
)
def test_device_refused_at_start_with_an_audit_event(
    new_manager: Any, mock_backend: Any, flags: dict[str, bool], rule: str
) -> None:
    mock_backend.set_device_flags(0, **flags)
    sink = CapturingSink()
    policy = VramPolicy(require_ecc=True, strict_host_isolation=True)
    with pytest.raises(PolicyViolation) as info:
        new_manager(mock_backend, sink=sink, policy=policy, worker_id="w1")
    assert info.value.rule == rule
    assert info.value.device == 0
    assert info.value.fatal
    (event,) = sink.events
    assert event.event_type == "policy.violation"
    assert event.rule == rule  # type: ignore[attr-defined]
    assert event.device == 0  # type: ignore[attr-defined]
    assert event.worker_id == "w1"
    assert event.severity == "critical"
    assert sink.closed  # the refused manager released its sinks
    assert mock_backend.allocations == 0


def test_integrated_device_message(new_manager: Any, mock_backend: Any) -> None:
    mock_backend.set_device_flags(0, integrated=True)
    with pytest.raises(PolicyViolation, match="integrated: its memory is host RAM"):
        new_manager(mock_backend, audit="disabled")


def test_every_broken_rule_is_audited(new_manager: Any, mock_backend: Any) -> None:
    mock_backend.set_device_flags(
        0, integrated=True, pageable_memory_access=True, host_page_tables=True
    )
    sink = CapturingSink()
    with pytest.raises(PolicyViolation) as info:
        new_manager(mock_backend, sink=sink, policy=VramPolicy(strict_host_isolation=True))
    assert info.value.rule == "integrated"
    assert [e.rule for e in sink.events] == ["integrated", "ats"]  # type: ignore[attr-defined]
    assert "ATS" in str(info.value)


@pytest.mark.parametrize(("host_page_tables", "rule"), [(True, "ats"), (False, "hmm")])
def test_pageable_host_access_is_reported_not_refused_by_default(
    new_manager: Any, mock_backend: Any, host_page_tables: bool, rule: str
) -> None:
    # An H100 on a current driver reports HMM; its cudaMalloc'd shards stay in HBM and every
    # allocation is still checked to be plain device memory.
    mock_backend.set_device_flags(0, pageable_memory_access=True, host_page_tables=host_page_tables)
    sink = CapturingSink()
    manager = new_manager(mock_backend, sink=sink)
    (event,) = sink.of_type("policy.violation")
    assert event.rule == rule  # type: ignore[attr-defined]
    assert event.severity == "warning"
    assert "reported" in event.detail  # type: ignore[attr-defined]
    manager.verify_sealed(manager.seal_model(b"x" * 100))
    mock_backend.hand_out(MemoryKind.MANAGED)  # the per-allocation check is never relaxed
    with pytest.raises(PolicyViolation, match="managed"):
        manager.seal_model(b"y" * 100)


def test_strict_host_isolation_refuses_pageable_host_access(
    new_manager: Any, mock_backend: Any
) -> None:
    mock_backend.set_device_flags(0, pageable_memory_access=True)
    with pytest.raises(PolicyViolation, match="HMM") as info:
        new_manager(mock_backend, audit="disabled", policy=VramPolicy(strict_host_isolation=True))
    assert info.value.rule == "hmm"


def test_no_policy_setting_excuses_an_integrated_gpu(new_manager: Any, mock_backend: Any) -> None:
    mock_backend.set_device_flags(0, integrated=True)
    for policy in (VramPolicy(), VramPolicy(strict_host_isolation=False)):
        with pytest.raises(PolicyViolation):
            new_manager(mock_backend, audit="disabled", policy=policy)


def test_policy_checks_the_managers_own_device(new_manager: Any) -> None:
    backend = MockBackend(devices=2, capacity=1 << 24)
    backend.set_device_flags(1, integrated=True)
    new_manager(backend, device=0, audit="disabled")  # GPU 0 is fine
    with pytest.raises(PolicyViolation) as info:
        new_manager(backend, device=1, audit="disabled")
    assert info.value.device == 1


def test_ecc_is_only_required_when_asked(new_manager: Any, mock_backend: Any) -> None:
    mock_backend.set_device_flags(0, ecc_enabled=False)
    new_manager(mock_backend, audit="disabled")
    assert (
        VramPolicy(require_ecc=True)
        .check_device(DeviceInfo(index=0, name="g", total_bytes=1, free_bytes=1, ecc_enabled=None))[
            0
        ]
        .detail.endswith("ECC unknown")
    )


def test_supporting_managed_memory_is_not_a_violation() -> None:
    info = DeviceInfo(index=0, name="g", total_bytes=1, free_bytes=1, managed_memory=True)
    assert VramPolicy().check_device(info) == []


@pytest.mark.parametrize(
    ("kind", "rule"),
    [
        (MemoryKind.MANAGED, "managed"),
        (MemoryKind.HOST_MAPPED, "host_memory"),
        (MemoryKind.HOST, "host_memory"),
        (MemoryKind.UNKNOWN, "host_memory"),
    ],
)
def test_non_device_allocation_is_refused_on_seal(
    mock_manager: Any,
    mock_backend: Any,
    audit_capture: CapturingSink,
    snapshot: Any,
    kind: MemoryKind,
    rule: str,
) -> None:
    before = snapshot()
    mock_backend.hand_out(kind)
    with pytest.raises(PolicyViolation) as info:
        mock_manager.seal_model(b"w" * 5000, shard_id="s")
    assert info.value.rule == rule
    assert kind.value in str(info.value)
    assert snapshot() == before
    assert mock_backend.allocations == 1  # it was allocated, checked, and freed
    types = audit_capture.types()
    assert types[0] == "policy.violation"
    assert "vram.allocation_failed" in types
    assert "vram.sealed" not in types
    assert mock_manager.shards() == []
    mock_backend.hand_out(MemoryKind.DEVICE)
    mock_manager.seal_model(b"w" * 5000, shard_id="s")  # fine again


def test_managed_allocation_from_seal_file(
    mock_manager: Any, mock_backend: Any, snapshot: Any, safetensors_file: Any
) -> None:
    before = snapshot()
    mock_backend.hand_out(MemoryKind.MANAGED)
    with pytest.raises(PolicyViolation):
        mock_manager.seal_file(safetensors_file)
    assert snapshot() == before
