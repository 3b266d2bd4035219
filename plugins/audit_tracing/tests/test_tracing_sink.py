"""The tracing audit sink and the sink-failure hook."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from opentelemetry import baggage, context
from vramcore_audit_tracing import TracingPlugin

from vramcore.audit import AuditSink, SinkContext
from vramcore.events import SealVerificationFailed, VramAllocated, VramSealed
from vramcore.seal import WorkerToken

TOKEN = "Z6wAaVZ3oziYULV1vRoCP1YKkpgVUjCArMtGVlOPhU8"


def make_sink(pm: Any, **kwargs: Any) -> AuditSink:
    ctx = SinkContext.from_token(WorkerToken(TOKEN), worker_id="w1", device=0)
    sinks = [s for group in pm.hook.vramcore_audit_sinks(context=ctx) for s in group]
    [sink] = sinks
    return sink


def failed_event(**kwargs: Any) -> SealVerificationFailed:
    return SealVerificationFailed(
        worker_id="w1",
        shard_id="s1",
        device=0,
        reason="digest",
        detail="the bytes in VRAM changed since sealing: bytes 0-65535",
        byte_ranges=((0, 65536), (131072, 196608)),
        tensors=("model.layers.0.weight",),
        **kwargs,
    )


def test_event_becomes_a_span_event_with_severity(telemetry: Any, traced_pm: Any) -> None:
    sink = make_sink(traced_pm)
    with telemetry.tracer.start_as_current_span("request"):
        sink.emit(failed_event(correlation_id="req-9"))
    [event] = telemetry.span("request").events
    assert event.name == "seal.verification_failed"
    assert dict(event.attributes) == {
        "vramcore.event_type": "seal.verification_failed",
        "vramcore.severity": "critical",
        "vramcore.severity_number": 21,
        "vramcore.worker_id": "w1",
        "vramcore.shard_id": "s1",
        "vramcore.device": 0,
        "vramcore.reason": "digest",
        "vramcore.detail": "the bytes in VRAM changed since sealing: bytes 0-65535",
        "vramcore.byte_ranges": ("0-65536", "131072-196608"),
        "vramcore.tensors": ("model.layers.0.weight",),
        "vramcore.correlation_id": "req-9",
    }


def test_event_timestamp_is_the_events_own(telemetry: Any, traced_pm: Any) -> None:
    sink = make_sink(traced_pm)
    event = VramAllocated(worker_id="w1", shard_id="s1", device=0, nbytes=10, backend="mock")
    with telemetry.tracer.start_as_current_span("request"):
        sink.emit(event)
    [span_event] = telemetry.span("request").events
    assert span_event.timestamp == int(event.timestamp.timestamp() * 1_000_000) * 1000
    assert span_event.attributes["vramcore.severity"] == "info"
    assert span_event.attributes["vramcore.severity_number"] == 9


def test_event_takes_correlation_from_baggage(telemetry: Any, traced_pm: Any) -> None:
    sink = make_sink(traced_pm)
    token = context.attach(baggage.set_baggage("vramcore.correlation_id", "bag-1"))
    try:
        with telemetry.tracer.start_as_current_span("request"):
            sink.emit(failed_event())
    finally:
        context.detach(token)
    [event] = telemetry.span("request").events
    assert event.attributes["vramcore.correlation_id"] == "bag-1"


def test_event_is_logged_with_mapped_level_and_attributes(
    traced_pm: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vramcore.events")
    sink = make_sink(traced_pm)
    sink.emit(failed_event())
    sealed = VramSealed(
        worker_id="w1",
        shard_id="s2",
        device=0,
        nbytes=4096,
        digest="ab" * 32,
        digest_alg="rfc6962-sha256",
        leaf_size=65536,
        backend="mock",
    )
    sink.emit(sealed)
    records = [r for r in caplog.records if r.name == "vramcore.events"]
    assert [r.levelno for r in records] == [logging.CRITICAL, logging.INFO]
    assert (
        records[0]
        .getMessage()
        .startswith("seal.verification_failed severity=critical worker_id=w1 shard_id=s1 device=0")
    )
    assert records[0].__dict__["vramcore.byte_ranges"] == ["0-65536", "131072-196608"]
    assert records[1].__dict__["vramcore.digest"] == "ab" * 32
    assert records[1].__dict__["vramcore.severity_number"] == 9
    assert "vramcore.file_sha256" not in records[1].__dict__  # empty fields are left out


def test_sink_outside_any_span_only_logs(
    telemetry: Any, traced_pm: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vramcore.events")
    make_sink(traced_pm).emit(failed_event())
    assert telemetry.spans() == []
    assert [r.levelno for r in caplog.records if r.name == "vramcore.events"] == [logging.CRITICAL]


def test_sink_never_raises(telemetry: Any, caplog: pytest.LogCaptureFixture) -> None:
    class BrokenLogger(logging.Logger):
        def log(self, *args: Any, **kwargs: Any) -> None:
            raise OSError("disk full")

    plugin = TracingPlugin(
        tracer_provider=telemetry.tracer_provider,
        meter_provider=telemetry.meter_provider,
        events_logger=BrokenLogger("broken"),
    )
    from vramcore.plugins import get_plugin_manager

    sink = make_sink(get_plugin_manager([plugin], load_entrypoints=False))
    sink.emit(failed_event())  # must not raise: tracing is best effort
    assert any("tracing sink could not record" in r.getMessage() for r in caplog.records)


def test_log_events_can_be_turned_off(telemetry: Any, caplog: pytest.LogCaptureFixture) -> None:
    from vramcore.plugins import get_plugin_manager

    caplog.set_level(logging.DEBUG)
    plugin = TracingPlugin(tracer_provider=telemetry.tracer_provider, log_events=False)
    sink = make_sink(get_plugin_manager([plugin], load_entrypoints=False))
    with telemetry.tracer.start_as_current_span("request"):
        sink.emit(failed_event())
    assert [r for r in caplog.records if r.name == "vramcore.events"] == []
    assert len(telemetry.span("request").events) == 1
    assert sink.report() == {"events": 1}


def test_audit_failure_hook_counts_and_marks_the_span(telemetry: Any, traced_pm: Any) -> None:
    with telemetry.tracer.start_as_current_span("request"):
        traced_pm.hook.vramcore_audit_failure(
            sink_name="audit_chain", event=failed_event(), error=OSError("/var/log full")
        )
    [event] = telemetry.span("request").events
    assert event.name == "vramcore.audit.sink_failure"
    assert dict(event.attributes) == {
        "vramcore.sink": "audit_chain",
        "vramcore.event_type": "seal.verification_failed",
        "error.type": "OSError",
    }
    [point] = telemetry.metrics()["vramcore.audit.sink_failures"]
    assert point.value == 1
    assert dict(point.attributes) == {
        "vramcore.sink": "audit_chain",
        "vramcore.event_type": "seal.verification_failed",
        "error.type": "OSError",
    }
