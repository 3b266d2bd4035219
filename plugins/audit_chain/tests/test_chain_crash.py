"""Crash safety: a writer killed with SIGKILL at random moments never loses an acknowledged
event and never leaves a log that does not verify after recovery."""

from __future__ import annotations

import json
import os
import random
import select
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from vramcore_audit_chain import ChainConfig, ChainSink
from vramcore_audit_chain import _format as fmt

from vramcore.errors import AuditError

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _child(
    directory: Path, write_fd: int, chain: Any, settings: dict[str, Any], events: list[Any]
) -> None:
    """Append events forever, as the core delivers them (``emit_nowait``, else ``emit``);
    after each is acknowledged, report its shard id on the pipe."""
    try:
        sink = ChainSink(ChainConfig(directory=directory, **settings), chain.context())
        for i in range(100_000):
            event = events[i % len(events)]
            if not sink.emit_nowait(event):
                sink.emit(event)
            os.write(write_fd, f"{i}:{event.shard_id}\n".encode())
    finally:
        os._exit(3)


def _run_and_kill(
    directory: Path,
    chain: Any,
    settings: dict[str, Any],
    acks: int,
    delay: float = 0.0,
    events: list[Any] | None = None,
) -> list[str]:
    """Fork a writer, let it acknowledge ``acks`` events (+ ``delay`` s), SIGKILL it.

    Returns the shard ids whose emit had returned before the kill.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        os.close(read_fd)
        _child(directory, write_fd, chain, settings, events or chain.sample_events(1000))
    os.close(write_fd)
    got = b""
    deadline = time.monotonic() + 10
    while got.count(b"\n") < acks and time.monotonic() < deadline:
        ready, _, _ = select.select([read_fd], [], [], 0.5)
        if ready:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            got += chunk
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    while True:  # acknowledgements written before the kill
        chunk = os.read(read_fd, 65536)
        if not chunk:
            break
        got += chunk
    os.close(read_fd)
    return [line.split(":", 1)[1] for line in got.decode().splitlines() if ":" in line]


def _event_shards(directory: Path) -> list[str]:
    out = []
    for _, path in fmt.log_files(directory):
        data = path.read_bytes()
        if not data.endswith(b"\n"):  # a torn last line (a write cut short by the kill)
            data = data[: data.rfind(b"\n") + 1]
        for line in data.splitlines():
            rec = json.loads(line)
            if rec["type"] == "event":
                out.append(rec["data"]["shard_id"])
    return out


@pytest.mark.slow
def test_sigkill_never_loses_an_acknowledged_event(tmp_path: Path, chain: Any) -> None:
    rng = random.Random(20260131)
    directory = tmp_path / "log"
    # Small checkpoints and files, so kills land in rotations, checkpoints and state writes.
    settings = {"durability": "immediate", "checkpoint_records": 7, "max_bytes": 6000}
    acknowledged: list[str] = []
    runs = 50
    for _ in range(runs):
        acked = _run_and_kill(
            directory, chain, settings, acks=rng.randint(0, 12), delay=rng.random() * 0.004
        )
        acknowledged += acked
        # recovery (a writer starting on the log) must succeed, then the log must verify
        ChainSink(ChainConfig(directory=directory, **settings), chain.context()).close()
        result = chain.verify(directory)
        assert result.ok, result.summary()
        logged = _event_shards(directory)
        missing = [s for s in acknowledged if s not in logged]
        assert not missing, missing
    result = chain.verify(directory)
    assert result.sessions >= runs  # every restart is on the record
    assert len(_event_shards(directory)) >= len(acknowledged)


def test_altered_tail_after_a_crash_is_refused_not_quarantined(tmp_path: Path, chain: Any) -> None:
    directory = tmp_path / "log"
    settings = {"durability": "immediate"}
    assert len(_run_and_kill(directory, chain, settings, acks=5)) >= 5
    last = fmt.log_files(directory)[-1][1]
    data = last.read_bytes()
    assert b'"type":"checkpoint"' not in data  # the tail is unsealed: recovery must check it
    last.write_bytes(data.replace(b'"nbytes":4096', b'"nbytes":4097', 1))
    with pytest.raises(AuditError, match="refuses to append"):
        ChainSink(ChainConfig(directory=directory, **settings), chain.context())
    assert not list(directory.glob("quarantine-*"))


@pytest.mark.slow
def test_a_batched_writer_killed_mid_batch_loses_only_its_unwritten_tail(
    tmp_path: Path, chain: Any
) -> None:
    # Mostly non-critical events (queued in memory, written by the flusher in batches), a
    # critical one now and then (made durable before it is acknowledged).
    events = [e for i, e in enumerate(chain.sample_events(2000)) if not e.critical or i % 140 == 3]
    settings = {"durability": "batched", "flush_interval": 0.005, "checkpoint_records": 40}
    rng = random.Random(20261203)
    for run in range(12):
        directory = tmp_path / f"log-{run}"
        acked = _run_and_kill(
            directory,
            chain,
            settings,
            acks=rng.randint(30, 300),
            delay=rng.random() * 0.01,
            events=events,
        )
        logged = _event_shards(directory)
        # What is on disk is the acknowledged stream up to some point: nothing acknowledged
        # is missing before it, and only a tail is lost.
        assert logged == acked[: len(logged)] or logged[: len(acked)] == acked
        critical = {e.shard_id for e in events if e.critical}
        last_critical = max((i for i, s in enumerate(acked) if s in critical), default=-1)
        assert len(logged) > last_critical  # every critical one, and all before it, is there
        # The crashed log reads as cut short (its last write torn, at times), never as
        # altered...
        crashed = chain.verify(directory)
        assert crashed.reason in {"truncated_tail", "torn_line"}, crashed.summary()
        # ...and so does one whose last batch was torn by a power cut in the middle of it
        # (cut after the last checkpoint: the state file, written once a commit is durable,
        # may name that one).
        last = fmt.log_files(directory)[-1][1]
        data = last.read_bytes()
        checkpoint = data.rfind(b'"type":"checkpoint"')
        sealed = data.index(b"\n", checkpoint) + 1 if checkpoint >= 0 else len(data)
        if len(data) - sealed > 1:
            last.write_bytes(data[: rng.randint(sealed + 1, len(data) - 1)])
            torn = chain.verify(directory)
            assert torn.reason in {"truncated_tail", "torn_line"}, torn.summary()
        # A writer starting on it quarantines the torn line and the log verifies again.
        ChainSink(ChainConfig(directory=directory, **settings), chain.context()).close()
        assert chain.verify(directory).ok
