"""The writer and sink: format, durability modes, recovery, locking, configuration, secrets."""

from __future__ import annotations

import itertools
import json
import os
import stat
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import vramcore_audit_chain
from vramcore_audit_chain import ChainConfig, ChainSink, Durability, FileWitness, verify_log
from vramcore_audit_chain import _format as fmt
from vramcore_audit_chain._encode import encode_event
from vramcore_audit_chain._keys import read_state, state_cipher

from vramcore.errors import AuditError, ConfigError
from vramcore.events import (
    EVENT_TYPES,
)
from vramcore.testing import sample_events


def _records(directory: Path) -> list[dict[str, Any]]:
    out = []
    for _, path in fmt.log_files(directory):
        out += [json.loads(line) for line in path.read_bytes().splitlines()]
    return out


# -- encoding ----------------------------------------------------------------------------


def _every_event() -> list[Any]:
    odd = datetime(2024, 2, 29, 23, 59, 59, tzinfo=timezone(timedelta(hours=-5)))
    return sample_events(worker_id="w", timestamp=odd)


@pytest.mark.parametrize("event", _every_event(), ids=lambda e: type(e).__name__)
def test_fast_encoder_gives_exactly_to_json(event: Any) -> None:
    assert encode_event(event) == event.to_json()


def test_encoder_covers_every_event_class() -> None:
    assert {type(e) for e in _every_event()} == set(EVENT_TYPES.values())


# -- format and round trip ---------------------------------------------------------------


def test_records_chain_and_carry_the_event(chain_dir: Path, chain: Any) -> None:
    sink = chain.write_log(chain_dir, 5)
    records = _records(chain_dir)
    assert [r["type"] for r in records] == ["genesis", "open", *["event"] * 5, "checkpoint"]
    assert [r["seq"] for r in records] == list(range(8))
    assert all(b["prev"] == a["mac"] for a, b in itertools.pairwise(records))
    assert records[2]["data"] == chain.sample_events(1)[0].to_dict() | {
        "timestamp": records[2]["data"]["timestamp"],
        "correlation_id": records[2]["data"]["correlation_id"],
    }
    assert records[-1]["data"]["reason"] == "close"
    report = sink.report()
    assert report is not None
    assert (report["verified"], report["mode"], report["records"]) == (True, "full", 8)
    assert "move it off this host" in report["warning"]


def test_files_are_private(chain_dir: Path, chain: Any) -> None:
    chain.write_log(chain_dir, 3)
    for path in chain_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    assert stat.S_IMODE(chain_dir.stat().st_mode) == 0o700


def test_restart_continues_sequence_chain_and_epochs(chain_dir: Path, chain: Any) -> None:
    chain.write_log(chain_dir, 12, checkpoint_records=5)
    before = _records(chain_dir)
    chain.write_log(chain_dir, 12, checkpoint_records=5)
    after = _records(chain_dir)
    assert after[: len(before)] == before
    nxt = after[len(before)]
    assert (nxt["type"], nxt["seq"], nxt["prev"]) == (
        "open",
        before[-1]["seq"] + 1,
        before[-1]["mac"],
    )
    assert nxt["epoch"] == before[-1]["epoch"] + 1
    assert nxt["data"]["clean"] is True
    result = chain.verify(chain_dir)
    assert result.ok and result.sessions == 2, result.summary()


def test_rotation_continues_the_chain_into_the_next_file(chain_dir: Path, chain: Any) -> None:
    chain.write_log(chain_dir, 50, max_bytes=4000)
    files = fmt.log_files(chain_dir)
    assert len(files) >= 4
    for (_, path), (_, nxt) in itertools.pairwise(files):
        last = json.loads(path.read_bytes().splitlines()[-1])
        first = json.loads(nxt.read_bytes().splitlines()[0])
        assert (last["type"], last["data"]["reason"]) == ("checkpoint", "rotate")
        assert (first["seq"], first["prev"]) == (last["seq"] + 1, last["mac"])
        assert path.stat().st_size < 4000 + 1500
    assert chain.verify(chain_dir).ok


def test_state_holds_only_the_current_epoch_key(chain_dir: Path, chain: Any) -> None:
    chain.write_log(chain_dir, 30, checkpoint_records=4)
    state = read_state(chain_dir / fmt.STATE_NAME, state_cipher(chain.context()))
    assert state is not None
    key = bytes(vramcore_audit_chain.load_key_file(chain_dir / "auditor-initial.key").initial_key)
    for _ in range(state.epoch):
        key = bytes(fmt.evolve_key(key))
    assert bytes(state.key) == key
    assert state.epoch == _records(chain_dir)[-1]["epoch"] + 1
    # the state file is sealed: the key is not in it in any readable form
    raw = (chain_dir / fmt.STATE_NAME).read_bytes()
    assert key.hex().encode() not in raw and key not in raw


def test_no_secret_reaches_the_log_or_reprs(chain_dir: Path, chain: Any) -> None:
    sink = chain.write_log(chain_dir, 10, checkpoint_records=4)
    initial = vramcore_audit_chain.load_key_file(chain_dir / "auditor-initial.key").initial_key
    blob = b"".join(p.read_bytes() for _, p in fmt.log_files(chain_dir))
    blob += (chain_dir / fmt.STATE_NAME).read_bytes()
    assert chain.TOKEN.encode() not in blob
    keys = [initial]
    for _ in range(8):
        keys.append(bytes(fmt.evolve_key(keys[-1])))
    for key in keys:
        assert key.hex().encode() not in blob
    key_file = vramcore_audit_chain.load_key_file(chain_dir / "auditor-initial.key")
    for text in (repr(sink), repr(key_file), repr(sink.report()), repr(chain.verify(chain_dir))):
        assert chain.TOKEN not in text and initial.hex() not in text


# -- durability --------------------------------------------------------------------------


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for _, p in fmt.log_files(directory))


def test_immediate_mode_fsyncs_before_emit_returns(
    chain_dir: Path, chain: Any, fsyncs: list[int]
) -> None:
    sink = ChainSink(ChainConfig(directory=chain_dir, durability="immediate"), chain.context())
    for event in chain.sample_events(5):
        before, size = len(fsyncs), _size(chain_dir)
        sink.emit(event)
        assert len(fsyncs) > before
        assert _size(chain_dir) > size
    sink.close()


def test_batched_mode_returns_first_and_commits_within_the_delay(
    chain_dir: Path, chain: Any, fsyncs: list[int]
) -> None:
    cfg = ChainConfig(directory=chain_dir, durability="batched", flush_interval=0.2)
    sink = ChainSink(cfg, chain.context())
    size, before = _size(chain_dir), len(fsyncs)
    for event in [e for e in chain.sample_events(70) if not e.critical][:50]:
        sink.emit(event)
    assert (_size(chain_dir), len(fsyncs)) == (size, before)  # nothing written yet
    deadline = time.monotonic() + 5
    while _size(chain_dir) == size and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _size(chain_dir) > size
    assert len(fsyncs) - before <= 2  # one group commit for 50 events
    sink.close()


@pytest.mark.parametrize("durability", ["batched", "mixed"])
def test_a_critical_event_is_on_disk_and_witnessed_when_emit_returns_in_every_mode(
    chain_dir: Path, chain: Any, tmp_path: Path, durability: str
) -> None:
    # The sink says it is durable, which the core's contract defines as: a critical event is
    # in storage when emit returns. batched mode used to acknowledge it queued.
    witness = tmp_path / "heads.ndjson"
    cfg = ChainConfig(directory=chain_dir, durability=durability, flush_interval=30)
    sink = ChainSink(cfg, chain.context(), witnesses=[FileWitness(witness)])
    assert sink.durable
    plain, critical = chain.sample_events(4)[0], chain.sample_events(4)[3]
    sink.emit(plain)
    heads = witness.read_bytes().count(b"\n")
    sink.emit(critical)
    on_disk = [r["data"] for r in _records(chain_dir) if r["type"] == "event"]
    assert [e["shard_id"] for e in on_disk] == [plain.shard_id, critical.shard_id]
    assert on_disk[-1]["event_type"] == critical.event_type
    newest = json.loads(witness.read_bytes().splitlines()[-1])
    assert witness.read_bytes().count(b"\n") == heads + 1 and newest["reason"] == "critical"
    assert newest["seq"] == _records(chain_dir)[-1]["seq"]
    sink.close()


def test_mixed_mode_syncs_critical_events_only(
    chain_dir: Path, chain: Any, fsyncs: list[int]
) -> None:
    cfg = ChainConfig(directory=chain_dir, flush_interval=30)
    assert cfg.durability is Durability.MIXED
    sink = ChainSink(cfg, chain.context())
    plain, critical = chain.sample_events(4)[0], chain.sample_events(4)[3]
    assert not plain.critical and critical.critical
    before = len(fsyncs)
    sink.emit(plain)
    assert len(fsyncs) == before
    size = _size(chain_dir)
    sink.emit(critical)
    assert len(fsyncs) > before
    assert _size(chain_dir) > size  # the plain event went out with it
    sink.flush()
    sink.close()


def test_time_based_checkpoint_while_idle(chain_dir: Path, chain: Any) -> None:
    cfg = ChainConfig(directory=chain_dir, checkpoint_seconds=0.1, durability="immediate")
    sink = ChainSink(cfg, chain.context())
    sink.emit(chain.sample_events(1)[0])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if any(r["type"] == "checkpoint" for r in _records(chain_dir)):
            break
        time.sleep(0.05)
    sink.close()
    kinds = [r["data"].get("reason") for r in _records(chain_dir) if r["type"] == "checkpoint"]
    assert kinds[0] == "periodic" and kinds[-1] == "close"
    assert chain.verify(chain_dir).ok


def test_threads_share_one_sink_safely(chain_dir: Path, chain: Any) -> None:
    import threading

    sink = ChainSink(
        ChainConfig(directory=chain_dir, durability="mixed", checkpoint_records=50),
        chain.context(),
    )
    events = chain.sample_events(200)

    def work(part: list[Any]) -> None:
        for event in part:
            sink.emit(event)

    threads = [threading.Thread(target=work, args=(events[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sink.close()
    result = chain.verify(chain_dir)
    assert result.ok, result.summary()
    shards = [r["data"]["shard_id"] for r in _records(chain_dir) if r["type"] == "event"]
    assert sorted(shards) == sorted(e.shard_id for e in events)


# -- recovery and refusal ------------------------------------------------------------------


def test_torn_last_line_is_quarantined_and_recorded(chain_dir: Path, chain: Any) -> None:
    chain.write_log(chain_dir, 6)
    last = fmt.log_files(chain_dir)[-1][1]
    torn = b'{"seq":99,"epoch":1,"prev":"ab'
    with last.open("ab") as f:
        f.write(torn)
    assert chain.verify(chain_dir).reason == "torn_line"
    sink = ChainSink(ChainConfig(directory=chain_dir), chain.context())
    assert sink.recovered is not None
    quarantine = chain_dir / sink.recovered["quarantine_file"]
    assert quarantine.read_bytes() == torn
    assert stat.S_IMODE(quarantine.stat().st_mode) == 0o600
    sink.close()
    records = _records(chain_dir)
    recovery = [r for r in records if r["type"] == "recovery"]
    assert len(recovery) == 1 and recovery[0]["data"]["bytes"] == len(torn)
    result = chain.verify(chain_dir)
    assert result.ok and result.recoveries == 1


def test_unclean_shutdown_without_torn_line_is_recorded(chain_dir: Path, chain: Any) -> None:
    chain.write_log(chain_dir, 6)
    last = fmt.log_files(chain_dir)[-1][1]
    lines = last.read_bytes().splitlines(keepends=True)
    # a crash before the closing checkpoint: the state still names the previous checkpoint
    last.write_bytes(b"".join(lines[:-1]))
    state_before = read_state(chain_dir / fmt.STATE_NAME, state_cipher(chain.context()))
    assert state_before is not None
    (chain_dir / fmt.STATE_NAME).unlink()
    with pytest.raises(AuditError, match="no chain state"):
        ChainSink(ChainConfig(directory=chain_dir), chain.context())


def test_log_shorter_than_the_state_says_is_refused(chain_dir: Path, chain: Any) -> None:
    chain.write_log(chain_dir, 20, checkpoint_records=4)
    last = fmt.log_files(chain_dir)[-1][1]
    lines = last.read_bytes().splitlines(keepends=True)
    last.write_bytes(b"".join(lines[:-3]))
    with pytest.raises(AuditError, match="records were removed"):
        ChainSink(ChainConfig(directory=chain_dir), chain.context())


def test_another_token_cannot_continue_the_log(chain_dir: Path, chain: Any) -> None:
    chain.write_log(chain_dir, 3)
    with pytest.raises(ConfigError, match="another worker token"):
        ChainSink(
            ChainConfig(directory=chain_dir),
            chain.context("lZffb8tX9oUj363DCgjgwxi1pCc5d-6_Vl_9jaiAg4Y"),
        )


def test_second_writer_is_refused(chain_dir: Path, chain: Any) -> None:
    sink = ChainSink(ChainConfig(directory=chain_dir), chain.context())
    with pytest.raises(ConfigError, match="in use by another writer"):
        ChainSink(ChainConfig(directory=chain_dir), chain.context())
    sink.close()
    ChainSink(ChainConfig(directory=chain_dir), chain.context()).close()  # free again


def test_emit_after_close_fails_closed(chain_dir: Path, chain: Any) -> None:
    sink = chain.write_log(chain_dir, 1)
    with pytest.raises(AuditError, match="closed"):
        sink.emit(chain.sample_events(1)[0])


def test_existing_initial_key_file_is_never_overwritten(chain_dir: Path, chain: Any) -> None:
    chain_dir.mkdir()
    (chain_dir / "auditor-initial.key").write_text("previous log's key")
    with pytest.raises(ConfigError, match="already exists"):
        ChainSink(ChainConfig(directory=chain_dir), chain.context())
    assert (chain_dir / "auditor-initial.key").read_text() == "previous log's key"


# -- configuration and the hook ------------------------------------------------------------


def test_hook_gives_no_sink_without_a_log_directory(
    monkeypatch: pytest.MonkeyPatch, chain: Any
) -> None:
    monkeypatch.delenv("VRAMCORE_AUDIT_LOG", raising=False)
    assert vramcore_audit_chain.vramcore_audit_sinks(context=chain.context()) == []


def test_hook_builds_a_sink_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, chain_dir: Path, chain: Any
) -> None:
    monkeypatch.setenv("VRAMCORE_AUDIT_LOG", str(chain_dir))
    monkeypatch.setenv("VRAMCORE_AUDIT_DURABILITY", "immediate")
    monkeypatch.setenv("VRAMCORE_AUDIT_MAX_BYTES", "5000")
    monkeypatch.setenv("VRAMCORE_AUDIT_CHECKPOINT_RECORDS", "7")
    (sink,) = vramcore_audit_chain.vramcore_audit_sinks(context=chain.context())
    assert isinstance(sink, ChainSink)
    assert sink.config.durability is Durability.IMMEDIATE
    assert (sink.config.max_bytes, sink.config.checkpoint_records) == (5000, 7)
    sink.close()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("VRAMCORE_AUDIT_DURABILITY", "sometimes"),
        ("VRAMCORE_AUDIT_MAX_BYTES", "lots"),
        ("VRAMCORE_AUDIT_FLUSH_MS", "-1"),
        ("VRAMCORE_AUDIT_CHECKPOINT_SECONDS", "0"),
    ],
)
def test_bad_settings_are_config_errors_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        ChainConfig.from_env({"VRAMCORE_AUDIT_LOG": "/tmp/x", name: value})


def test_report_falls_back_to_the_public_key(chain_dir: Path, chain: Any) -> None:
    sink = chain.write_log(chain_dir, 4)
    (chain_dir / "auditor-initial.key").rename(chain_dir.parent / "moved.key")
    sink._report = None  # recompute
    report = sink.report()
    assert report is not None
    assert (report["verified"], report["mode"]) == (True, "public-key")
    assert "warning" not in report
    assert verify_log([chain_dir], public_key=vramcore_audit_chain.load_public_key(
        str(chain_dir / "checkpoint.pub"))).ok  # fmt: skip


def test_setup_interrupted_before_the_genesis_resumes(chain_dir: Path, chain: Any) -> None:
    chain.write_log(chain_dir, 1)
    first = fmt.log_files(chain_dir)[0][1]
    # Rebuild the moment after setup saved its state and created the empty first file.
    state = read_state(chain_dir / fmt.STATE_NAME, state_cipher(chain.context()))
    assert state is not None
    key = vramcore_audit_chain.load_key_file(chain_dir / "auditor-initial.key").initial_key
    state.epoch, state.seq, state.head, state.key = 0, -1, fmt.GENESIS_PREV, bytearray(key)
    from vramcore_audit_chain._keys import write_state

    write_state(chain_dir / fmt.STATE_NAME, state_cipher(chain.context()), state)
    first.write_bytes(b"")
    chain.write_log(chain_dir, 2)
    result = chain.verify(chain_dir)
    assert result.ok and result.log_id == state.log_id, result.summary()
