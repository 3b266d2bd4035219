"""The plugin's hooks, called through a plugin manager with hand-made operations."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from opentelemetry import baggage, context, trace
from opentelemetry.trace import StatusCode

from vramcore._context import correlate
from vramcore.errors import InsufficientVram
from vramcore.narration import Operation
from vramcore.plugins import get_plugin_manager

BASE: dict[str, Any] = {
    "shard_id": "s1",
    "device": 0,
    "device_name": "Mock GPU",
    "nbytes": 1 << 20,
    "backend": "mock",
}


def run_op(pm: Any, name: str, step: Any = None, **attributes: Any) -> Any:
    def run(op: Operation) -> Any:
        result = step(op) if step is not None else None
        op.attributes.setdefault("outcome", "ok")
        return result

    return pm.hook.vramcore_operation(op=Operation(name, run, **attributes))


def test_span_carries_allowlisted_attributes_read_after_the_step(
    telemetry: Any, traced_pm: Any
) -> None:
    def step(op: Operation) -> str:
        op.attributes["leaf_count"] = 16
        return "the-result"

    attributes = BASE | {"digest_alg": "rfc6962-sha256", "leaf_size": 65536}
    assert run_op(traced_pm, "seal", step, **attributes) == "the-result"
    span = telemetry.span("vramcore.seal")
    assert span.kind == trace.SpanKind.INTERNAL
    assert dict(span.attributes) == {
        "vramcore.shard_id": "s1",
        "vramcore.device": 0,
        "vramcore.device_name": "Mock GPU",
        "vramcore.nbytes": 1 << 20,
        "vramcore.backend": "mock",
        "vramcore.digest_alg": "rfc6962-sha256",
        "vramcore.leaf_size": 65536,
        "vramcore.leaf_count": 16,
        "vramcore.outcome": "ok",
    }
    assert span.status.status_code == StatusCode.UNSET


def test_unknown_keys_and_wrong_types_never_reach_a_span(telemetry: Any, traced_pm: Any) -> None:
    run_op(
        traced_pm,
        "copy",
        shard_id="s1",
        device=True,  # a bool is not a device index
        nbytes="1024",  # a string is not a byte count
        pointer=0x7F00DEADBEEF,
        signature="c2lnbmF0dXJl",
        device_name="evil\x1b[31mname\u202e",
        offset=4096,  # not an attribute the core defines: dropped
    )
    attributes = dict(telemetry.span("vramcore.copy").attributes)
    assert attributes == {
        "vramcore.shard_id": "s1",
        "vramcore.device_name": "evil?[31mname?",
        "vramcore.outcome": "ok",
    }


def test_nested_operations_nest_their_spans(telemetry: Any, traced_pm: Any) -> None:
    def seal(op: Operation) -> None:
        run_op(traced_pm, "allocate", **BASE)
        run_op(traced_pm, "copy", **BASE, offset=0)
        run_op(traced_pm, "digest", shard_id="s1", source="host")

    with telemetry.tracer.start_as_current_span("request") as request:
        run_op(traced_pm, "seal", seal, **BASE)
    seal_span = telemetry.span("vramcore.seal")
    assert seal_span.parent is not None
    assert seal_span.parent.span_id == request.get_span_context().span_id
    children = [
        s for s in telemetry.spans() if s.parent and s.parent.span_id == seal_span.context.span_id
    ]
    assert [s.name for s in children] == ["vramcore.allocate", "vramcore.copy", "vramcore.digest"]
    assert {s.context.trace_id for s in telemetry.spans()} == {request.get_span_context().trace_id}


def test_vramcore_error_is_recorded_and_reraised_unchanged(telemetry: Any, traced_pm: Any) -> None:
    error = InsufficientVram(2048, 1024, device=0)

    def step(op: Operation) -> None:
        op.attributes["outcome"] = "error"
        raise error

    with pytest.raises(InsufficientVram) as raised:
        run_op(traced_pm, "allocate", step, **BASE)
    assert raised.value is error
    span = telemetry.span("vramcore.allocate")
    assert span.status.status_code == StatusCode.ERROR
    assert span.status.description.startswith("InsufficientVram: not enough VRAM on GPU 0")
    assert span.attributes["error.type"] == "vramcore.errors.InsufficientVram"
    assert span.attributes["vramcore.outcome"] == "error"
    [exception] = [e for e in span.events if e.name == "exception"]
    assert exception.attributes["exception.type"] == "vramcore.errors.InsufficientVram"
    assert "need 2048 bytes" in exception.attributes["exception.message"]
    assert "test_tracing_hooks.py" in exception.attributes["exception.stacktrace"]


def test_foreign_error_message_is_withheld(telemetry: Any, traced_pm: Any) -> None:
    def step(op: Operation) -> None:
        raise RuntimeError("driver said: bad pointer 0x7f00deadbeef")

    with pytest.raises(RuntimeError, match="0x7f00deadbeef"):
        run_op(traced_pm, "copy", step, **BASE)
    span = telemetry.span("vramcore.copy")
    assert span.attributes["error.type"] == "RuntimeError"
    assert span.attributes["vramcore.outcome"] == "error"
    [exception] = span.events
    assert exception.attributes["exception.message"] == ""
    assert "deadbeef" not in str(dict(exception.attributes))
    assert "deadbeef" not in (span.status.description or "")


def test_mismatch_outcome_marks_the_span_failed(telemetry: Any, traced_pm: Any) -> None:
    run_op(traced_pm, "verify", lambda op: op.attributes.update(outcome="mismatch"), **BASE)
    span = telemetry.span("vramcore.verify")
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["vramcore.outcome"] == "mismatch"


def test_correlation_id_from_correlate(telemetry: Any, traced_pm: Any) -> None:
    with correlate("req-42"):
        run_op(traced_pm, "verify", **BASE)
    assert telemetry.span("vramcore.verify").attributes["vramcore.correlation_id"] == "req-42"


def test_correlation_id_from_baggage_and_explicit_wins(telemetry: Any, traced_pm: Any) -> None:
    token = context.attach(baggage.set_baggage("vramcore.correlation_id", "from-baggage\x1b"))
    try:
        run_op(traced_pm, "verify", **BASE)
        with correlate("explicit"):
            run_op(traced_pm, "deallocate", **BASE)
    finally:
        context.detach(token)
    assert telemetry.span("vramcore.verify").attributes["vramcore.correlation_id"] == (
        "from-baggage?"
    )
    assert telemetry.span("vramcore.deallocate").attributes["vramcore.correlation_id"] == (
        "explicit"
    )


def test_no_correlation_attribute_without_one(telemetry: Any, traced_pm: Any) -> None:
    run_op(traced_pm, "verify", **BASE)
    assert "vramcore.correlation_id" not in telemetry.span("vramcore.verify").attributes


def test_narration_lines(telemetry: Any, traced_pm: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="vramcore.narration")

    def seal(op: Operation) -> None:
        run_op(traced_pm, "allocate", **BASE)

    with correlate("req-7"):
        run_op(traced_pm, "seal", seal, **BASE)
    run_op(traced_pm, "verify", lambda op: op.attributes.update(outcome="mismatch"), **BASE)
    records = [
        (r.levelno, r.getMessage()) for r in caplog.records if r.name == "vramcore.narration"
    ]
    assert [level for level, _ in records] == [logging.DEBUG, logging.INFO, logging.ERROR]
    assert records[0][1].startswith("allocated 1.0 MiB shard 's1' on GPU 0 (Mock GPU) in ")
    assert records[1][1].startswith("sealed 1.0 MiB shard 's1' on GPU 0 (Mock GPU) in ")
    assert records[1][1].endswith(" ms [correlation_id=req-7]")
    assert records[2][1].startswith("verify of 1.0 MiB shard 's1' on GPU 0 (Mock GPU) FAILED")
    assert records[2][1].endswith(": digest mismatch")


def test_narration_line_of_a_failure_names_the_error(
    traced_pm: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vramcore.narration")

    def step(op: Operation) -> None:
        raise InsufficientVram(10, 5, device=0)

    with pytest.raises(InsufficientVram):
        run_op(traced_pm, "seal", step, **BASE)
    [record] = [r for r in caplog.records if r.name == "vramcore.narration"]
    assert record.levelno == logging.WARNING
    assert "seal of 1.0 MiB shard 's1' on GPU 0 (Mock GPU) failed after" in record.getMessage()
    assert "InsufficientVram: not enough VRAM on GPU 0: need 10 bytes" in record.getMessage()


def test_instrumentation_failure_does_not_change_the_result(
    telemetry: Any, traced_pm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("instrument broke")

    monkeypatch.setattr(telemetry.plugin.instruments, "record_operation", broken)
    assert run_op(traced_pm, "verify", lambda op: 41 + 1, **BASE) == 42


def test_module_hooks_pass_results_and_errors_through_without_an_sdk() -> None:
    import vramcore_audit_tracing

    pm = get_plugin_manager([vramcore_audit_tracing], load_entrypoints=False)
    assert run_op(pm, "seal", lambda op: "kept", **BASE) == "kept"
    with pytest.raises(KeyError):
        run_op(pm, "verify", lambda op: {}["missing"], **BASE)
    assert vramcore_audit_tracing.default_plugin() is vramcore_audit_tracing.default_plugin()


def test_a_tracer_that_fails_does_not_stop_the_step(
    telemetry: Any, traced_pm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("SDK bug")

    monkeypatch.setattr(telemetry.plugin.tracer, "start_span", broken)
    assert run_op(traced_pm, "seal", lambda op: "sealed", **BASE) == "sealed"
    assert telemetry.spans() == []


def test_discovering_the_plugin_does_not_import_opentelemetry() -> None:
    import subprocess
    import sys

    code = (
        "import sys, vramcore_audit_tracing\n"
        "from vramcore.plugins import get_plugin_manager\n"
        "get_plugin_manager([vramcore_audit_tracing], load_entrypoints=False)\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_global_sdk_configured_after_loading_is_picked_up(
    telemetry: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vramcore_audit_tracing import TracingPlugin

    plugin = TracingPlugin()  # global providers, none configured yet
    pm = get_plugin_manager([plugin], load_entrypoints=False)
    run_op(pm, "seal", **BASE)
    assert telemetry.spans() == []
    # What trace.set_tracer_provider() does, without its set-once lock (kept for other tests).
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", telemetry.tracer_provider)
    run_op(pm, "seal", **BASE)
    assert [s.name for s in telemetry.spans()] == ["vramcore.seal"]
