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


def _child(directory: Path, write_fd: int, chain: Any, settings: dict[str, Any]) -> None:
    """Append events forever; after each emit returns, report its shard id on the pipe."""
    try:
        sink = ChainSink(ChainConfig(directory=directory, **settings), chain.context())
        events = chain.sample_events(1000)
        for i in range(100_000):
            event = events[i % 1000]
            sink.emit(event)
            os.write(write_fd, f"{i}:{event.shard_id}\n".encode())
    finally:
        os._exit(3)


def _run_and_kill(
    directory: Path, chain: Any, settings: dict[str, Any], acks: int, delay: float = 0.0
) -> list[str]:
    """Fork a writer, let it acknowledge ``acks`` events (+ ``delay`` s), SIGKILL it.

    Returns the shard ids whose emit had returned before the kill.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        os.close(read_fd)
        _child(directory, write_fd, chain, settings)
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
        for line in path.read_bytes().splitlines():
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
