"""Host-path benchmark of vramcore: seal and verify throughput on the mock backend.

Prints a table (and optionally JSON and a PNG plot) of seal/verify GiB/s for shard sizes from
64 KiB to 1 GiB, per hash-worker count, beside baselines measured in the same run: one-thread
SHA-256 of the same bytes, a memory copy, and model_signing's file hashing when installed.

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
from typing import Any

from vramcore import VramManager
from vramcore._cli.benchmark import DEFAULT_SIZES, QUICK_SIZES, format_table, plot, run
from vramcore.errors import VramError
from vramcore.plugins import get_plugin_manager

UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


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
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    capacity = 3 * max(sizes) + (64 << 20)
    pm = get_plugin_manager(env={"VRAMCORE_PLUGINS": "mock"})

    def make_manager(count: int) -> Any:
        return VramManager(
            "benchmark-token-" + "x" * 24,
            allocator=_mock(capacity),
            plugin_manager=pm,
            audit="disabled",
            hash_workers=count,
        )

    try:
        report = run(
            make_manager,
            sizes=sizes,
            workers=workers,
            repeat=1 if args.quick else args.repeat,
            sample=args.sample,
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


def _mock(capacity: int) -> Any:
    """The mock, keeping freed memory for reuse like CUDA's caching allocator: repeated seals
    then measure vramcore, not the VM's first touch of fresh host pages standing in for VRAM
    (a GPU has no such cost; the first of each best-of-N seals still pays it)."""
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="vramcore") if e.name == "mock"]
    return ep.load().MockBackend(devices=1, capacity=capacity, cache_bytes=capacity)


if __name__ == "__main__":
    sys.exit(main())
