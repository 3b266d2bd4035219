"""The sink's fast path, ``emit_nowait``: it queues exactly what ``emit`` would, and declines,
having queued nothing, whenever ``emit`` would wait or do more than queue (so what a crash can
lose, and what is reported, stay as ``emit`` makes them)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from vramcore_audit_chain import ChainConfig, ChainSink
from vramcore_audit_chain import _format as fmt
from vramcore_audit_chain._encode import encode_event

from vramcore.audit import AuditWitness
from vramcore.errors import AuditError


def _stored(directory: Path) -> list[str]:
    """The canonical JSON of every event record, oldest first."""
    out = []
    for _, path in fmt.log_files(directory):
        for line in path.read_bytes().splitlines():
            record = json.loads(line)
            if record["type"] == "event":
                out.append(fmt.canonical_json(record["data"]))
    return out


def _plain(chain: Any, n: int) -> list[Any]:
    return [e for e in chain.sample_events(2 * n) if not e.critical][:n]


@pytest.mark.parametrize("durability", ["batched", "mixed", "immediate"])
def test_the_fast_path_stores_what_emit_stores(
    chain_dir: Path, chain: Any, durability: str
) -> None:
    sink = ChainSink(ChainConfig(directory=chain_dir, durability=durability), chain.context())
    events = chain.sample_events(200)
    taken = []
    for event in events:  # as the core delivers: emit when the fast path declines
        if event.critical:
            sink.emit(event)
            continue
        answer = sink.emit_nowait(event)
        assert answer is True or answer is False
        taken.append(answer)
        if not answer:
            sink.emit(event)
    sink.close()
    assert _stored(chain_dir) == [encode_event(e) for e in events]
    assert chain.verify(chain_dir).ok
    if durability == "immediate":
        assert not any(taken)  # every event is fsynced before it is acknowledged
    else:
        assert sum(taken) > len(taken) // 2
    assert not sink.emit_nowait(chain.sample_events(4)[3])  # a critical event: never


def test_the_fast_path_declines_while_queued_records_are_late(
    chain_dir: Path, chain: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The committer is held up by a slow disk: emit then waits for its record (so a crash
    # loses no more than the flush interval), and the fast path must not return at once.
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
    first, second, third = _plain(chain, 3)
    assert sink.emit_nowait(first)
    assert entered.wait(10)  # the flusher is committing
    assert sink.emit_nowait(second)  # queued behind it, not late yet
    time.sleep(0.2)  # (a lower bound) now it is older than the flush interval
    records = sink.report()["written"]  # type: ignore[index]
    try:
        assert not sink.emit_nowait(third)
        assert sink.report()["written"] == records  # type: ignore[index]  # nothing queued
    finally:
        release.set()
    sink.emit(third)
    sink.close()
    assert _stored(chain_dir) == [encode_event(e) for e in (first, second, third)]


def test_the_fast_path_leaves_checkpoints_to_emit(chain_dir: Path, chain: Any) -> None:
    sink = ChainSink(
        ChainConfig(directory=chain_dir, durability="batched", checkpoint_records=5),
        chain.context(),
    )
    events = _plain(chain, 12)
    declined = 0
    for event in events:
        if not sink.emit_nowait(event):
            declined += 1
            sink.emit(event)  # writes the checkpoint that fell due, then the event
    assert declined >= 2, "a checkpoint fell due and the fast path took the event anyway"
    sink.close()
    assert _stored(chain_dir) == [encode_event(e) for e in events]
    result = chain.verify(chain_dir)
    assert result.ok and result.checkpoints >= 3


class _Failing(AuditWitness):
    name = "failing"

    def __init__(self) -> None:
        self.fail = False

    def publish(self, head: Mapping[str, Any]) -> None:
        if self.fail:
            raise OSError("the witness's storage is gone")


def test_the_fast_path_leaves_a_witness_failure_for_emit_to_report(
    chain_dir: Path, chain: Any
) -> None:
    witness = _Failing()
    sink = ChainSink(
        ChainConfig(directory=chain_dir, durability="batched"), chain.context(), witnesses=[witness]
    )
    plain = _plain(chain, 3)
    assert sink.emit_nowait(plain[0])
    witness.fail = True
    sink.flush()  # the commit's head does not reach the witness
    assert not sink.emit_nowait(plain[1])
    with pytest.raises(AuditError, match="could not keep the log's head"):
        sink.emit(plain[1])  # reported once; the event itself is in the log
    sink.close()
    assert _stored(chain_dir) == [encode_event(e) for e in plain[:2]]


def test_the_fast_path_declines_after_close(chain_dir: Path, chain: Any) -> None:
    sink = ChainSink(ChainConfig(directory=chain_dir, durability="batched"), chain.context())
    sink.close()
    event = _plain(chain, 1)[0]
    assert not sink.emit_nowait(event)
    with pytest.raises(AuditError, match="closed"):
        sink.emit(event)
    assert _stored(chain_dir) == []


def test_with_thinning_the_fast_path_only_drops(chain_dir: Path, chain: Any) -> None:
    sink = ChainSink(
        ChainConfig(directory=chain_dir, durability="batched", thin_verified_seconds=3600),
        chain.context(),
    )
    verified = chain.sample_events(1)[0]
    assert verified.event_type == "seal.verified"
    assert not sink.emit_nowait(verified)  # the shard's first record: written by emit
    sink.emit(verified)
    assert sink.emit_nowait(verified)  # thinned: counted, nothing written
    assert sink.emit_nowait(verified)
    sink.close()
    kinds = [json.loads(d)["event_type"] for d in _stored(chain_dir)]
    assert kinds == ["seal.verified", "audit.thinned"]
    assert json.loads(_stored(chain_dir)[-1])["count"] == 2
