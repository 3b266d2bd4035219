"""Sealing a model directory with and without the publisher's signature (mock backend).

The signed seal checks each file's SHA-256 against the signed manifest as its bytes are
copied (one read of each byte); the target is at most 1.15x the unsigned seal's time. Run::

    uv run python benchmarks/seal_dir_bench.py [--mib 256] [--shards 2] [--repeat 3]
        [--parallel 1 2] [--cold] [--dir DIR] [--json] [--out FILE]

It writes a synthetic model of ``--shards`` shards (random F32 tensors) with an index, signs
it with ``model_signing`` (an EC key made on the spot; ``--signer cryptography`` writes the
same bundle form without it), and times ``VramManager.seal_dir`` on
the mock backend for each ``--parallel`` width: unsigned and signed seals alternate, each seal
deallocated before the next; the figures are the best of ``--repeat`` and the ratio is
signed / unsigned of those bests. Beside them it measures, in the same run, a plain read of
the files (cold or warm as the seals) and one SHA-256 stream in memory: the two rates that
bound a signed seal.

Two cases matter and give different answers:

* **warm** (the default): the files are in the page cache, the read costs nothing, and the
  seal is bound by hashing on the CPUs. The signed seal adds one sequential SHA-256 pass per
  file on top of the Merkle leaves; on a small host (2 CPUs) that is a cost the unsigned seal
  does not pay, whatever the overlap.
* **cold** (``--cold``): before every seal each file is flushed and dropped from the page
  cache (``posix_fadvise(POSIX_FADV_DONTNEED)``), so the seal reads from the disk as a worker
  does after a restart; the SHA-256 streams then hide behind the read. ``--dir`` must be on a
  disk file system for this (on tmpfs nothing can be dropped and cold equals warm).

The mock keeps freed memory for reuse (``cache_bytes``, like CUDA's caching allocator) and is
sized for the model, so repeated seals measure vramcore, not the VM's first touch of the fresh
host pages that stand in for VRAM (a GPU has no such cost).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from host_bench import caching_mock  # this folder: run as a script

from vramcore import VramManager
from vramcore.testing import publisher_keypair, sign_model_dir, write_synthetic_model_dir

_TOKEN = "Bn4Qw8Ez2Rt6Yu0Io3Pa7Sd1Fg5Hj9KlXc"


def drop_cache(files: list[Path]) -> None:
    """Ask the kernel to forget the files' cached pages, so the next read comes from disk."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class Bench:
    """Alternating unsigned and signed seals of one model on one manager."""

    def __init__(self, manager: VramManager, model: Path, files: list[Path], cold: bool) -> None:
        self.manager = manager
        self.model = model
        self.files = files
        self.cold = cold

    def seal(self, parallel: int, **signed: Path) -> tuple[float, float]:
        """Wall time and CPU time (all threads of this process) of one seal, then deallocated."""
        if self.cold:
            drop_cache(self.files)
        c0, t0 = time.process_time(), time.perf_counter()
        sealed = self.manager.seal_dir(self.model, parallel=parallel, **signed)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        for shard in sealed.shards:
            self.manager.deallocate(shard)
        return elapsed, cpu

    def pair(self, parallel: int, repeat: int, signature: Path, public: Path) -> dict[str, Any]:
        """Best unsigned and signed times of ``repeat`` alternating seals, and their ratio.

        Beside them the least CPU time each took: with every CPU busy a seal cannot take less
        wall time than its CPU time over the CPUs, so signed CPU / unsigned CPU is the lowest
        ratio this host can show for seals that are CPU-bound."""
        unsigned, signed = [], []
        for _ in range(repeat):
            unsigned.append(self.seal(parallel))
            signed.append(self.seal(parallel, signature=signature, public_key=public))
        wall_u, wall_s = min(t for t, _ in unsigned), min(t for t, _ in signed)
        cpu_u, cpu_s = min(c for _, c in unsigned), min(c for _, c in signed)
        return {
            "parallel": parallel,
            "unsigned_s": round(wall_u, 4),
            "signed_s": round(wall_s, 4),
            "ratio": round(wall_s / wall_u, 3),
            "unsigned_cpu_s": round(cpu_u, 4),
            "signed_cpu_s": round(cpu_s, 4),
            "cpu_ratio": round(cpu_s / cpu_u, 3),
            "unsigned_all_s": [round(t, 4) for t, _ in unsigned],
            "signed_all_s": [round(t, 4) for t, _ in signed],
        }


def sha256_rate(mib: int = 256) -> float:
    """One SHA-256 stream's rate in GB/s over ``mib`` MiB in memory (best of three): what
    one shard's signed-manifest check can reach."""
    data = os.urandom(mib << 20)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        hashlib.sha256(data).digest()
        best = min(best, time.perf_counter() - t0)
    return len(data) / best / 1e9


def read_rate(files: list[Path], cold: bool) -> float:
    """Plain sequential read of the files in GB/s (after dropping them from the cache if
    ``cold``): what the disk or page cache gives any seal."""
    if cold:
        drop_cache(files)
    total = 0
    t0 = time.perf_counter()
    for path in files:
        with path.open("rb", buffering=0) as fh:
            while chunk := fh.read(8 << 20):
                total += len(chunk)
    return total / (time.perf_counter() - t0) / 1e9


def main() -> int:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="model size in MiB (default 256)")
    parser.add_argument("--shards", type=int, default=2, help="shard files (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="seals of each kind (default 3)")
    parser.add_argument(
        "--parallel", type=int, nargs="+", default=[1], help="shards sealed at once (default 1)"
    )
    parser.add_argument("--cold", action="store_true", help="drop the page cache before seals")
    parser.add_argument("--dir", type=Path, default=None, help="where the model is written")
    parser.add_argument(
        "--signer",
        choices=("model_signing", "cryptography"),
        default="model_signing",
        help="what signs the model (default model_signing; cryptography: the test kit's own)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument(
        "--hash-workers", type=int, default=None, help="Merkle hashing threads (default: all)"
    )
    args = parser.parse_args()
    if args.mib < 1 or args.shards < 1 or args.repeat < 1 or (args.mib << 20) < 4 * args.shards:
        parser.error("--mib, --shards and --repeat must be positive, and each shard >= 4 bytes")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        where = Path(tmp)
        model = where / "bench-model"
        files = write_synthetic_model_dir(model, args.mib << 20, shards=args.shards)
        private, public = publisher_keypair(where)
        signature = where / "model.sig"
        sign_model_dir(model, private, signature, using=args.signer)
        capacity = 2 * (args.mib << 20) + (64 << 20)
        with VramManager(
            _TOKEN,
            allocator=caching_mock(capacity),
            audit="disabled",
            hash_workers=args.hash_workers,
        ) as manager:
            bench = Bench(manager, model, files, args.cold)
            runs = [bench.pair(p, args.repeat, signature, public) for p in args.parallel]
        read_gbps = read_rate(files, args.cold)
    sha_gbps = sha256_rate()
    result = {
        "benchmark": "seal_dir_bench",
        "case": "cold" if args.cold else "warm",
        "model_mib": args.mib,
        "shards": args.shards,
        "repeat": args.repeat,
        "hash_workers": args.hash_workers,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "processor": platform.processor() or platform.machine(),
        },
        "read_gbps": round(read_gbps, 3),
        "sha256_one_stream_gbps": round(sha_gbps, 3),
        "runs": runs,
    }
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"plain read of the files ({result['case']}) {read_gbps:.2f} GB/s; one SHA-256 "
            f"stream {sha_gbps:.2f} GB/s"
        )
        for run in runs:
            print(
                f"seal_dir {result['case']}, {args.mib} MiB in {args.shards} shards, parallel "
                f"{run['parallel']}: unsigned {run['unsigned_s']:.3f} s, signed "
                f"{run['signed_s']:.3f} s, ratio {run['ratio']:.3f} (target <= 1.15) on "
                f"{result['machine']['cpus']} CPUs; CPU time {run['unsigned_cpu_s']:.3f} s and "
                f"{run['signed_cpu_s']:.3f} s ({run['cpu_ratio']:.3f}x)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
