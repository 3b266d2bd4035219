"""Audit volume: thinning of successful verifications (never of anything else) and rotation
with the chain continuing across files, verified end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from vramcore_audit_chain import ChainConfig, ChainSink
from vramcore_audit_chain import _format as fmt
from vramcore_audit_chain._thinning import Thinning

from vramcore._cli.cli import main
from vramcore.errors import ConfigError
from vramcore.events import (
    PolicyViolation,
    SealVerificationFailed,
    SealVerified,
    VramDeallocated,
    VramSealed,
)


def _verified(shard: str) -> SealVerified:
    return SealVerified(worker_id="w1", shard_id=shard, device=0, nbytes=8, digest="ab" * 32)


def _failed(shard: str) -> SealVerificationFailed:
    return SealVerificationFailed(
        worker_id="w1", shard_id=shard, device=0, reason="digest_mismatch", detail="leaf 3"
    )


def _sealed(shard: str) -> VramSealed:
    return VramSealed(
        worker_id="w1",
        shard_id=shard,
        device=0,
        nbytes=8,
        digest="ab" * 32,
        digest_alg="rfc6962-sha256",
        leaf_size=65536,
        backend="mock",
    )


def _events(directory: Path) -> list[dict[str, Any]]:
    out = []
    for _, path in fmt.log_files(directory):
        for line in path.read_bytes().splitlines():
            rec = json.loads(line)
            if rec["type"] == "event":
                out.append(rec["data"])
    return out


def test_thinning_keeps_every_failure_violation_and_seal_and_counts_the_rest(
    chain_dir: Path, chain: Any
) -> None:
    sink = ChainSink(
        ChainConfig(directory=chain_dir, durability="batched", thin_verified_seconds=3600),
        chain.context(),
    )
    sent = {"a": 0, "b": 0}
    for i in range(300):
        shard = "a" if i % 3 else "b"
        sink.emit(_verified(shard))
        sent[shard] += 1
        if i == 100:
            sink.emit(_failed("a"))
            sink.emit(PolicyViolation(worker_id="w1", device=0, rule="r", detail="d"))
        if i == 200:
            sink.emit(_sealed("a"))
            sink.emit(_failed("a"))
    sink.emit(VramDeallocated(worker_id="w1", shard_id="b", device=0, nbytes=8))
    sink.close()
    assert chain.verify(chain_dir).ok
    events = _events(chain_dir)
    kinds = [e["event_type"] for e in events]
    assert kinds.count("seal.verification_failed") == 2
    assert kinds.count("policy.violation") == 1
    assert kinds.count("vram.sealed") == 1
    assert kinds.count("vram.deallocated") == 1
    assert len(events) < 20  # instead of 305
    for shard, count in sent.items():
        written = [e for e in events if e.get("shard_id") == shard]
        successes = sum(1 for e in written if e["event_type"] == "seal.verified")
        counted = sum(e.get("thinned", 0) for e in written if e["event_type"] == "seal.verified")
        counted += sum(e["count"] for e in written if e["event_type"] == "audit.thinned")
        assert successes + counted == count, (shard, written)
    # The count of "a" lands before its failure: its order is kept.
    first_failure = kinds.index("seal.verification_failed")
    assert events[first_failure - 1]["event_type"] == "audit.thinned"
    assert events[first_failure - 1]["shard_id"] == "a"


def test_thinning_writes_one_record_per_shard_per_interval_with_its_count() -> None:
    now = [0.0]
    thinning = Thinning(10.0, clock=lambda: now[0])
    written = []
    for step in range(35):  # one verification a second for 35 s
        now[0] = float(step)
        written += [json.loads(r) for r in thinning.records(_verified("a"), "{}")]
    assert len(written) == 4  # at 0, 10, 20 and 30 s
    assert [w.get("thinned", 0) for w in written] == [0, 9, 9, 9]
    assert [json.loads(r)["count"] for r in thinning.pending("w1")] == [4]


def test_thinning_is_off_by_default_and_checked(chain_dir: Path, chain: Any) -> None:
    chain.write_log(chain_dir, 30)
    assert sum(e["event_type"] == "seal.verified" for e in _events(chain_dir)) > 10
    assert (
        ChainConfig.from_env(
            {"VRAMCORE_AUDIT_LOG": "/x", "VRAMCORE_AUDIT_THIN_VERIFIED_SECONDS": "60"}
        ).thin_verified_seconds
        == 60
    )  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="VRAMCORE_AUDIT_THIN_VERIFIED_SECONDS"):
        ChainConfig.from_env(
            {"VRAMCORE_AUDIT_LOG": "/x", "VRAMCORE_AUDIT_THIN_VERIFIED_SECONDS": "-1"}
        )


def test_a_chain_rotated_three_times_verifies_end_to_end(
    chain_dir: Path, chain: Any, tmp_path: Path, capsys: Any
) -> None:
    for session in range(2):  # the chain goes on across a restart, too
        sink = ChainSink(
            ChainConfig(directory=chain_dir, durability="batched", max_bytes=6 * 1024),
            chain.context(),
        )
        for event in chain.sample_events(30):
            sink.emit(event)
        sink.close()
        del session
    files = [p for _, p in fmt.log_files(chain_dir)]
    assert len(files) >= 4
    key = str(chain_dir / fmt.INITIAL_KEY_NAME)
    assert main(["audit", "verify", str(chain_dir), "--key-file", key, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["files"] == len(files) and doc["closed"] and not doc["partial"]
    assert doc["first_seq"] == 0 and doc["records"] > 40
    # Every file but the last ends with a rotate checkpoint; the next begins the next record.
    for path in files[:-1]:
        last = fmt.parse_line(path.read_bytes().splitlines()[-1])
        assert last is not None and b'"reason":"rotate"' in last.body
    # A rotated file removed from the middle is caught.
    files[1].unlink()
    assert main(["audit", "verify", str(chain_dir), "--key-file", key]) == 1
    capsys.readouterr()


def test_show_prints_the_counts_of_thinned_verifications(
    chain_dir: Path, chain: Any, capsys: Any
) -> None:
    sink = ChainSink(
        ChainConfig(directory=chain_dir, durability="batched", thin_verified_seconds=3600),
        chain.context(),
    )
    for _ in range(5):
        sink.emit(_verified("a"))
    sink.close()
    assert main(["audit", "show", str(chain_dir), "--event-type", "audit.thinned"]) == 0
    out = capsys.readouterr().out
    assert "audit.thinned shard_id=a device=0 count=4" in out
