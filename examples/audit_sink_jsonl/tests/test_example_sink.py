"""The example sink, tested the way a plugin author tests theirs: with the fixtures of the
``vramcore.testing`` pytest plugin (installed with vramcore) and the mock backend."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

import pytest
import vramcore_example_jsonl as example

from vramcore import SinkContext, VramManager, WorkerToken
from vramcore.errors import IntegrityViolation
from vramcore.plugins import plugin_identity
from vramcore.testing import TEST_TOKEN, undocumented_public_names


@pytest.fixture
def log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "events.jsonl"
    monkeypatch.setenv(example.ENV_VAR, str(path))
    return path


def _key() -> bytes:
    # The sink's key is scoped to the plugin's identity (distribution and entry-point name):
    # re-derive it the same way.
    context = SinkContext.from_token(
        WorkerToken(TEST_TOKEN),
        worker_id="test",
        device=0,
        scope=plugin_identity("vramcore-example-jsonl", "example_jsonl"),
    )
    return context.derive_key(example.KEY_PURPOSE).export()


def test_every_event_is_one_maced_line(
    log: Path, make_plugin_manager: Any, mock_backend: Any, tmp_path: Path
) -> None:
    pm = make_plugin_manager(example)  # composed, nothing installed needed
    with VramManager(TEST_TOKEN, allocator=mock_backend, plugin_manager=pm) as manager:
        shard = manager.seal_model(b"weights" * 10_000, shard_id="w")
        manager.verify_sealed(shard)
        manager.deallocate(shard)
        (sink,) = [s for s in manager.sinks if s.name == "example_jsonl"]
    types = [event["event_type"] for event in example.read_events(log, _key())]
    assert types == ["vram.allocated", "vram.sealed", "seal.verified", "vram.deallocated"]
    assert sink.report() == {"path": str(log), "written": 4}


def test_a_changed_line_is_detected(log: Path, make_plugin_manager: Any, mock_backend: Any) -> None:
    pm = make_plugin_manager(example)
    with VramManager(TEST_TOKEN, allocator=mock_backend, plugin_manager=pm) as manager:
        manager.seal_model(b"x" * 4096, shard_id="w")
    lines = log.read_text().splitlines()
    record = json.loads(lines[0])
    record["event"]["nbytes"] = 1
    log.write_text(json.dumps(record) + "\n" + "\n".join(lines[1:]) + "\n")
    with pytest.raises(IntegrityViolation, match="MAC mismatch"):
        list(example.read_events(log, _key()))


def test_unconfigured_it_provides_no_sink(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(example.ENV_VAR, raising=False)
    context = SinkContext.from_token(WorkerToken(TEST_TOKEN), worker_id="t", device=0)
    assert example.vramcore_audit_sinks(context=context) == []


def test_it_satisfies_required_audit_alone(
    log: Path, make_plugin_manager: Any, mock_backend: Any
) -> None:
    pm = make_plugin_manager(example)
    with VramManager(TEST_TOKEN, allocator=mock_backend, plugin_manager=pm, audit="required"):
        pass
    assert log.exists()


def test_the_entry_point_is_installed() -> None:
    (ep,) = [
        e for e in importlib.metadata.entry_points(group="vramcore") if e.name == "example_jsonl"
    ]
    assert ep.load() is example


def test_every_public_name_is_documented() -> None:
    assert undocumented_public_names("vramcore_example_jsonl") == []
