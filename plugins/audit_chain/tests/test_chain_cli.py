"""``vramcore audit verify | show | public-key`` and the plugin inside a real manager."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import vramcore_allocator_mock
import vramcore_audit_chain
from vramcore_audit_chain import _format as fmt

from vramcore._cli.cli import main
from vramcore.manager import VramManager
from vramcore.plugins import get_plugin_manager

TOKEN = "7HQzeqZvHs5rugGpTjbMQKqL1KLnSt_tipi5F5vk10o"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VRAMCORE_WORKER_TOKEN", TOKEN)
    monkeypatch.setenv("VRAMCORE_PLUGINS", "audit_chain,mock")
    monkeypatch.setenv("VRAMCORE_MOCK_VRAM", "256MiB")
    monkeypatch.delenv("VRAMCORE_AUDIT_KEY_FILE", raising=False)
    monkeypatch.delenv("VRAMCORE_AUDIT_LOG", raising=False)
    monkeypatch.setenv("VRAMCORE_ALLOCATOR", "mock")  # the mock is used only when named


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert TOKEN not in out + err
    return code, out, err


@pytest.fixture
def log(tmp_path: Path, chain: Any) -> Path:
    directory = tmp_path / "log"
    chain.write_log(directory, 30, token=TOKEN, checkpoint_records=8, max_bytes=6000)
    return directory


def test_verify_intact_log_exits_0(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "audit", "verify", str(log), "--key-file", str(log / "auditor-initial.key")
    )
    assert code == 0
    assert out.startswith("OK (full)")


def test_verify_json_names_the_first_bad_record(
    log: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = fmt.log_files(log)[1][1]
    lines = path.read_bytes().splitlines(keepends=True)
    del lines[2]
    path.write_bytes(b"".join(lines))
    monkeypatch.setenv("VRAMCORE_AUDIT_KEY_FILE", str(log / "auditor-initial.key"))
    code, out, _ = run(capsys, "audit", "verify", *map(str, log.glob("audit-*")), "--json")
    doc = json.loads(out)
    assert code == 1
    assert (doc["ok"], doc["reason"], doc["file"], doc["line"]) == (
        False, "sequence_gap", str(path), 3
    )  # fmt: skip
    assert doc["reason_text"] == "records are missing"


def test_verify_public_key_mode(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "audit", "verify", str(log), "--public-key", str(log / "checkpoint.pub")
    )
    assert (code, out.split()[:2]) == (0, ["OK", "(public-key):"])
    code, out, _ = run(capsys, "audit", "public-key")
    assert out.strip() == (log / "checkpoint.pub").read_text().strip()


def test_verify_usage_errors_exit_2(
    log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "audit", "verify", str(log))
    assert code == 2 and "--key-file" in err
    code, _, err = run(capsys, "audit", "verify", str(tmp_path / "nope"), "--public-key", "ab" * 32)
    assert code == 2 and "no such file" in err
    (tmp_path / "bad.key").write_text("{}")
    code, _, err = run(capsys, "audit", "verify", str(log), "--key-file", str(tmp_path / "bad.key"))
    assert code == 2 and "cannot read audit key file" in err


def test_live_log_verifies_with_live(
    tmp_path: Path, chain: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "live"
    sink = vramcore_audit_chain.ChainSink(
        vramcore_audit_chain.ChainConfig(directory=directory, durability="immediate"),
        chain.context(),
    )
    for event in chain.sample_events(3):
        sink.emit(event)
    key = str(directory / "auditor-initial.key")
    code, out, _ = run(capsys, "audit", "verify", str(directory), "--key-file", key)
    assert code == 1 and "truncated_tail" in out
    code, out, _ = run(capsys, "audit", "verify", str(directory), "--key-file", key, "--live")
    assert code == 0 and "5 records not yet covered" in out
    sink.close()


def test_show_filters(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "audit", "show", str(log), "--type", "checkpoint", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["count"] >= 3
    assert {r["type"] for r in doc["records"]} == {"checkpoint"}
    _, out, _ = run(capsys, "audit", "show", str(log), "--shard", "s3", "--json")
    (record,) = json.loads(out)["records"]
    assert (record["data"]["shard_id"], record["data"]["event_type"]) == ("s3", "vram.sealed")
    _, out, _ = run(capsys, "audit", "show", str(log), "--event-type", "vram.deallocated")
    assert "vram.deallocated shard_id=s4" in out and "s3 " not in out
    _, out, _ = run(capsys, "audit", "show", str(log), "--until", "2000-01-01T00:00:00Z", "--json")
    assert json.loads(out)["count"] == 0
    _, out, _ = run(capsys, "audit", "show", str(log), "--since", "2000-01-01", "--limit", "2")
    assert "2 record(s) shown, NOT verified" in out
    code, _, _ = run(capsys, "audit", "show", str(log), "--since", "yesterday")
    assert code == 2


def test_manager_writes_a_log_that_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "managed"
    monkeypatch.setenv("VRAMCORE_AUDIT_LOG", str(directory))
    pm = get_plugin_manager([vramcore_audit_chain, vramcore_allocator_mock], load_entrypoints=False)
    with VramManager(TOKEN, device=0, allocator="mock", plugin_manager=pm, audit="required") as m:
        shard = m.seal_model(b"weights" * 1000, shard_id="layer-0")
        m.verify_sealed(shard)
        m.deallocate(shard)
        (sink,) = [s for s in m.sinks if s.name == "audit_chain"]
    report = sink.report()
    assert report is not None and report["verified"] is True, report
    shown = [
        json.loads(line)
        for _, p in fmt.log_files(directory)
        for line in p.read_bytes().splitlines()
    ]
    types = [r["data"]["event_type"] for r in shown if r["type"] == "event"]
    assert {"vram.sealed", "seal.verified", "vram.deallocated"} <= set(types)
    assert TOKEN.encode() not in b"".join(p.read_bytes() for p in directory.iterdir())


def test_manager_refuses_to_start_without_a_log_directory() -> None:
    from vramcore.errors import AuditError

    pm = get_plugin_manager([vramcore_audit_chain, vramcore_allocator_mock], load_entrypoints=False)
    with pytest.raises(AuditError):
        VramManager(TOKEN, device=0, allocator="mock", plugin_manager=pm, audit="required")
