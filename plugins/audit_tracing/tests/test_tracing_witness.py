"""The telemetry witness: audit chain heads on spans and log records, read back for the writer."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from vramcore_audit_tracing import TracingPlugin, TracingWitness
from vramcore_audit_tracing._witness import HEAD_ATTRIBUTE, HEAD_EVENT, heads_in_export

from vramcore._heads import Head
from vramcore.audit import SinkContext

_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
_PUBLIC = _KEY.public_key().public_bytes_raw().hex()


def _head(
    seq: int, log_id: str = "a" * 32, key: Ed25519PrivateKey = _KEY, **change: Any
) -> dict[str, Any]:
    """A head signed by ``key`` (the log's key unless told otherwise)."""
    head = Head.build(
        key.sign,
        log_id=log_id,
        seq=seq,
        epoch=1,
        mac="b" * 64,
        segment="e" * 64,
        ts="2026-01-01T00:00:00.000000Z",
        reason="critical",
        public_key=key.public_key().public_bytes_raw().hex(),
    ).to_dict()
    return {**head, **change}


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


def test_a_head_with_extra_members_is_not_exported(telemetry: Any) -> None:
    witness = TracingWitness(telemetry.plugin.tracer)
    witness.publish({**_head(1), "pointer": 0xDEADBEEF, "secret": "x"})
    witness.publish(_head(2))
    exported = [json.loads(s.attributes[HEAD_ATTRIBUTE]) for s in telemetry.spans()]
    assert exported == [_head(2)]
    assert "secret" not in str([s.attributes for s in telemetry.spans()])


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


def _export(telemetry: Any, path: Path, *extra_lines: str) -> Path:
    lines = [s.to_json(indent=None) for s in telemetry.spans()]
    path.write_text("\n".join([*lines, *extra_lines]) + "\n")
    return path


@pytest.mark.parametrize(
    "appended",
    [
        pytest.param(lambda: _head(3), id="replayed-older-head"),
        pytest.param(lambda: _head(99, sig="0" * 128), id="unsigned-head"),
        pytest.param(
            lambda: _head(99, key=Ed25519PrivateKey.generate()), id="head-signed-by-another-key"
        ),
    ],
)
def test_a_head_appended_to_the_export_cannot_hide_the_newest_one(
    telemetry: Any, tmp_path: Path, appended: Any
) -> None:
    """Attack: whoever may write to the telemetry pipeline appends a head of this log after
    the real newest one; the writer's read-back must still find the real newest head."""
    witness = TracingWitness(telemetry.plugin.tracer)
    for seq in (3, 9):
        witness.publish(_head(seq))
    fake = json.dumps({"attributes": {HEAD_ATTRIBUTE: json.dumps(appended())}})
    export = _export(telemetry, tmp_path / "export.ndjson", fake)
    assert TracingWitness(telemetry.plugin.tracer, readback=export).latest("a" * 32) == _head(9)


def test_an_export_larger_than_any_limit_is_still_read_back(telemetry: Any, tmp_path: Path) -> None:
    """Attack: padding the export past a size limit made the read-back fail, and the writer
    went on without the rollback check. NDJSON is streamed whatever its size."""
    witness = TracingWitness(telemetry.plugin.tracer)
    witness.publish(_head(9))
    export = _export(telemetry, tmp_path / "export.ndjson")
    padding = json.dumps({"noise": "x" * 1_000_000}) + "\n"
    with export.open("a") as f:
        for _ in range(70):  # 70 MB
            f.write(padding)
    assert TracingWitness(telemetry.plugin.tracer, readback=export).latest("a" * 32) == _head(9)


def test_publish_drops_what_is_not_a_head(telemetry: Any) -> None:
    witness = TracingWitness(telemetry.plugin.tracer)
    witness.publish({"format": "vramcore-audit-head/2", "log_id": "a" * 32})
    assert witness.published == 0 and telemetry.spans() == []
