"""Host-path benchmark of vramcore: seal and verify throughput on the mock backend.

Prints a table (and optionally JSON and a PNG plot) of seal/verify GiB/s for shard sizes from
64 KiB to 1 GiB, per hash-worker count, beside baselines measured in the same run: one-thread
SHA-256 of the same bytes, a memory copy, and model_signing's file hashing when installed;
then the fixed cost of one verification (no sink, and the audit chain in batched mode), a
header of 10^6 tensors parsed by vramcore and by the reference ``safetensors`` parser, and
the host path's goals checked as ratios of this run.

    .venv/bin/python benchmarks/host_bench.py            # full run (a few minutes, 2 cores)
    .venv/bin/python benchmarks/host_bench.py --quick    # CI smoke
    .venv/bin/python benchmarks/host_bench.py --json out.json --plot docs/host-bench.png

The model_signing baseline and the plot need the ``bench`` dependency group:
``python3 -m uv run --frozen --all-packages --group bench python benchmarks/host_bench.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any

from vramcore import VramManager
from vramcore._cli.benchmark import (
    DEFAULT_SIZES,
    DEFAULT_TENSORS,
    QUICK_SIZES,
    QUICK_TENSORS,
    format_table,
    plot,
    run,
    tensor_count,
)
from vramcore.errors import VramError
from vramcore.plugins import get_plugin_manager

UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_TOKEN = "L-fmS0T5762X2-dGXiq8c-wF4dqrOaamw_4OvBTkcoY"  # a throwaway random token


def size(text: str) -> int:
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        value = int(t[:-1]) * UNITS[t[-1]] if t and t[-1] in UNITS else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a size: {text!r} (e.g. 64KiB, 16MiB, 1GiB)"
        ) from None
    if not 1 <= value <= 64 << 30:
        raise argparse.ArgumentTypeError(f"size out of range (1 B to 64 GiB): {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=lambda s: [size(x) for x in s.split(",")])
    parser.add_argument("--workers", default=f"1,{os.cpu_count() or 2}")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sample", type=float, default=0.01)
    parser.add_argument(
        "--tensors", type=tensor_count, help="tensors in the header-parse measurement (0: skip)"
    )
    parser.add_argument("--quick", action="store_true", help="CI smoke: small sizes, repeat 1")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON")
    parser.add_argument("--plot", metavar="PNG", help="write a throughput plot (matplotlib)")
    args = parser.parse_args(argv)
    try:
        workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        parser.error("--workers takes a comma-separated list of integers, e.g. 1,2")
    if args.repeat < 1 or any(w < 1 for w in workers) or not 0 < args.sample <= 1:
        parser.error("--repeat and --workers must be >= 1, --sample in (0, 1]")
    tensors = (
        args.tensors
        if args.tensors is not None
        else (QUICK_TENSORS if args.quick else DEFAULT_TENSORS)
    )
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    capacity = 3 * max(sizes) + (64 << 20)
    pm = get_plugin_manager(env={"VRAMCORE_PLUGINS": "mock"})

    def make_manager(count: int, read_threads: int | None = None) -> Any:
        return VramManager(
            _TOKEN,
            allocator=caching_mock(capacity),
            plugin_manager=pm,
            audit="disabled",
            hash_workers=count,
            read_threads=read_threads,
        )

    try:
        with tempfile.TemporaryDirectory(prefix="vramcore-bench-audit-") as audit_dir:
            report = run(
                make_manager,
                sizes=sizes,
                workers=workers,
                repeat=1 if args.quick else args.repeat,
                sample=args.sample,
                tensors=tensors,
                make_audited_manager=_AuditedManager(audit_dir, max(workers)).make,
                plugin_manager=pm,
                progress=lambda line: print(line, file=sys.stderr, flush=True),
            )
        print(format_table(report))
        if args.json:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(report, fh, indent=2)
        if args.plot:
            plot(report, args.plot)
            print(f"plot written to {args.plot}", file=sys.stderr)
    except VramError as exc:
        print(f"host_bench: {exc}", file=sys.stderr)
        return 2
    return 0


class _AuditedManager:
    """A manager on the mock with the audit chain in ``batched`` mode, logging to a
    temporary directory (what a fixed-cost measurement with a sink needs)."""

    def __init__(self, directory: str, workers: int) -> None:
        self.directory = directory
        self.workers = workers

    def make(self) -> Any:
        env = {"VRAMCORE_AUDIT_LOG": self.directory, "VRAMCORE_AUDIT_DURABILITY": "batched"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the chain plugin reads its settings from the environment
        try:
            return VramManager(
                _TOKEN,
                allocator=caching_mock(64 << 20),
                plugin_manager=get_plugin_manager(env={"VRAMCORE_PLUGINS": "mock,audit_chain"}),
                hash_workers=self.workers,
            )
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def caching_mock(capacity: int) -> Any:
    """The mock, keeping freed memory for reuse like CUDA's caching allocator: repeated seals
    then measure vramcore, not the VM's first touch of fresh host pages standing in for VRAM
    (a GPU has no such cost; the first of each best-of-N seals still pays it)."""
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="vramcore") if e.name == "mock"]
    return ep.load().MockBackend(devices=1, capacity=capacity, cache_bytes=capacity)


if __name__ == "__main__":
    sys.exit(main())
