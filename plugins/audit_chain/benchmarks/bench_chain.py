"""Throughput of the audit chain on this machine, next to a naive baseline.

Prints events/s for each durability mode, the naive baseline (one ``json.dumps`` + HMAC +
``write`` + ``fsync`` per event) measured in the same run, and verifier records/s.

    .venv/bin/python plugins/audit_chain/benchmarks/bench_chain.py [--events N] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import tempfile
import threading
import time
from pathlib import Path

from vramcore_audit_chain import ChainConfig, ChainSink, load_key_file, verify_log

from vramcore.audit import SinkContext
from vramcore.events import SealVerified, VramSealed
from vramcore.seal import WorkerToken


def _events(n: int) -> list[SealVerified]:
    return [
        SealVerified(
            worker_id="bench",
            shard_id=f"shard-{i % 64}",
            device=0,
            nbytes=1 << 20,
            digest=f"{i:064x}",
        )
        for i in range(n)
    ]


def bench_naive(events: list[SealVerified], directory: Path) -> float:
    """One json.dumps + HMAC + write + fsync per event (what a first attempt does)."""
    key = os.urandom(32)
    prev = "0" * 64
    fd = os.open(directory / "naive.ndjson", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    start = time.perf_counter()
    for seq, event in enumerate(events):
        record = {"seq": seq, "prev": prev, "data": event.to_dict()}
        body = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
        prev = hmac.new(key, body, hashlib.sha256).hexdigest()
        os.write(fd, body + b"\n")
        os.fsync(fd)
    elapsed = time.perf_counter() - start
    os.close(fd)
    return len(events) / elapsed


def bench_mode(
    events: list[SealVerified], directory: Path, mode: str, threads: int = 1
) -> tuple[float, Path]:
    """Emit ``events`` through a sink in ``mode``; events/s including the final close."""
    cfg = ChainConfig(directory=directory, durability=mode)
    sink = ChainSink(
        cfg, SinkContext.from_token(WorkerToken("b" * 32), worker_id="bench", device=0)
    )
    per = len(events) // threads

    def work(part: list[SealVerified]) -> None:
        for event in part:
            sink.emit(event)

    parts = [events[i * per : (i + 1) * per] for i in range(threads)]
    start = time.perf_counter()
    if threads == 1:
        work(parts[0])
    else:
        workers = [threading.Thread(target=work, args=(p,)) for p in parts]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    sink.close()
    elapsed = time.perf_counter() - start
    return per * threads / elapsed, directory


def bench_verify(directory: Path) -> tuple[float, int]:
    """Full verification (MACs, links, checkpoints) of the log in ``directory``."""
    key = load_key_file(directory / "auditor-initial.key")
    start = time.perf_counter()
    result = verify_log([directory], initial_key=key.initial_key)
    elapsed = time.perf_counter() - start
    if not result.ok:
        raise SystemExit(f"verification failed: {result.summary()}")
    return result.records / elapsed, result.records


def main() -> None:
    """Run every measurement and print a table (or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="events for batched mode")
    parser.add_argument("--sync-events", type=int, default=2_000, help="events for fsync modes")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="vramcore-bench-") as tmp:
        root = Path(tmp)
        sync_events = _events(args.sync_events)
        results["naive_fsync_per_event"] = bench_naive(sync_events, root)
        results["immediate"], _ = bench_mode(sync_events, root / "immediate", "immediate")
        results["immediate_8_threads"], _ = bench_mode(
            _events(args.sync_events * 4), root / "immediate8", "immediate", threads=8
        )
        batched = _events(args.events)
        results["batched"], log_dir = bench_mode(batched, root / "batched", "batched")
        mixed = _events(args.events)
        for i in range(0, len(mixed), 1000):  # one critical (fsynced) event per 1000
            mixed[i] = VramSealed(worker_id="bench", shard_id="s", device=0, nbytes=1,
                                  digest="ab" * 32, digest_alg="rfc6962-sha256",
                                  leaf_size=65536, backend="mock")  # fmt: skip
        results["mixed_0.1pct_critical"], _ = bench_mode(mixed, root / "mixed", "mixed")
        results["verify_records_per_s"], records = bench_verify(log_dir)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'measurement':<28}{'per second':>14}")
    for name, value in results.items():
        print(f"{name:<28}{value:>14,.0f}")
    print(f"(verified {records} records; naive baseline fsyncs each event like immediate mode)")


if __name__ == "__main__":
    main()
