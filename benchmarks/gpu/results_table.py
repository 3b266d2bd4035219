"""Turn a ``scripts/gpu-check`` report into the README "Performance" table, and keep it.

    python benchmarks/gpu/results_table.py OUT/gpu-report.json [--save benchmarks/results]

prints a Markdown table (GPU, driver, commit and the reproducing command above it; for each
backend the device-side verify GB/s by shard size beside the device's copy bandwidth, the host
path, host→device bandwidth and seal-from-file, with the issue-9 targets) and, with ``--save``,
copies the report to ``<dir>/<date>-<gpu>.json``. A dry-run or ``--fake`` report is refused:
its numbers come from no GPU.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

GiB = 1 << 30


class NotAGpuRun(ValueError):
    """The report did not come from a GPU (dry run or fake runtime)."""


def _gpu(report: dict[str, Any]) -> dict[str, str]:
    gpus = report.get("environment", {}).get("gpus") or [{}]
    return {k: str(v) for k, v in gpus[0].items()}


def render(report: dict[str, Any]) -> str:
    """The Markdown block for the README (raises :class:`NotAGpuRun` for fake figures)."""
    bench = report.get("benchmark") or {}
    if report.get("dry_run") or bench.get("mode") == "fake":
        raise NotAGpuRun("this report comes from a dry run on a fake CUDA runtime, not a GPU")
    gpu = _gpu(report)
    commit = (report.get("environment", {}).get("commit") or "unknown")[:12]
    mode = report.get("mode", "full")
    command = "scripts/gpu-check" + (" --quick" if mode == "quick" else "")
    ref = bench.get("device_copy") or {}
    copy = ref.get("copy_gbps")
    lines = [
        f"Measured on {gpu.get('name', 'unknown GPU')}, driver {gpu.get('driver_version', '?')}, "
        f"commit `{commit}`, {report.get('started_utc', '')[:10]}, with `{command}` "
        f"(device copy bandwidth {copy if copy is not None else 'n/a'} GB/s copied).",
        "",
        "| backend | measure | result | target |",
        "|---|---|---|---|",
    ]
    for res in bench.get("backends", []):
        name = res.get("backend", "?")
        if "verify" not in res:
            why = res.get("skipped") or res.get("error") or "no figures"
            lines.append(f"| {name} | — | not measured: {why} | — |")
            continue
        for row in res["verify"]:
            size = f"{row['bytes'] / GiB:g} GiB"
            target = (
                ">= 300 GB/s"
                if row["bytes"] >= 4 * GiB
                else (">= 100 GB/s" if row["bytes"] == GiB else "—")
            )
            if "device_digest_gbps" not in row:  # the digest ran on the host: not timed
                lines.append(f"| {name} | device verify, {size} | not on device | {target} |")
                continue
            share = f" ({row['device_digest_gbps'] / copy:.2f}x copy)" if copy else ""
            lines.append(
                f"| {name} | device verify, {size} | {row['device_digest_gbps']} GB/s{share} "
                f"| {target} |"
            )
            if "host_path_gbps" in row:
                lines.append(
                    f"| {name} | host path, {size} | {row['host_path_gbps']} GB/s "
                    f"(device {row['device_over_host']}x) | device >= 20x |"
                )
        seal = res.get("seal_file", {})
        lines.append(f"| {name} | host→device copy | {res.get('h2d_gbps')} GB/s | — |")
        lines.append(
            f"| {name} | seal from cached file, {seal.get('bytes', 0) / GiB:g} GiB | "
            f"{seal.get('seal_gbps')} GB/s ({seal.get('over_h2d')}x h2d) | >= 0.8x h2d |"
        )
        missed = [k for k, t in res.get("targets", {}).items() if t.get("met") is False]
        if missed:
            lines.append(f"| {name} | targets missed | {', '.join(missed)} | — |")
    for row in (report.get("kernel") or {}).get("sizes", []):
        if "leaf_gbps" in row:
            check = "root = host" if row.get("host_root_matches") else "root not checked"
            lines.append(
                f"| native kernel | leaf hashes, {row['bytes'] / GiB:g} GiB | "
                f"{row['leaf_gbps']} GB/s, tree {row['tree_ms']} ms ({check}) | — |"
            )
    tests = report.get("tests", {}).get("counts", {})
    lines += ["", f"GPU tests: {', '.join(f'{v} {k}' for k, v in sorted(tests.items()))}."]
    return "\n".join(lines)


def result_name(report: dict[str, Any]) -> str:
    """``<date>-<gpu>.json`` for ``benchmarks/results``."""
    gpu = re.sub(r"[^a-z0-9]+", "-", _gpu(report).get("name", "gpu").lower()).strip("-")
    return f"{report.get('started_utc', '')[:10] or 'undated'}-{gpu or 'gpu'}.json"


def main(argv: list[str] | None = None) -> int:
    """Print the table; ``--save DIR`` keeps the report. Exit 2 for a non-GPU report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("report", type=Path)
    p.add_argument("--save", type=Path, help="folder to copy the report into")
    args = p.parse_args(argv)
    report = json.loads(args.report.read_text())
    try:
        print(render(report))
    except NotAGpuRun as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        dest = args.save / result_name(report)
        shutil.copyfile(args.report, dest)
        print(f"saved {dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
