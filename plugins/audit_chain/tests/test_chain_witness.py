"""Witnesses: the two attacks a disk-only log cannot see (rollback with an old chain.state,
tail deletion after a crash), caught with a file witness and with the telemetry witness, by
``audit verify --anchor`` and by the writer; heads, anchors and failing witnesses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import vramcore_allocator_mock
import vramcore_audit_chain
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from vramcore_audit_chain import (
    ChainConfig,
    ChainSink,
    FileWitness,
    Head,
    load_anchors,
    load_key_file,
    load_public_key,
)
from vramcore_audit_chain import _format as fmt
from vramcore_audit_tracing import TracingPlugin, TracingWitness

from vramcore._cli.cli import main
from vramcore.audit import AuditWitness
from vramcore.errors import AuditError, ConfigError
from vramcore.manager import VramManager
from vramcore.plugins import get_plugin_manager
from vramcore.testing import sample_events

# -- helpers ---------------------------------------------------------------------------------


def _sink(directory: Path, chain: Any, witnesses: list[AuditWitness], **settings: Any) -> Any:
    settings.setdefault("durability", "mixed")
    return ChainSink(
        ChainConfig(directory=directory, **settings), chain.context(), witnesses=witnesses
    )


def _session(directory: Path, chain: Any, witnesses: list[AuditWitness], n: int, **kw: Any) -> Any:
    sink = _sink(directory, chain, witnesses, **kw)
    for event in chain.sample_events(n):
        sink.emit(event)
    sink.close()
    return sink


def _crash(sink: Any) -> None:
    """What a SIGKILL leaves: no closing checkpoint, the flusher gone, the lock released."""
    writer = sink._writer
    with writer._lock:
        writer._stopping = True
        writer._wake.notify_all()
    writer._flusher.join()
    writer._release()


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _verify_cli(capsys: pytest.CaptureFixture[str], directory: Path, *anchors: Path) -> Any:
    argv = ["audit", "verify", str(directory), "--key-file", str(directory / fmt.INITIAL_KEY_NAME)]
    for anchor in anchors:
        argv += ["--anchor", str(anchor)]
    code = main([*argv, "--json"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    doc = json.loads(out) if out.strip() else {}
    return code, doc, err + str(doc.get("error", {}).get("message", ""))


class _Telemetry:
    """An SDK tracer with an in-memory exporter; ``dump`` writes what an exporter shipped."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("test")

    def dump(self, path: Path) -> Path:
        spans = self.exporter.get_finished_spans()
        path.write_text("\n".join(span.to_json(indent=None) for span in spans) + "\n")
        return path


@pytest.fixture
def witness_file(tmp_path: Path) -> Path:
    elsewhere = tmp_path / "another-mount"
    elsewhere.mkdir()
    return elsewhere / "witness.ndjson"


def _heads(path: Path) -> list[Head]:
    heads = [Head.parse(json.loads(line)) for line in path.read_text().splitlines()]
    assert all(h is not None for h in heads)
    return [h for h in heads if h is not None]


# -- heads -----------------------------------------------------------------------------------


def test_heads_are_signed_and_published_at_open_checkpoints_critical_events_and_close(
    chain_dir: Path, chain: Any, witness_file: Path
) -> None:
    _session(chain_dir, chain, [FileWitness(witness_file)], 30, checkpoint_records=6)
    heads = _heads(witness_file)
    public = load_public_key(str(chain_dir / fmt.PUBLIC_KEY_NAME))
    assert all(h.signed_by(public) for h in heads)
    assert {"open", "checkpoint", "critical", "close"} <= {h.reason for h in heads}
    assert [h.seq for h in heads] == sorted(h.seq for h in heads)
    last_line = _lines(fmt.log_files(chain_dir)[-1][1])[-1]
    rec = fmt.parse_line(last_line.rstrip(b"\n"))
    assert rec is not None
    assert (heads[-1].reason, heads[-1].seq, heads[-1].mac) == ("close", rec.seq, rec.mac.decode())
    assert heads[-1].log_id == load_key_file(chain_dir / fmt.INITIAL_KEY_NAME).log_id
    # A changed head no longer verifies.
    forged = Head.parse({**heads[-1].to_dict(), "seq": heads[-1].seq + 5})
    assert forged is not None and not forged.signed_by(public)
    result = chain.verify(chain_dir, anchors=load_anchors([witness_file]))
    assert result.ok and result.anchors == len(heads), result.summary()


def test_every_head_names_a_record_that_was_durable_when_it_was_published(
    chain_dir: Path, chain: Any, witness_file: Path
) -> None:
    class Checking(AuditWitness):
        name = "checking"

        def publish(self, head: Mapping[str, Any]) -> None:
            data = b"".join(p.read_bytes() for _, p in fmt.log_files(chain_dir))
            assert f'"seq":{head["seq"]},'.encode() in data
            assert f'"mac":"{head["mac"]}"'.encode() in data

    _session(chain_dir, chain, [Checking()], 40, checkpoint_records=7, durability="batched")


# -- attack 1: rollback with an old chain.state ----------------------------------------------


def _rolled_back(chain_dir: Path, tmp_path: Path, chain: Any, witnesses: list[Any]) -> None:
    """Two sessions with ``witnesses``; then the directory is restored from a backup taken
    between them (log and chain.state, as a directory backup does)."""
    _session(chain_dir, chain, witnesses, 12)
    backup = tmp_path / "backup"
    shutil.copytree(chain_dir, backup)
    _session(chain_dir, chain, witnesses, 12)
    assert chain.verify(chain_dir).ok
    shutil.rmtree(chain_dir)
    shutil.copytree(backup, chain_dir)
    # Without an anchor the rolled-back log proves nothing wrong: that is the attack.
    assert chain.verify(chain_dir).ok


def test_rollback_is_caught_with_a_file_witness(
    chain_dir: Path, tmp_path: Path, chain: Any, witness_file: Path, capsys: Any
) -> None:
    _rolled_back(chain_dir, tmp_path, chain, [FileWitness(witness_file)])
    code, doc, _ = _verify_cli(capsys, chain_dir, witness_file)
    assert (code, doc["reason"]) == (1, "rolled_back"), doc
    with pytest.raises(AuditError, match="records were removed"):
        _sink(chain_dir, chain, [FileWitness(witness_file)])
    # Nothing was written by the refused writer.
    assert chain.verify(chain_dir).ok and chain.verify(chain_dir).sessions == 1


def test_rollback_written_over_is_caught_as_a_fork(
    chain_dir: Path, tmp_path: Path, chain: Any, witness_file: Path, capsys: Any
) -> None:
    _rolled_back(chain_dir, tmp_path, chain, [FileWitness(witness_file)])
    # The attacker starts the writer without the witness and writes on, past the old end.
    _session(chain_dir, chain, [], 40, checkpoint_records=5)
    assert chain.verify(chain_dir).ok
    code, doc, _ = _verify_cli(capsys, chain_dir, witness_file)
    assert (code, doc["reason"]) == (1, "rolled_back"), doc
    assert "another record" in doc["detail"]
    with pytest.raises(AuditError, match="rolled back and rewritten"):
        _sink(chain_dir, chain, [FileWitness(witness_file)])


def test_rollback_is_caught_with_the_telemetry_witness(
    chain_dir: Path, tmp_path: Path, chain: Any, capsys: Any
) -> None:
    telemetry = _Telemetry()
    _rolled_back(chain_dir, tmp_path, chain, [TracingWitness(telemetry.tracer)])
    export = telemetry.dump(tmp_path / "collector-export.json")
    code, doc, _ = _verify_cli(capsys, chain_dir, export)
    assert (code, doc["reason"]) == (1, "rolled_back"), doc
    with pytest.raises(AuditError, match="records were removed"):
        _sink(chain_dir, chain, [TracingWitness(telemetry.tracer, readback=export)])


# -- attack 2: tail deletion after a crash ---------------------------------------------------


def _crashed_and_cut(chain_dir: Path, chain: Any, witnesses: list[Any]) -> int:
    """A session that crashes after acknowledged critical events; then every record after
    the last checkpoint (the session's open record included) is cut. Returns the cut count."""
    _session(chain_dir, chain, witnesses, 10)
    sink = _sink(chain_dir, chain, witnesses, checkpoint_records=1000)
    for event in chain.sample_events(20):  # mixed mode: every critical event is fsynced
        sink.emit(event)
    sink.flush()
    _crash(sink)
    path = fmt.log_files(chain_dir)[-1][1]
    lines = _lines(path)
    last_cp = max(i for i, line in enumerate(lines) if b'"type":"checkpoint"' in line)
    path.write_bytes(b"".join(lines[: last_cp + 1]))
    # No key needed, and without an anchor the log looks like an old clean shutdown.
    assert chain.verify(chain_dir).ok
    return len(lines) - last_cp - 1


def test_tail_deletion_after_a_crash_is_caught_with_a_file_witness(
    chain_dir: Path, chain: Any, witness_file: Path, capsys: Any
) -> None:
    cut = _crashed_and_cut(chain_dir, chain, [FileWitness(witness_file)])
    assert cut > 20
    code, doc, _ = _verify_cli(capsys, chain_dir, witness_file)
    # The cut log ends with the previous session's close: it looks complete.
    assert (code, doc["reason"]) == (1, "rolled_back"), doc
    with pytest.raises(AuditError, match="records were removed"):
        _sink(chain_dir, chain, [FileWitness(witness_file)])


def test_cut_tail_of_a_crashed_log_is_truncated_after_anchor(
    chain_dir: Path, chain: Any, witness_file: Path, capsys: Any
) -> None:
    _session(chain_dir, chain, [FileWitness(witness_file)], 10)
    sink = _sink(chain_dir, chain, [FileWitness(witness_file)], checkpoint_records=1000)
    for event in chain.sample_events(20):
        sink.emit(event)
    _crash(sink)
    path = fmt.log_files(chain_dir)[-1][1]
    path.write_bytes(b"".join(_lines(path)[:-4]))  # the last acknowledged events
    code, doc, _ = _verify_cli(capsys, chain_dir, witness_file)
    assert (code, doc["reason"]) == (1, "truncated_after_anchor"), doc
    with pytest.raises(AuditError, match="records were removed"):
        _sink(chain_dir, chain, [FileWitness(witness_file)])


def test_tail_deletion_is_caught_with_the_telemetry_witness(
    chain_dir: Path, tmp_path: Path, chain: Any, capsys: Any
) -> None:
    telemetry = _Telemetry()
    _crashed_and_cut(chain_dir, chain, [TracingWitness(telemetry.tracer)])
    export = telemetry.dump(tmp_path / "collector-export.json")
    code, doc, _ = _verify_cli(capsys, chain_dir, export)
    assert (code, doc["reason"]) == (1, "rolled_back"), doc
    with pytest.raises(AuditError, match="records were removed"):
        _sink(chain_dir, chain, [TracingWitness(telemetry.tracer, readback=export)])


def test_a_real_crash_is_not_mistaken_for_an_attack(
    chain_dir: Path, chain: Any, witness_file: Path, capsys: Any
) -> None:
    sink = _sink(chain_dir, chain, [FileWitness(witness_file)], durability="immediate")
    for event in chain.sample_events(15):
        sink.emit(event)
    _crash(sink)
    with (fmt.log_files(chain_dir)[-1][1]).open("ab") as f:
        f.write(b'{"seq":99,"epo')  # a torn write of a record nobody acknowledged
    _session(chain_dir, chain, [FileWitness(witness_file)], 5)
    code, doc, _ = _verify_cli(capsys, chain_dir, witness_file)
    assert code == 0 and doc["recoveries"] == 1 and doc["anchors"] >= 4, doc


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sigkilled_writer_then_cut_tail_is_caught_and_the_real_crash_is_not(
    chain_dir: Path, tmp_path: Path, chain: Any, witness_file: Path, capsys: Any
) -> None:
    _session(chain_dir, chain, [FileWitness(witness_file)], 10)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        try:
            os.close(read_fd)
            sink = _sink(chain_dir, chain, [FileWitness(witness_file)], checkpoint_records=1000)
            for i, event in enumerate(chain.sample_events(100_000)):
                sink.emit(event)
                os.write(write_fd, b"%d\n" % i)
        finally:
            os._exit(3)
    os.close(write_fd)
    got = b""
    deadline = time.monotonic() + 20
    while got.count(b"\n") < 60 and time.monotonic() < deadline:
        got += os.read(read_fd, 65536)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(read_fd)
    assert got.count(b"\n") >= 60
    # The real crash: restarting recovers it, and the witness agrees.
    real = tmp_path / "real-crash"
    shutil.copytree(chain_dir, real)
    shutil.copy(witness_file, tmp_path / "witness-copy")
    _session(real, chain, [FileWitness(tmp_path / "witness-copy")], 3)
    code, doc, _ = _verify_cli(capsys, real, tmp_path / "witness-copy")
    assert code == 0, doc
    # The attack: the crashed session cut away, back to the previous clean close.
    path = fmt.log_files(chain_dir)[-1][1]
    lines = _lines(path)
    last_close = max(i for i, line in enumerate(lines) if b'"reason":"close"' in line)
    path.write_bytes(b"".join(lines[: last_close + 1]))
    assert chain.verify(chain_dir).ok  # nothing to see without the witness
    code, doc, _ = _verify_cli(capsys, chain_dir, witness_file)
    assert (code, doc["reason"]) == (1, "rolled_back"), doc
    with pytest.raises(AuditError, match="records were removed"):
        _sink(chain_dir, chain, [FileWitness(witness_file)])


# -- anchors ---------------------------------------------------------------------------------


def test_saved_checkpoint_is_an_anchor(
    chain_dir: Path, tmp_path: Path, chain: Any, capsys: Any
) -> None:
    _session(chain_dir, chain, [], 12)
    main(["audit", "show", str(chain_dir), "--type", "checkpoint", "--limit", "1", "--json"])
    saved = tmp_path / "last-checkpoint.json"
    saved.write_text(capsys.readouterr().out)
    line = tmp_path / "checkpoint-line.ndjson"
    line.write_bytes(_lines(fmt.log_files(chain_dir)[-1][1])[-1])
    code, doc, _ = _verify_cli(capsys, chain_dir, saved, line)
    assert (code, doc["anchors"]) == (0, 2), doc
    backup = tmp_path / "backup"
    shutil.copytree(chain_dir, backup)
    _session(chain_dir, chain, [], 12)
    main(["audit", "show", str(chain_dir), "--type", "checkpoint", "--limit", "1", "--json"])
    saved.write_text(capsys.readouterr().out)
    shutil.rmtree(chain_dir)
    shutil.copytree(backup, chain_dir)
    code, doc, _ = _verify_cli(capsys, chain_dir, saved)
    assert (code, doc["reason"]) == (1, "rolled_back"), doc


def test_otlp_json_export_is_read_for_heads(
    chain_dir: Path, tmp_path: Path, chain: Any, witness_file: Path
) -> None:
    _session(chain_dir, chain, [FileWitness(witness_file)], 5)
    head_text = witness_file.read_text().splitlines()[-1]
    otlp = {
        "resourceLogs": [
            {
                "scopeLogs": [
                    {
                        "logRecords": [
                            {
                                "body": {"stringValue": "audit chain head"},
                                "attributes": [
                                    {
                                        "key": "vramcore.audit.chain_head",
                                        "value": {"stringValue": head_text},
                                    }
                                ],
                            }
                        ]
                    }
                ]
            }
        ]
    }
    export = tmp_path / "otlp.json"
    export.write_text(json.dumps(otlp) + "\n" + json.dumps({"other": "record"}) + "\n")
    (anchor,) = load_anchors([export])
    assert anchor.kind == "head" and anchor.seq == _heads(witness_file)[-1].seq
    assert chain.verify(chain_dir, anchors=[anchor]).ok


def test_anchor_usage_errors_exit_2(
    chain_dir: Path, tmp_path: Path, chain: Any, witness_file: Path, capsys: Any
) -> None:
    _session(chain_dir, chain, [FileWitness(witness_file)], 5)
    empty = tmp_path / "nothing.json"
    empty.write_text('{"no": "heads"}\n')
    code, _, err = _verify_cli(capsys, chain_dir, empty)
    assert code == 2 and "no chain head" in err
    # A head altered after it left the host is not trusted: it was the newest the file held
    # about this log, so the verdict cannot be given (exit 1, never a pass).
    head = json.loads(witness_file.read_text().splitlines()[-1])
    head["seq"] += 100
    forged = tmp_path / "forged.ndjson"
    forged.write_text(json.dumps(head) + "\n")
    code, doc, _ = _verify_cli(capsys, chain_dir, forged)
    assert (code, doc["reason"]) == (1, "anchor_unreadable"), doc
    assert "did not sign" in doc["detail"]
    # Heads of two logs need --log-id.
    other = tmp_path / "other"
    _session(other, chain, [FileWitness(witness_file)], 5)
    code, _, err = _verify_cli(capsys, chain_dir, witness_file)
    assert code == 2 and "--log-id" in err


def test_log_id_pins_the_log(
    chain_dir: Path, tmp_path: Path, chain: Any, witness_file: Path, capsys: Any
) -> None:
    _session(chain_dir, chain, [FileWitness(witness_file)], 5)
    other = tmp_path / "other"
    _session(other, chain, [FileWitness(witness_file)], 5)
    log_id = load_key_file(chain_dir / fmt.INITIAL_KEY_NAME).log_id
    pub = str(chain_dir / fmt.PUBLIC_KEY_NAME)
    base = ["audit", "verify", "--public-key", pub, "--anchor", str(witness_file), "--json"]
    assert main([*base, str(chain_dir), "--log-id", log_id]) == 0
    capsys.readouterr()
    # Same worker, same public key: the other log verifies on its own, but is not this one.
    assert main(["audit", "verify", str(other), "--public-key", pub]) == 0
    capsys.readouterr()
    assert main([*base, str(other), "--log-id", log_id]) == 1
    assert json.loads(capsys.readouterr().out)["reason"] == "wrong_log"
    assert main([*base[:-3], str(other), "--log-id", "nothex"]) == 2


def test_anchors_of_another_log_only_are_wrong_log(
    chain_dir: Path, tmp_path: Path, chain: Any, witness_file: Path
) -> None:
    _session(tmp_path / "first", chain, [FileWitness(witness_file)], 5)
    _session(chain_dir, chain, [], 5)
    result = chain.verify(chain_dir, anchors=load_anchors([witness_file]))
    assert result.reason == "wrong_log"


# -- failing witnesses -----------------------------------------------------------------------


class _Flaky(AuditWitness):
    def __init__(self, *, required: bool) -> None:
        self.required = required
        self.name = "flaky-required" if required else "flaky"
        self.fail = False
        self.heads: list[Mapping[str, Any]] = []

    def publish(self, head: Mapping[str, Any]) -> None:
        if self.fail:
            raise OSError("witness storage is gone")
        self.heads.append(head)


def _critical() -> Any:
    return sample_events(4)[3]


def _plain() -> Any:
    return sample_events(1)[0]


def test_a_failing_required_witness_fails_critical_events_closed(
    chain_dir: Path, chain: Any
) -> None:
    witness = _Flaky(required=True)
    sink = _sink(chain_dir, chain, [witness])
    sink.emit(_critical())
    witness.fail = True
    with pytest.raises(AuditError, match="fail closed"):
        sink.emit(_critical())
    sink.emit(_plain())  # not critical: the failure was reported already
    with pytest.raises(AuditError, match="fail closed"):
        sink.emit(_critical())
    witness.fail = False
    sink.emit(_critical())  # the witness is back: critical events go through again
    sink.close()
    assert chain.verify(chain_dir).ok


def test_a_failing_optional_witness_is_reported_but_never_fails_an_operation(
    chain_dir: Path, chain: Any
) -> None:
    witness = _Flaky(required=False)
    sink = _sink(chain_dir, chain, [witness])
    witness.fail = True
    sink.emit(_critical())  # not required: the critical event goes through
    with pytest.raises(AuditError, match="flaky"):
        sink.emit(_plain())
    sink.emit(_plain())
    sink.close()


def test_a_required_witness_that_cannot_be_read_refuses_the_start(
    chain_dir: Path, chain: Any
) -> None:
    _session(chain_dir, chain, [], 3)

    class Unreadable(_Flaky):
        def latest(self, log_id: str) -> Mapping[str, Any] | None:
            raise OSError("unreachable")

    with pytest.raises(AuditError, match="cannot be read"):
        _sink(chain_dir, chain, [Unreadable(required=True)])
    sink = _sink(chain_dir, chain, [Unreadable(required=False)])  # optional: goes on
    sink.close()


def test_the_file_witness_refuses_to_live_in_the_log_directory(
    chain_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chain_dir.mkdir()
    with pytest.raises(ConfigError, match="inside the audit log directory"):
        FileWitness(chain_dir / "witness", log_directory=chain_dir)
    monkeypatch.setenv("VRAMCORE_AUDIT_LOG", str(chain_dir))
    monkeypatch.setenv("VRAMCORE_AUDIT_WITNESS_REQUIRED", "maybe")
    with pytest.raises(ConfigError, match="VRAMCORE_AUDIT_WITNESS_REQUIRED"):
        vramcore_audit_chain.vramcore_audit_witnesses(context=None)  # type: ignore[arg-type]


# -- inside a manager, through the hooks -----------------------------------------------------


def test_manager_publishes_heads_to_both_witnesses(
    tmp_path: Path, witness_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    directory = tmp_path / "managed"
    monkeypatch.setenv("VRAMCORE_AUDIT_LOG", str(directory))
    monkeypatch.setenv("VRAMCORE_AUDIT_WITNESS", str(witness_file))
    monkeypatch.setenv("VRAMCORE_AUDIT_WITNESS_REQUIRED", "1")
    monkeypatch.setenv("VRAMCORE_MOCK_VRAM", "256MiB")
    telemetry = _Telemetry()
    tracing = TracingPlugin(tracer_provider=telemetry.provider, witness=True)
    pm = get_plugin_manager(
        [vramcore_audit_chain, vramcore_allocator_mock, tracing], load_entrypoints=False
    )
    token = "3I9q1wKuafHUJ9cs1ZbxDgeWIwWS4pqLE33ykqgzyfs"
    with VramManager(token, device=0, allocator="mock", plugin_manager=pm) as manager:
        shard = manager.seal_model(b"weights" * 1000, shard_id="layer-0")
        manager.verify_sealed(shard)
        manager.deallocate(shard)
    export = telemetry.dump(tmp_path / "export.json")
    file_heads = _heads(witness_file)
    assert {"open", "critical", "close"} <= {h.reason for h in file_heads}
    telemetry_heads = [a.seq for a in load_anchors([export])]
    assert sorted(telemetry_heads) == [h.seq for h in file_heads]
    code, doc, _ = _verify_cli(capsys, directory, witness_file, export)
    assert code == 0 and doc["anchors"] == 2 * len(file_heads), doc
    assert token not in witness_file.read_text() + export.read_text()
