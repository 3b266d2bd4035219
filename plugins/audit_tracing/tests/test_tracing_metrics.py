"""Metrics recorded from hand-made operations."""

from __future__ import annotations

from typing import Any

import pytest

from vramcore.errors import SealVerificationFailed
from vramcore.narration import Operation

BASE: dict[str, Any] = {"shard_id": "s1", "device": 0, "nbytes": 4096, "backend": "mock"}


def run_op(pm: Any, name: str, step: Any = None, **attributes: Any) -> Any:
    def run(op: Operation) -> Any:
        result = step(op) if step is not None else None
        op.attributes.setdefault("outcome", "ok")
        return result

    return pm.hook.vramcore_operation(op=Operation(name, run, **attributes))


def points(telemetry: Any, name: str) -> list[tuple[dict[str, Any], Any]]:
    found = telemetry.metrics().get(name, [])
    return sorted(
        ((dict(p.attributes), p) for p in found), key=lambda item: sorted(item[0].items())
    )


def test_seal_and_verify_durations_and_bytes(telemetry: Any, traced_pm: Any) -> None:
    run_op(traced_pm, "seal", **BASE)
    run_op(traced_pm, "verify", **BASE)
    run_op(traced_pm, "verify", **BASE)
    labels = {"vramcore.outcome": "ok", "vramcore.device": 0, "vramcore.backend": "mock"}
    [(attrs, seal)] = points(telemetry, "vramcore.seal.duration")
    assert attrs == labels
    assert seal.count == 1
    assert 0 < seal.sum < 1
    assert list(seal.explicit_bounds)[:3] == [0.001, 0.0025, 0.005]
    [(_, verify)] = points(telemetry, "vramcore.verify.duration")
    assert verify.count == 2
    [(_, sealed)] = points(telemetry, "vramcore.seal.bytes")
    assert sealed.value == 4096
    [(_, verified)] = points(telemetry, "vramcore.verify.bytes")
    assert verified.value == 8192
    assert points(telemetry, "vramcore.verify.failures") == []


def test_verification_failures_are_counted_not_verified(telemetry: Any, traced_pm: Any) -> None:
    def mismatch(op: Operation) -> None:
        op.attributes["outcome"] = "mismatch"
        raise SealVerificationFailed(
            "seal of shard s1 failed verification", shard_id="s1", reason="digest"
        )

    with pytest.raises(SealVerificationFailed):
        run_op(traced_pm, "verify", mismatch, **BASE)
    [(attrs, failures)] = points(telemetry, "vramcore.verify.failures")
    assert failures.value == 1
    assert attrs == {
        "vramcore.outcome": "mismatch",
        "vramcore.device": 0,
        "vramcore.backend": "mock",
        "error.type": "vramcore.errors.SealVerificationFailed",
    }
    assert points(telemetry, "vramcore.verify.bytes") == []
    [(_, duration)] = points(telemetry, "vramcore.verify.duration")
    assert duration.count == 1


def test_failed_seal_records_duration_but_no_bytes(telemetry: Any, traced_pm: Any) -> None:
    with pytest.raises(ValueError, match="bad"):
        run_op(traced_pm, "seal", lambda op: (_ for _ in ()).throw(ValueError("bad")), **BASE)
    [(attrs, duration)] = points(telemetry, "vramcore.seal.duration")
    assert attrs["vramcore.outcome"] == "error"
    assert duration.count == 1
    assert points(telemetry, "vramcore.seal.bytes") == []


def test_vram_gauges_follow_reported_capacity(telemetry: Any, traced_pm: Any) -> None:
    def allocate(op: Operation) -> None:
        op.attributes.update(vram_used=4096, vram_total=1 << 30)

    run_op(traced_pm, "allocate", allocate, **BASE, device_name="Mock GPU")
    [(attrs, used)] = points(telemetry, "vramcore.vram.used")
    assert attrs == {"vramcore.device": 0, "vramcore.device_name": "Mock GPU"}
    assert used.value == 4096
    [(_, total)] = points(telemetry, "vramcore.vram.total")
    assert total.value == 1 << 30

    run_op(traced_pm, "deallocate", lambda op: op.attributes.update(vram_used=0), **BASE)
    [(_, used)] = points(telemetry, "vramcore.vram.used")
    assert used.value == 0


def test_vram_used_falls_back_to_allocation_sizes(telemetry: Any, traced_pm: Any) -> None:
    run_op(traced_pm, "allocate", **BASE)
    run_op(traced_pm, "allocate", **(BASE | {"device": 1, "nbytes": 100}))
    run_op(traced_pm, "allocate", **BASE)
    run_op(traced_pm, "deallocate", **BASE)
    used = {
        attrs["vramcore.device"]: p.value for attrs, p in points(telemetry, "vramcore.vram.used")
    }
    assert used == {0: 4096, 1: 100}
    assert points(telemetry, "vramcore.vram.total") == []


def test_other_operations_record_no_seal_or_verify_metrics(telemetry: Any, traced_pm: Any) -> None:
    run_op(traced_pm, "copy", **BASE)
    run_op(traced_pm, "digest", **BASE)
    assert telemetry.metrics() == {}
