"""Throughput of the audit chain on this machine, next to a naive baseline.

Prints events/s for each durability mode, the naive baseline (one ``json.dumps`` + HMAC +
``write`` + ``fsync`` per event) measured in the same run, and verifier records/s.

Witnessed durability (a head with every durable commit) is measured per mode with a file
witness, beside the previous head policy (heads only at open, checkpoints, critical events and
close, which left acknowledged events unwitnessed) and beside no witness, in the same run.

``--fleet N`` runs N writer processes (immediate mode, the strictest) sharing one file witness
for ``--seconds`` and prints heads/s per worker, in all, and bytes per head.

``--verify-records N`` (e.g. 1000000) also writes a log of N records and verifies it in a fresh
process (one core: the verifier is single-threaded), in full and public-key mode, with a
witness file as anchor: records/s, the process's peak RSS over its RSS before verifying, and
the ratio to a baseline that only reads the same files line by line and HMACs each line.

    .venv/bin/python plugins/audit_chain/benchmarks/bench_chain.py [--events N] [--json]
    .venv/bin/python plugins/audit_chain/benchmarks/bench_chain.py --verify-records 1000000
    .venv/bin/python plugins/audit_chain/benchmarks/bench_chain.py --fleet 32 --seconds 5
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from vramcore_audit_chain import ChainConfig, ChainSink, FileWitness, load_key_file, verify_log

from vramcore.audit import SinkContext
from vramcore.events import SealVerified, VramSealed
from vramcore.seal import WorkerToken

_TOKEN = "bench-token-9f3c2a7e51d84b06a1c7e2f9d3b5a8c4"  # noqa: S105 - a throwaway token


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
    events: list[Any],
    directory: Path,
    mode: str,
    threads: int = 1,
    witness: bool = False,
    every_commit: bool = True,
) -> tuple[float, Path]:
    """Emit ``events`` through a sink in ``mode``; events/s including the final close.

    :param witness: publish heads to a file witness (next to the log directory).
    :param every_commit: ``False`` measures the previous head policy (see the module doc).
    """
    cfg = ChainConfig(directory=directory, durability=mode)
    witnesses = [FileWitness(directory.with_name(directory.name + ".witness"))] if witness else []
    sink = ChainSink(
        cfg,
        SinkContext.from_token(
            WorkerToken(_TOKEN),
            worker_id="bench",
            device=0,
            scope="vramcore-audit-chain:audit_chain",
        ),
        witnesses=witnesses,
    )
    sink._writer.heads_every_commit = every_commit  # the benchmark's own measurement knob
    per = len(events) // threads

    def work(part: list[Any]) -> None:
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


_VERIFY_CHILD = r"""
import hashlib, hmac, json, sys, time
from pathlib import Path

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0

from vramcore_audit_chain import load_anchors, load_key_file, load_public_key, verify_log
from vramcore_audit_chain import _format as fmt

directory, witness, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
before = status("VmRSS")
start = time.perf_counter()
if mode == "baseline":
    key = load_key_file(directory / "auditor-initial.key").initial_key
    n = 0
    for _, path in fmt.log_files(directory):
        with path.open("rb") as f:
            for line in f:
                hmac.digest(key, line, "sha256")
                n += 1
    records, ok = n, True
else:
    kwargs = {"anchors": load_anchors([witness])}
    if mode == "full":
        kwargs["initial_key"] = load_key_file(directory / "auditor-initial.key").initial_key
    else:
        kwargs["public_key"] = load_public_key(str(directory / "checkpoint.pub"))
    result = verify_log([directory], **kwargs)
    records, ok = result.records, result.ok and result.anchors > 0
elapsed = time.perf_counter() - start
after = status("VmHWM")
print(json.dumps({"records": records, "seconds": elapsed, "ok": ok,
                  "rss_before_kib": before, "rss_peak_kib": after}))
"""


def bench_verify_large(records: int, root: Path) -> dict[str, Any]:
    """Write a log of ``records`` records with a file witness; verify it in fresh processes."""
    directory, witness = root / "large", root / "witness.ndjson"
    context = SinkContext.from_token(
        WorkerToken(_TOKEN), worker_id="bench", device=0, scope="vramcore-audit-chain:audit_chain"
    )
    sink = ChainSink(
        ChainConfig(directory=directory, durability="batched"),
        context,
        witnesses=[FileWitness(witness)],
    )
    chunk = _events(10_000)
    for _ in range(records // len(chunk)):
        for event in chunk:
            sink.emit(event)
    sink.close()
    size = sum(p.stat().st_size for p in directory.iterdir() if p.name.startswith("audit-"))
    out: dict[str, Any] = {"log_bytes": size}
    for mode in ("baseline", "full", "public-key"):
        done = subprocess.run(
            [sys.executable, "-c", _VERIFY_CHILD, str(directory), str(witness), mode],
            check=True,
            capture_output=True,
            text=True,
        )
        doc = json.loads(done.stdout)
        if not doc["ok"]:
            raise SystemExit(f"verification failed in {mode} mode")
        out[mode] = {
            "records_per_s": doc["records"] / doc["seconds"],
            "records": doc["records"],
            "peak_rss_growth_mib": max(0, doc["rss_peak_kib"] - doc["rss_before_kib"]) / 1024,
            "peak_rss_mib": doc["rss_peak_kib"] / 1024,
        }
    return out


def _fleet_worker(root: Path, witness: Path, index: int, seconds: float) -> None:
    sink = ChainSink(
        ChainConfig(directory=root / f"worker-{index}", durability="immediate"),
        SinkContext.from_token(
            WorkerToken(f"{_TOKEN}-{index}"),
            worker_id=f"w{index}",
            device=0,
            scope="vramcore-audit-chain:audit_chain",
        ),
        witnesses=[FileWitness(witness)],
    )
    events = _events(1000)
    sent = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sink.emit(events[sent % 1000])
        sent += 1
    sink.close()
    (root / f"result-{index}.json").write_text(
        json.dumps({"sent": sent, "heads": sink.report()["heads_published"]})  # type: ignore[index]
    )


def bench_fleet(workers: int, seconds: float, root: Path) -> dict[str, Any]:
    """``workers`` processes share one file witness for ``seconds``: heads/s and bytes/head."""
    witness = root / "shared.heads"
    pids = []
    for index in range(workers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _fleet_worker(root, witness, index, seconds)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit("a fleet worker failed")
    done = [json.loads((root / f"result-{i}.json").read_text()) for i in range(workers)]
    heads = sum(d["heads"] for d in done)
    size = witness.stat().st_size
    return {
        "workers": workers,
        "seconds": seconds,
        "events_per_s_per_worker": sum(d["sent"] for d in done) / seconds / workers,
        "heads_per_s_per_worker": heads / seconds / workers,
        "heads_per_s_total": heads / seconds,
        "bytes_per_head": size / heads,
        "witness_bytes_per_s": size / seconds,
    }


def main() -> None:
    """Run every measurement and print a table (or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="events for batched mode")
    parser.add_argument("--sync-events", type=int, default=2_000, help="events for fsync modes")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--verify-records",
        type=int,
        default=0,
        help="also verify a log of this many records in a fresh process (memory, records/s)",
    )
    parser.add_argument("--fleet", type=int, default=0, help="writer processes sharing a witness")
    parser.add_argument("--seconds", type=float, default=5.0, help="how long the fleet writes")
    args = parser.parse_args()
    if args.fleet:
        with tempfile.TemporaryDirectory(prefix="vramcore-bench-") as tmp:
            fleet = bench_fleet(args.fleet, args.seconds, Path(tmp))
        print(json.dumps(fleet, indent=2))
        return
    if args.verify_records:
        with tempfile.TemporaryDirectory(prefix="vramcore-bench-") as tmp:
            large = bench_verify_large(args.verify_records, Path(tmp))
        if args.json:
            print(json.dumps(large, indent=2))
            return
        base = large["baseline"]["records_per_s"]
        print(f"log of {large['full']['records']:,} records, {large['log_bytes'] / 2**20:,.0f} MiB")
        print(f"{'mode':<12}{'records/s':>12}{'vs baseline':>13}{'peak RSS growth':>17}")
        for mode in ("baseline", "full", "public-key"):
            r = large[mode]
            print(
                f"{mode:<12}{r['records_per_s']:>12,.0f}{r['records_per_s'] / base:>12.2f}x"
                f"{r['peak_rss_growth_mib']:>13.1f} MiB"
            )
        print("(baseline: read each line and HMAC it, nothing else; one core; fresh processes)")
        return
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
        results["mixed_0.1pct_critical_file_witness"], _ = bench_mode(
            mixed, root / "mixed-w", "mixed", witness=True
        )
        critical = [mixed[0]] * args.sync_events  # every event critical: a head after each
        results["immediate_all_critical"], _ = bench_mode(critical, root / "crit", "immediate")
        results["immediate_all_critical_file_witness"], _ = bench_mode(
            critical, root / "crit-w", "immediate", witness=True
        )
        # Witnessed durability per mode: no witness / previous head policy / a head per commit.
        plain = _events(args.sync_events)
        for mode, sample in (
            ("immediate", plain),
            ("mixed", mixed[: args.events // 4]),
            ("batched", batched[: args.events // 4]),
        ):
            for label, witness, every in (
                ("no_witness", False, True),
                ("file_witness_previous_heads", True, False),
                ("file_witness_every_commit", True, True),
            ):
                results[f"witnessed_{mode}_{label}"], _ = bench_mode(
                    sample, root / f"w-{mode}-{label}", mode, witness=witness, every_commit=every
                )
        results["verify_records_per_s"], records = bench_verify(log_dir)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'measurement':<56}{'per second':>14}")
    for name, value in results.items():
        print(f"{name:<56}{value:>14,.0f}")
    print(f"(verified {records} records; naive baseline fsyncs each event like immediate mode)")


if __name__ == "__main__":
    main()
