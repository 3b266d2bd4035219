"""Audit events: stable JSON, round trips, hostile strings refused, correlation ids."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import attrs
import pytest

import vramcore
from vramcore import events
from vramcore.errors import InvalidInput
from vramcore.testing import CapturingSink, sample_events
from vramcore.validation import MAX_FIELD_CHARS

WHEN = datetime(2026, 1, 31, 12, 0, 0, 123456, tzinfo=UTC)


def _samples() -> list[events.AuditEvent]:
    return sample_events(worker_id="host:1", timestamp=WHEN, correlation_id="c-1")


def test_there_are_ten_event_types() -> None:
    assert set(events.EVENT_TYPES) == {e.event_type for e in _samples()}
    assert len(events.EVENT_TYPES) == 10
    assert events.DigestFallback.default_severity == "warning"
    # A refused input is not an allocation failure: auditors see tampered files as such.
    assert events.SealRefused.event_type == "vram.seal_refused"
    critical = {t for t, cls in events.EVENT_TYPES.items() if cls.critical}
    assert critical == {
        "vram.sealed",
        "vram.model_sealed",
        "seal.verification_failed",
        "policy.violation",
    }


def test_event_fields_names_every_field_of_every_event_once() -> None:
    common = {"timestamp", "severity", "correlation_id"}
    fields = {f.name for cls in events.EVENT_TYPES.values() for f in attrs.fields(cls)} - common
    assert fields == set(events.EVENT_FIELDS)


@pytest.mark.parametrize("event", _samples(), ids=lambda e: e.event_type)
def test_json_round_trip(event: events.AuditEvent) -> None:
    text = event.to_json()
    data = json.loads(text)
    assert data["event_type"] == event.event_type
    assert data["timestamp"] == "2026-01-31T12:00:00.123456Z"
    assert data["severity"] == event.severity.value
    back = events.event_from_dict(data)
    assert type(back) is type(event)
    assert back == event
    assert back.to_json() == text
    assert text == json.dumps(data, sort_keys=True, separators=(",", ":"))


def test_json_form_is_plain_and_stable() -> None:
    failed = _samples()[4]
    data = failed.to_dict()
    assert data["byte_ranges"] == [[0, 65536], [131072, 131080]]
    assert data["tensors"] == ["embed.weight", "head.weight"]
    assert list(json.loads(failed.to_json())) == sorted(data)


def test_default_severities() -> None:
    by_type = {e.event_type: e.severity for e in _samples()}
    assert by_type["vram.allocated"] == "info"
    assert by_type["vram.allocation_failed"] == "error"
    assert by_type["seal.verification_failed"] == "critical"
    assert by_type["policy.violation"] == "critical"
    warned = events.VramDeallocated(
        worker_id="w", shard_id="s", device=0, nbytes=1, severity="warning"
    )
    assert warned.severity is events.Severity.WARNING


def test_timestamps_are_utc_and_aware() -> None:
    event = events.VramDeallocated(worker_id="w", shard_id="s", device=0, nbytes=1)
    assert event.timestamp.tzinfo is not None
    assert abs(event.timestamp - datetime.now(UTC)) < timedelta(seconds=5)
    with pytest.raises(InvalidInput):
        events.VramDeallocated(
            worker_id="w", shard_id="s", device=0, nbytes=1, timestamp=datetime(2026, 1, 1)
        )
    plus2 = datetime(2026, 1, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    shifted = events.VramDeallocated(
        worker_id="w", shard_id="s", device=0, nbytes=1, timestamp=plus2
    )
    assert shifted.to_dict()["timestamp"] == "2026-01-01T12:00:00.000000Z"


HOSTILE = {
    "NUL": "\x00",
    "ESC": "\x1b[31m",
    "newline": "\n",
    "CR": "\r",
    "tab": "\t",
    "DEL": "\x7f",
    "NEL": "\x85",
    "RLO": "\u202e",
    "LRI": "\u2066",
    "ALM": "\u061c",
    "BOM": "\ufeff",
    "ZWSP": "\u200b",
    "ZWJ": "\u200d",
    "LS": "\u2028",
    "PS": "\u2029",
    "tag": "\U000e0041",
    "surrogate": "\ud800",
    "unassigned": "\U000e0080",
}


@pytest.mark.parametrize("char", list(HOSTILE.values()), ids=list(HOSTILE))
@pytest.mark.parametrize("field", ["worker_id", "shard_id", "detail", "tensors", "correlation_id"])
def test_hostile_characters_are_refused(char: str, field: str) -> None:
    kwargs: dict[str, Any] = {
        "worker_id": "w",
        "shard_id": "s",
        "device": 0,
        "reason": "digest",
        "detail": "d",
        "tensors": ("t",),
    }
    value = f"ok{char}ok"
    kwargs[field] = (value,) if field == "tensors" else value
    with pytest.raises(InvalidInput) as info:
        events.SealVerificationFailed(**kwargs)
    assert char not in str(info.value)
    assert "U+" in str(info.value)


@pytest.mark.parametrize("char", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_characters_are_refused_when_reading_json(char: str) -> None:
    data = _samples()[0].to_dict()
    data["backend"] = f"mock{char}"
    with pytest.raises(InvalidInput):
        events.event_from_dict(data)


def test_printable_unicode_is_kept() -> None:
    event = events.PolicyViolation(
        worker_id="wörker-東京", device=0, rule="ats", detail="GPU 0 (Ünïcode ✓ 🚀)"
    )
    assert events.event_from_dict(json.loads(event.to_json())) == event


def test_overlong_strings_are_cut_with_a_marker() -> None:
    event = events.PolicyViolation(worker_id="w", device=0, rule="ats", detail="x" * 5000)
    assert len(event.detail) == MAX_FIELD_CHARS
    assert event.detail.endswith("...[truncated]")
    assert event.detail.startswith("x" * 100)
    tensors = events.SealVerificationFailed(
        worker_id="w", shard_id="s", device=0, reason="r", detail="d", tensors=("t" * 2000,)
    ).tensors
    assert len(tensors[0]) == MAX_FIELD_CHARS
    assert tensors[0].endswith("...[truncated]")
    exact = events.PolicyViolation(worker_id="w", device=0, rule="r", detail="y" * MAX_FIELD_CHARS)
    assert exact.detail == "y" * MAX_FIELD_CHARS


@pytest.mark.parametrize(
    "change",
    [
        {"event_type": "vram.exploded"},
        {"event_type": None},
        {"timestamp": "yesterday"},
        {"timestamp": 1700000000},
        {"severity": "apocalyptic"},
        {"nbytes": ...},
        {"surprise": 1},
        {"worker_id": 5},
        {"nbytes": "10"},
        {"device": True},
        {"device": 0.0},
    ],
    ids=repr,
)
def test_event_from_dict_rejects_malformed_input(change: dict[str, Any]) -> None:
    data = _samples()[0].to_dict()
    for key, value in change.items():
        if value is ...:
            del data[key]
        else:
            data[key] = value
    with pytest.raises(InvalidInput):
        events.event_from_dict(data)


def test_event_from_dict_rejects_non_mappings() -> None:
    with pytest.raises(InvalidInput):
        events.event_from_dict([])  # type: ignore[arg-type]


def test_events_are_frozen() -> None:
    event = _samples()[0]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        event.shard_id = "other"  # type: ignore[misc]


def test_correlation_id_lands_on_events(mock_manager: Any, audit_capture: CapturingSink) -> None:
    with vramcore.correlate("req-1") as cid:
        assert cid == "req-1"
        shard = mock_manager.seal_model(b"x" * 100, shard_id="s")
        with vramcore.correlate("req-2"):
            mock_manager.verify_sealed(shard)
        mock_manager.verify_sealed(shard)
    mock_manager.deallocate(shard)
    pairs = [(e.event_type, e.correlation_id) for e in audit_capture.events]
    assert pairs == [
        ("vram.allocated", "req-1"),
        ("vram.sealed", "req-1"),
        ("seal.verified", "req-2"),
        ("seal.verified", "req-1"),
        ("vram.deallocated", ""),
    ]
    assert json.loads(audit_capture.events[0].to_json())["correlation_id"] == "req-1"


def test_correlation_id_is_checked() -> None:
    with pytest.raises(InvalidInput), vramcore.correlate("req\n2"):
        pass
    with vramcore.correlate("r" * 300):
        event = events.VramDeallocated(worker_id="w", shard_id="s", device=0, nbytes=1)
    assert len(event.correlation_id) == 128
