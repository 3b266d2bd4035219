"""The telemetry witness: audit chain heads on spans and log records, read back for the writer."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from vramcore_audit_tracing import TracingPlugin, TracingWitness
from vramcore_audit_tracing._witness import HEAD_ATTRIBUTE, HEAD_EVENT, heads_in_export

from vramcore.audit import SinkContext


def _head(seq: int, log_id: str = "a" * 32) -> dict[str, Any]:
    return {
        "format": "vramcore-audit-head/1",
        "log_id": log_id,
        "seq": seq,
        "epoch": 1,
        "mac": "b" * 64,
        "ts": "2026-01-01T00:00:00.000000Z",
        "reason": "critical",
        "public_key": "c" * 64,
        "sig": "d" * 128,
    }


def test_head_goes_on_the_current_span(telemetry: Any) -> None:
    witness = TracingWitness(telemetry.plugin.tracer)
    with telemetry.tracer.start_as_current_span("request"):
        witness.publish(_head(7))
    (span,) = telemetry.spans()
    (event,) = span.events
    assert event.name == HEAD_EVENT
    assert json.loads(event.attributes[HEAD_ATTRIBUTE]) == _head(7)
    assert event.attributes["vramcore.audit.seq"] == 7
    assert event.attributes["vramcore.audit.head_reason"] == "critical"


def test_head_outside_any_span_gets_a_short_span_of_its_own(telemetry: Any) -> None:
    witness = TracingWitness(telemetry.plugin.tracer)
    witness.publish(_head(3))
    span = telemetry.span(HEAD_EVENT)
    assert json.loads(span.attributes[HEAD_ATTRIBUTE])["seq"] == 3


def test_head_is_logged_with_its_attributes(
    telemetry: Any, caplog: pytest.LogCaptureFixture
) -> None:
    witness = TracingWitness(telemetry.plugin.tracer)
    with caplog.at_level(logging.INFO, logger="vramcore.events"):
        witness.publish(_head(5))
    (record,) = [r for r in caplog.records if hasattr(r, HEAD_ATTRIBUTE)]
    assert json.loads(getattr(record, HEAD_ATTRIBUTE))["seq"] == 5


def test_only_the_members_of_a_head_are_exported(telemetry: Any) -> None:
    witness = TracingWitness(telemetry.plugin.tracer)
    witness.publish({**_head(1), "pointer": 0xDEADBEEF, "secret": "x"})
    exported = json.loads(telemetry.span(HEAD_EVENT).attributes[HEAD_ATTRIBUTE])
    assert set(exported) == set(_head(1))


def test_publish_never_raises(telemetry: Any) -> None:
    class Broken:
        def start_span(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("exporter down")

    TracingWitness(Broken()).publish(_head(1))  # type: ignore[arg-type]


def test_latest_reads_the_newest_head_of_a_log_back_from_an_export(
    telemetry: Any, tmp_path: Path
) -> None:
    witness = TracingWitness(telemetry.plugin.tracer)
    for seq in (4, 9, 6):
        witness.publish(_head(seq))
    witness.publish(_head(50, log_id="e" * 32))
    export = tmp_path / "export.ndjson"
    export.write_text("\n".join(s.to_json(indent=None) for s in telemetry.spans()) + "\nnoise\n")
    reader = TracingWitness(telemetry.plugin.tracer, readback=export)
    assert reader.latest("a" * 32) == _head(9)
    assert reader.latest("f" * 32) is None
    assert TracingWitness(telemetry.plugin.tracer).latest("a" * 32) is None  # no readback
    assert len(list(heads_in_export(export))) == 4


def test_readback_of_a_special_file_is_an_error(telemetry: Any) -> None:
    with pytest.raises(OSError, match="not a regular file"):
        TracingWitness(telemetry.plugin.tracer, readback=Path("/dev/zero")).latest("a" * 32)


def test_the_plugin_offers_the_witness_unless_disabled(
    telemetry: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    context = SinkContext(worker_id="w", device=0)
    (witness,) = telemetry.plugin.vramcore_audit_witnesses(context=context)
    assert isinstance(witness, TracingWitness) and not witness.required
    monkeypatch.setenv("VRAMCORE_TRACING_WITNESS", "0")
    assert (
        TracingPlugin(tracer_provider=telemetry.tracer_provider).vramcore_audit_witnesses(
            context=context
        )
        == []
    )
    monkeypatch.setenv("VRAMCORE_TRACING_WITNESS_READBACK", "/srv/export.json")
    plugin = TracingPlugin(tracer_provider=telemetry.tracer_provider, witness=True)
    (witness,) = plugin.vramcore_audit_witnesses(context=context)
    assert witness.readback == Path("/srv/export.json")
