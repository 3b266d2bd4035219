"""Hardening of the chain as it was (issue 12, part 4): one test (or one small group) per
point, each failing on the code before it (checked against commit 37fd47a)."""

from __future__ import annotations

import json
import os
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from vramcore_audit_chain import (
    ChainConfig,
    ChainSink,
    _writer,
    load_key_file,
    load_public_key,
    verify_log,
)
from vramcore_audit_chain import _format as fmt

from vramcore._cli.cli import main
from vramcore.errors import AuditError, ConfigError


def _files(directory: Path) -> list[Path]:
    return [p for _, p in fmt.log_files(directory)]


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _public(directory: Path) -> Any:
    return load_public_key(str(directory / "checkpoint.pub"))


def _full(directory: Path, paths: list[Path] | None = None, **kw: Any) -> Any:
    key = load_key_file(directory / "auditor-initial.key")
    return verify_log(
        paths or [directory], initial_key=key.initial_key, public_key=_public(directory), **kw
    )


@pytest.fixture
def log(make_log: Callable[..., Path]) -> Path:
    return make_log(60, checkpoint_records=9, max_bytes=9000)


# -- public-key mode authenticates every field of the closing checkpoint ---------------------


def _edit_closing_checkpoint(line: bytes, edit: str) -> bytes:
    rec = fmt.parse_line(line.rstrip(b"\n"))
    assert rec is not None and rec.type == "checkpoint"
    if edit == "mac":
        digit = b"0" if line[-4:-3] != b"0" else b"1"
        return line[:-4] + digit + line[-3:]
    sig = rec.data()["sig"].encode()
    if edit == "sig_text":
        return line.replace(sig, sig.upper())
    assert edit == "extra_field"
    return line.replace(b'},"mac":"', b',"zz":1},"mac":"')


@pytest.mark.parametrize("edit", ["mac", "sig_text", "extra_field"])
def test_public_key_mode_authenticates_every_field_of_the_closing_checkpoint(
    log: Path, edit: str
) -> None:
    path = _files(log)[-1]
    lines = _lines(path)
    lines[-1] = _edit_closing_checkpoint(lines[-1], edit)
    path.write_bytes(b"".join(lines))
    public = verify_log([log], public_key=_public(log))
    assert not public.ok and public.line == len(lines), public.summary()
    assert public.reason in {"checkpoint_signature_invalid", "malformed"}
    assert not _full(log).ok


# -- a subset of rotated files verifies; records moved between files do not -----------------


def test_a_subset_of_rotated_files_verifies_from_the_checkpoint_before_it(
    log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = _files(log)
    assert len(files) >= 3
    tail = verify_log(files[1:], public_key=_public(log))
    assert tail.ok and tail.partial and tail.first_seq > 0 and tail.closed, tail.summary()
    assert _full(log, files[1:]).ok
    middle = verify_log([files[1]], public_key=_public(log))
    assert middle.ok and middle.partial and not middle.closed, middle.summary()
    # The README's example.
    code = main(
        ["audit", "verify", *map(str, files[1:3]), "--public-key", str(log / "checkpoint.pub")]
    )
    out = capsys.readouterr().out
    assert code == 0, out


def test_records_moved_between_files_are_a_failure(log: Path) -> None:
    files = _files(log)
    second, third = _lines(files[1]), _lines(files[2])
    files[1].write_bytes(b"".join([*second, third[0]]))  # the sequence stays contiguous
    files[2].write_bytes(b"".join(third[1:]))
    for result in (_full(log), verify_log([log], public_key=_public(log))):
        assert (result.reason, result.file) == ("file_boundary", str(files[1])), result.summary()


def test_a_file_that_does_not_end_with_its_rotate_checkpoint_is_a_failure(log: Path) -> None:
    files = _files(log)
    second, third = _lines(files[1]), _lines(files[2])
    files[1].write_bytes(b"".join(second[:-1]))
    files[2].write_bytes(b"".join([second[-1], *third]))
    assert _full(log).reason == "file_boundary"


# -- quarantine files are checked ------------------------------------------------------------


@pytest.fixture
def recovered(chain_dir: Path, chain: Any) -> Path:
    chain.write_log(chain_dir, 6)
    with _files(chain_dir)[-1].open("ab") as f:
        f.write(b'{"seq":99,"epoch":1,"prev":"ab')
    ChainSink(ChainConfig(directory=chain_dir), chain.context()).close()
    (quarantine,) = chain_dir.glob("quarantine-*.bin")
    assert _full(chain_dir).ok
    return quarantine


def test_a_missing_quarantine_file_is_reported(recovered: Path) -> None:
    recovered.unlink()
    result = _full(recovered.parent)
    assert result.reason == "quarantine_missing" and recovered.name in result.detail


def test_an_altered_quarantine_file_is_reported(recovered: Path) -> None:
    recovered.write_bytes(b"something else entirely")
    assert _full(recovered.parent).reason == "quarantine_mismatch"


# -- a record re-MACed with a later key is named, even when that epoch left no record --------


def _epoch_keys(directory: Path, upto: int) -> list[bytes]:
    keys = [load_key_file(directory / "auditor-initial.key").initial_key]
    while len(keys) <= upto:
        keys.append(bytes(fmt.evolve_key(keys[-1])))
    return keys


def _remac_first_event(directory: Path, key: bytes) -> int:
    path = _files(directory)[0]
    lines = _lines(path)
    index = next(i for i, line in enumerate(lines) if b'"type":"event"' in line)
    rec = fmt.parse_line(lines[index].rstrip(b"\n"))
    assert rec is not None and rec.epoch == 0
    lines[index] = fmt.build_line(rec.body, key)[0]
    path.write_bytes(b"".join(lines))
    return index + 1


def test_remac_with_the_current_key_is_wrong_epoch_key(log: Path) -> None:
    # After the closing checkpoint the writer holds the key of an epoch with no record yet:
    # exactly what an attacker who controls the host now gets.
    last = _full(log).epochs - 1
    current = _epoch_keys(log, last + 1)[last + 1]
    line = _remac_first_event(log, current)
    result = _full(log)
    assert (result.reason, result.line) == ("wrong_epoch_key", line), result.summary()
    assert f"epoch {last + 1}" in result.detail


def test_remac_with_the_key_of_a_deleted_epoch_is_wrong_epoch_key(log: Path) -> None:
    last = _full(log).epochs - 1
    for path in _files(log)[1:]:
        path.unlink()  # every record of the later epochs is gone
    key = _epoch_keys(log, last)[last]
    _remac_first_event(log, key)
    result = _full(log)
    assert result.reason == "wrong_epoch_key" and f"epoch {last}" in result.detail


# -- first-start setup is atomic -------------------------------------------------------------


class _Crash(BaseException):
    pass


@pytest.mark.parametrize("step", ["write_state", "write_key_file", "write_private_file"])
def test_a_crash_during_setup_never_locks_the_directory_out(
    chain_dir: Path, chain: Any, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    def crash(*args: Any, **kwargs: Any) -> None:
        raise _Crash(step)

    with monkeypatch.context() as patch:
        patch.setattr(_writer, step, crash)
        with pytest.raises(_Crash):
            ChainSink(ChainConfig(directory=chain_dir), chain.context())
    chain.write_log(chain_dir, 5)  # the next start completes the setup
    result = chain.verify(chain_dir, expected_log_id=None)
    key = load_key_file(chain_dir / "auditor-initial.key")
    assert result.ok and result.log_id == key.log_id, result.summary()


# -- the single-writer lock cannot be deleted away -------------------------------------------


def test_deleting_the_lock_file_does_not_let_a_second_writer_in(
    chain_dir: Path, chain: Any
) -> None:
    sink = ChainSink(ChainConfig(directory=chain_dir), chain.context())
    (chain_dir / "chain.lock").unlink()
    with pytest.raises(ConfigError, match="in use by another writer"):
        ChainSink(ChainConfig(directory=chain_dir), chain.context())
    (chain_dir / "chain.lock").write_text("1\n")  # replaced, too
    with pytest.raises(ConfigError, match="in use by another writer"):
        ChainSink(ChainConfig(directory=chain_dir), chain.context())
    sink.close()
    ChainSink(ChainConfig(directory=chain_dir), chain.context()).close()


# -- bounded memory, hostile input: one line, exit 2 or 1, never a traceback -----------------


def _peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_the_verifier_streams_a_large_log_in_bounded_memory(chain_dir: Path, chain: Any) -> None:
    chain.write_log(chain_dir, 60_000, max_bytes=1 << 30)
    size = sum(p.stat().st_size for p in _files(chain_dir))
    assert size > 20 << 20
    result, peak = _peak(lambda: chain.verify(chain_dir))
    assert result.ok, result.summary()
    assert peak < 16 << 20, (peak, size)


@pytest.mark.slow
def test_show_limit_keeps_only_what_it_prints(
    chain_dir: Path, chain: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    chain.write_log(chain_dir, 20_000, max_bytes=1 << 30)
    code, peak = _peak(lambda: main(["audit", "show", str(chain_dir), "--limit", "1"]))
    assert code == 0 and "1 record(s) shown" in capsys.readouterr().out
    assert peak < 4 << 20, peak


def test_hostile_key_files_are_one_line_and_exit_2(
    log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sparse = tmp_path / "sparse.key"
    with sparse.open("wb") as f:
        f.truncate(256 << 20)

    def load_sparse() -> None:
        with pytest.raises(ConfigError):
            load_key_file(sparse)

    _, peak = _peak(load_sparse)
    assert peak < 1 << 20, peak
    nested = tmp_path / "nested.key"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    listed = tmp_path / "list.key"
    listed.write_text("[1, 2]")
    for key_file in ("/dev/zero", sparse, nested, listed, tmp_path):
        code = main(["audit", "verify", str(log), "--key-file", str(key_file)])
        err = capsys.readouterr().err
        assert code == 2, (key_file, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    code = main(["audit", "verify", str(log), "--public-key", "/dev/zero"])
    assert code == 2 and "Traceback" not in capsys.readouterr().err


def test_deeply_nested_json_in_the_log_is_malformed_not_a_crash(
    chain_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chain_dir.mkdir()
    data = '{"a":' + "[" * 100_000 + "]" * 100_000 + "}"
    body = fmt.build_body(0, 0, fmt.GENESIS_PREV, "genesis", data)
    (chain_dir / fmt.log_file_name(1)).write_bytes(fmt.build_line(body, b"k" * 32)[0])
    pub = "ab" * 32
    code = main(["audit", "verify", str(chain_dir), "--public-key", pub, "--json"])
    out, err = capsys.readouterr()
    assert code == 1 and json.loads(out)["reason"] == "malformed", out + err
    code = main(["audit", "show", str(chain_dir)])
    out, err = capsys.readouterr()
    assert code == 0 and "1 unreadable line(s)" in out and "Traceback" not in err


def test_log_names_that_are_not_regular_files_are_refused(
    log: Path, tmp_path: Path, chain: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    nxt = len(_files(log)) + 1
    (log / fmt.log_file_name(nxt)).symlink_to("/dev/zero")
    code = main(["audit", "verify", str(log), "--public-key", str(log / "checkpoint.pub")])
    err = capsys.readouterr().err
    assert code == 2 and "not a regular file" in err, err
    fifo = tmp_path / "audit-00000001.ndjson"
    os.mkfifo(fifo)
    code = main(["audit", "verify", str(fifo), "--public-key", str(log / "checkpoint.pub")])
    assert code == 2 and "not a regular file" in capsys.readouterr().err
    code = main(["audit", "show", str(log)])
    assert code == 2
    with pytest.raises(AuditError, match="not a regular file"):  # nor will the writer open it
        ChainSink(ChainConfig(directory=log), chain.context())


def test_a_verifier_crash_is_never_reported_as_an_integrity_failure(
    log: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from vramcore_audit_chain import _cli

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("a bug")

    monkeypatch.setattr(_cli, "verify_log", broken)
    code = main(["audit", "verify", str(log), "--public-key", str(log / "checkpoint.pub")])
    err = capsys.readouterr().err
    assert code not in (0, 1, 2) and "Traceback" not in err and "bug" in err, (code, err)


# -- batched durability is bounded by time, whatever the checkpoint settings -----------------


def test_one_commit_replaces_the_state_file_once_however_many_checkpoints_it_holds(
    chain_dir: Path, chain: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = ChainSink(
        ChainConfig(
            directory=chain_dir, durability="batched", flush_interval=30, checkpoint_records=1
        ),
        chain.context(),
    )
    writes: list[int] = []
    commits: list[tuple[int, int]] = []  # (checkpoints in the commit, state files written)
    real_state, real_write = _writer.write_state, _writer.ChainWriter._write

    def counting_write(self: Any, items: list[Any]) -> None:
        before = len(writes)
        real_write(self, items)
        saved = sum(isinstance(item, _writer._SaveState) for item in items)
        commits.append((saved, len(writes) - before))

    monkeypatch.setattr(
        _writer, "write_state", lambda *a, **k: (writes.append(1), real_state(*a, **k))
    )
    monkeypatch.setattr(_writer.ChainWriter, "_write", counting_write)
    # Non-critical events only: a critical one is made durable before emit returns, a commit
    # of its own.
    for event in [e for e in chain.sample_events(60) if not e.critical][:40]:
        sink.emit(event)
    sink.flush()  # one commit, about forty checkpoints in it
    sink.close()
    # (the flusher may have taken the first few on its own: a few commits, many checkpoints)
    assert sum(saved for saved, _ in commits) >= 40 and len(commits) <= 4, commits
    assert all(written == min(saved, 1) for saved, written in commits), commits
    assert chain.verify(chain_dir).ok


def test_batched_emit_waits_once_queued_records_are_older_than_the_flush_interval(
    chain_dir: Path, chain: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = ChainSink(
        ChainConfig(directory=chain_dir, durability="batched", flush_interval=0.05),
        chain.context(),
    )
    entered, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def slow_disk(fd: int) -> None:
        if threading.current_thread().name == "vramcore-audit-chain-flusher":
            entered.set()
            release.wait(30)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_disk)
    events = chain.sample_events(3)
    sink.emit(events[0])
    assert entered.wait(10)  # the flusher is committing, held up by a slow disk
    sink.emit(events[1])  # queued behind it: returns at once
    time.sleep(0.2)  # (a lower bound) the queued record is now older than the interval
    done = threading.Event()
    worker = threading.Thread(target=lambda: (sink.emit(events[2]), done.set()))
    worker.start()
    try:
        assert not done.wait(0.5), "emit returned while older records were not durable"
    finally:
        release.set()
        worker.join(10)
    assert done.is_set()
    sink.close()
    assert chain.verify(chain_dir).ok
