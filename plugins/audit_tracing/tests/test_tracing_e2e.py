"""End to end on the mock backend: seal -> verify -> corrupted verify -> deallocate."""

from __future__ import annotations

import base64
import contextlib
import logging
from typing import Any

import attrs
import pytest
import vramcore_allocator_mock
from opentelemetry.trace import StatusCode

from vramcore import VramManager
from vramcore._context import correlate
from vramcore.errors import SealVerificationFailed
from vramcore.plugins import get_plugin_manager
from vramcore.seal import SEAL_KEY_INFO, WorkerToken
from vramcore.testing import TEST_TOKEN, CapturePlugin, CapturingSink

MIB = 1 << 20
CAPACITY = 1 << 30


def run_sequence(plugins: list[object], tracer: Any = None) -> dict[str, Any]:
    """Seal, verify, corrupt, verify again, deallocate; return what a caller observes."""
    capture = CapturingSink()
    backend = vramcore_allocator_mock.MockBackend(devices=1, capacity=CAPACITY)
    pm = get_plugin_manager(
        [vramcore_allocator_mock, CapturePlugin(capture), *plugins], load_entrypoints=False
    )
    manager = VramManager(TEST_TOKEN, allocator=backend, worker_id="w1", plugin_manager=pm)
    data = bytes(range(256)) * (MIB // 256)
    outcome: dict[str, Any] = {"capture": capture, "manager": manager}
    with manager:
        request = tracer.start_as_current_span("request") if tracer else contextlib.nullcontext()
        with request, correlate("req-1"):
            shard = manager.seal_model(data, shard_id="shard-a")
            manager.verify_sealed(shard)
            with manager.verified(shard) as buffer:
                pass
            backend.flip_bit(buffer, 70000, bit=3)
            with pytest.raises(SealVerificationFailed) as failed:
                manager.verify_sealed(shard)
            manager.deallocate(shard)
        outcome["used_after"] = manager.used_vram()
    outcome["shard"] = shard
    outcome["error"] = (type(failed.value), str(failed.value))
    return outcome


@pytest.fixture
def traced_run(telemetry: Any, caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    caplog.set_level(logging.DEBUG, logger="vramcore")
    return run_sequence([telemetry.plugin], tracer=telemetry.tracer)


def children(telemetry: Any, parent: Any) -> list[str]:
    return [
        s.name
        for s in sorted(telemetry.spans(), key=lambda s: s.start_time)
        if s.parent is not None and s.parent.span_id == parent.context.span_id
    ]


def test_span_tree(telemetry: Any, traced_run: dict[str, Any]) -> None:
    request = telemetry.span("request")
    assert children(telemetry, request) == [
        "vramcore.seal",
        "vramcore.verify",
        "vramcore.verify",  # verified()
        "vramcore.verify",  # after the bit flip
        "vramcore.deallocate",
    ]
    seal = telemetry.span("vramcore.seal")
    assert children(telemetry, seal) == ["vramcore.allocate", "vramcore.copy", "vramcore.digest"]
    for index in range(3):
        assert children(telemetry, telemetry.span("vramcore.verify", index)) == ["vramcore.digest"]
    trace_ids = {s.context.trace_id for s in telemetry.spans()}
    assert trace_ids == {request.context.trace_id}


def test_span_attributes(telemetry: Any, traced_run: dict[str, Any]) -> None:
    seal = telemetry.span("vramcore.seal")
    common = {
        "vramcore.shard_id": "shard-a",
        "vramcore.device": 0,
        "vramcore.device_name": "vramcore mock GPU",
        "vramcore.nbytes": MIB,
        "vramcore.backend": "mock",
        "vramcore.correlation_id": "req-1",
    }
    assert dict(seal.attributes) == common | {
        "vramcore.digest_alg": "rfc6962-sha256",
        "vramcore.leaf_size": 65536,
        "vramcore.leaf_count": 16,
        "vramcore.cross_check": "sample",
        "vramcore.outcome": "ok",
    }
    allocate = telemetry.span("vramcore.allocate")
    assert allocate.attributes["vramcore.vram_total"] == CAPACITY
    assert allocate.attributes["vramcore.vram_used"] == MIB
    digest = telemetry.span("vramcore.digest")
    assert digest.attributes["vramcore.source"] == "host"
    assert digest.attributes["vramcore.leaf_count"] == 16
    for span in telemetry.spans():
        if span.name != "request":
            assert span.attributes["vramcore.correlation_id"] == "req-1"


def test_verification_failure_inside_its_span(telemetry: Any, traced_run: dict[str, Any]) -> None:
    ok = telemetry.span("vramcore.verify", 0)
    assert ok.status.status_code == StatusCode.UNSET
    assert [e.name for e in ok.events] == ["seal.verified"]
    failed = telemetry.span("vramcore.verify", 2)
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.attributes["vramcore.outcome"] == "mismatch"
    assert failed.attributes["error.type"] == "vramcore.errors.SealVerificationFailed"
    event, exception = failed.events
    assert event.name == "seal.verification_failed"
    assert event.attributes["vramcore.severity"] == "critical"
    assert event.attributes["vramcore.severity_number"] == 21
    assert event.attributes["vramcore.reason"] == "digest"
    assert event.attributes["vramcore.byte_ranges"] == ("65536-131072",)
    assert event.attributes["vramcore.correlation_id"] == "req-1"
    assert exception.name == "exception"
    assert "bytes 65536-131071" in exception.attributes["exception.message"]


def test_audit_events_land_on_the_span_of_their_step(
    telemetry: Any, traced_run: dict[str, Any]
) -> None:
    def names(span: Any) -> list[str]:
        return [e.name for e in span.events]

    assert names(telemetry.span("vramcore.allocate")) == ["vram.allocated"]
    assert names(telemetry.span("vramcore.seal")) == ["vram.sealed"]
    assert names(telemetry.span("vramcore.deallocate")) == ["vram.deallocated"]
    sealed = telemetry.span("vramcore.seal").events[0]
    assert sealed.attributes["vramcore.digest"] == traced_run["shard"].digest
    assert sealed.attributes["vramcore.severity"] == "info"


def test_metrics(telemetry: Any, traced_run: dict[str, Any]) -> None:
    metrics = telemetry.metrics()
    [seal] = metrics["vramcore.seal.duration"]
    assert seal.count == 1
    verify = {p.attributes["vramcore.outcome"]: p for p in metrics["vramcore.verify.duration"]}
    assert verify["ok"].count == 2
    assert verify["mismatch"].count == 1
    assert [p.value for p in metrics["vramcore.seal.bytes"]] == [MIB]
    assert [p.value for p in metrics["vramcore.verify.bytes"]] == [2 * MIB]
    [failure] = metrics["vramcore.verify.failures"]
    assert failure.value == 1
    assert failure.attributes["vramcore.outcome"] == "mismatch"
    [used] = metrics["vramcore.vram.used"]
    assert used.value == 0
    assert used.attributes["vramcore.device"] == 0
    [total] = metrics["vramcore.vram.total"]
    assert total.value == CAPACITY
    assert "vramcore.audit.sink_failures" not in metrics


def test_narration_and_event_logs(
    traced_run: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    records = caplog.get_records("setup")  # the sequence runs in the fixture
    narration = [r for r in records if r.name == "vramcore.narration"]
    top = [r.getMessage() for r in narration if r.levelno >= logging.INFO]
    assert top[0].startswith("sealed 1.0 MiB shard 'shard-a' on GPU 0 (vramcore mock GPU) in ")
    assert top[1].startswith("verified 1.0 MiB shard 'shard-a' on GPU 0")
    assert "FAILED" in top[3]
    assert "SealVerificationFailed" in top[3]
    assert top[4].startswith("deallocated 1.0 MiB shard 'shard-a'")
    assert all(m.endswith("[correlation_id=req-1]") for m in top)
    levels = {r.getMessage().split()[0]: r.levelno for r in records if r.name == "vramcore.events"}
    assert levels["seal.verification_failed"] == logging.CRITICAL
    assert levels["vram.sealed"] == logging.INFO


def _secret_forms(shard: Any) -> list[str]:
    token = WorkerToken(TEST_TOKEN)
    key = bytes(token.derive(SEAL_KEY_INFO)._key)
    signature = shard.signature

    return [
        TEST_TOKEN,
        key.hex(),
        repr(key),
        base64.b64encode(key).decode(),
        signature.hex(),
        repr(signature),
        base64.b64encode(signature).decode(),
    ]


def _all_values(telemetry: Any, caplog: pytest.LogCaptureFixture) -> list[str]:
    values: list[str] = []
    for span in telemetry.spans():
        values.append(span.name)
        values.append(span.status.description or "")
        values.extend(repr(v) for v in span.attributes.values())
        for event in span.events:
            values.append(event.name)
            values.extend(repr(v) for v in event.attributes.values())
    for name, points in telemetry.metrics().items():
        values.append(name)
        for point in points:
            values.extend(repr(v) for v in point.attributes.values())
    for record in caplog.get_records("setup"):
        values.append(record.getMessage())
        values.extend(repr(v) for k, v in record.__dict__.items() if k.startswith("vramcore."))
    return values


def test_no_secret_anywhere(
    telemetry: Any, traced_run: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    secrets = _secret_forms(traced_run["shard"])
    values = _all_values(telemetry, caplog)
    assert len(values) > 200
    for value in values:
        for secret in secrets:
            assert secret not in value
        assert "0x7f" not in value.lower()  # no pointer-looking value either


def _comparable(outcome: dict[str, Any]) -> dict[str, Any]:
    events = []
    for event in outcome["capture"].events:
        data = event.to_dict()
        data.pop("timestamp")
        events.append(data)
    shard = attrs.asdict(outcome["shard"])
    for volatile in ("sealed_at", "signature"):
        shard.pop(volatile)
    return {
        "events": events,
        "shard": shard,
        "error": outcome["error"],
        "used_after": outcome["used_after"],
    }


def test_plugin_changes_nothing_else(telemetry: Any) -> None:
    without = run_sequence([])
    with_plugin = run_sequence([telemetry.plugin], tracer=telemetry.tracer)
    assert _comparable(with_plugin) == _comparable(without)
    assert len(telemetry.spans()) > 0
    sinks = {sink.name for sink in with_plugin["manager"].sinks}
    assert sinks == {"capture", "audit_tracing"}


def test_installed_plugin_without_sdk_changes_nothing(telemetry: Any) -> None:
    import vramcore_audit_tracing

    without = run_sequence([])
    with_module = run_sequence([vramcore_audit_tracing])
    assert _comparable(with_module) == _comparable(without)


def test_disable_plugins_env_skips_the_entry_point() -> None:
    enabled = get_plugin_manager(env={"VRAMCORE_PLUGINS": "audit_tracing"})
    assert enabled.has_plugin("audit_tracing")
    disabled = get_plugin_manager(
        env={"VRAMCORE_PLUGINS": "audit_tracing", "VRAMCORE_DISABLE_PLUGINS": "audit_tracing"}
    )
    assert not disabled.has_plugin("audit_tracing")
    [info] = [p for p in enabled.loaded if p.name == "audit_tracing"]
    assert info.distribution == "vramcore-audit-tracing"
    assert info.hooks == (
        "vramcore_audit_failure",
        "vramcore_audit_sinks",
        "vramcore_audit_witnesses",
        "vramcore_operation",
        "vramcore_settings",
    )


def test_sink_failure_is_counted_on_the_span_of_its_step(telemetry: Any) -> None:
    from vramcore.testing import FailingSink

    backend = vramcore_allocator_mock.MockBackend(devices=1, capacity=CAPACITY)
    pm = get_plugin_manager(
        [
            vramcore_allocator_mock,
            CapturePlugin(CapturingSink(), FailingSink(["vram.allocated"])),
            telemetry.plugin,
        ],
        load_entrypoints=False,
    )
    with VramManager(TEST_TOKEN, allocator=backend, worker_id="w1", plugin_manager=pm) as vram:
        vram.seal_model(b"x" * 4096, shard_id="s1")  # a non-critical event: the seal goes on
    allocate = telemetry.span("vramcore.allocate")
    failure = [e for e in allocate.events if e.name == "vramcore.audit.sink_failure"]
    assert [dict(e.attributes) for e in failure] == [
        {
            "vramcore.sink": "failing",
            "vramcore.event_type": "vram.allocated",
            "error.type": "OSError",
        }
    ]
    [point] = telemetry.metrics()["vramcore.audit.sink_failures"]
    assert point.value == 1


def test_correlation_from_baggage_reaches_spans_and_events(telemetry: Any) -> None:
    from opentelemetry import baggage, context

    backend = vramcore_allocator_mock.MockBackend(devices=1, capacity=CAPACITY)
    pm = get_plugin_manager(
        [vramcore_allocator_mock, CapturePlugin(CapturingSink()), telemetry.plugin],
        load_entrypoints=False,
    )
    with VramManager(TEST_TOKEN, allocator=backend, worker_id="w1", plugin_manager=pm) as vram:
        token = context.attach(baggage.set_baggage("vramcore.correlation_id", "trace-req-5"))
        try:
            shard = vram.seal_model(b"y" * 8192, shard_id="s2")
            vram.verify_sealed(shard)
        finally:
            context.detach(token)
    # close() deallocates the shard afterwards, outside the request: that span has no id.
    spans = [s for s in telemetry.spans() if s.name != "vramcore.deallocate"]
    assert len(spans) == 6
    assert "vramcore.correlation_id" not in telemetry.span("vramcore.deallocate").attributes
    for span in spans:
        assert span.attributes["vramcore.correlation_id"] == "trace-req-5"
        for event in span.events:
            assert event.attributes["vramcore.correlation_id"] == "trace-req-5"
    assert sum(len(s.events) for s in spans) == 3
