"""Helpers shared by the core CLI commands (sizes, rates, the manager, sink reports)."""

from __future__ import annotations

import argparse
import os
import secrets
from typing import Any

from vramcore.commands import Console
from vramcore.plugins import VramcorePluginManager

__all__ = [
    "GIB",
    "add_manager_options",
    "human_bytes",
    "make_manager",
    "parse_size",
    "rate",
    "report_lines",
    "sink_reports",
    "worker_token",
]

#: Bytes in a GiB.
GIB = 1 << 30


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def rate(nbytes: int, seconds: float) -> str:
    """Throughput in GiB/s, as text."""
    return f"{nbytes / max(seconds, 1e-9) / GIB:.2f} GiB/s"


def parse_size(text: str) -> int:
    """Parse ``"64MiB"``, ``"1G"`` or ``"4096"`` (argparse ``type=``)."""
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in units else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 64MiB or 1GiB)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return int(value * units[unit])


def worker_token(console: Console) -> str:
    """``VRAMCORE_WORKER_TOKEN``, or an ephemeral random token (and a note saying so)."""
    token = os.environ.get("VRAMCORE_WORKER_TOKEN")
    if token:
        return token
    console.progress("VRAMCORE_WORKER_TOKEN is unset: using an ephemeral random token")
    return secrets.token_urlsafe(32)


def make_manager(args: argparse.Namespace, console: Console, pm: VramcorePluginManager) -> Any:
    """A manager from the ``--allocator``, ``--device`` and ``--no-audit`` options."""
    from vramcore.manager import VramManager

    return VramManager(
        worker_token(console),
        device=args.device,
        allocator=args.allocator,
        plugin_manager=pm,
        audit="disabled" if args.no_audit else "required",
    )


def add_manager_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--allocator``, ``--device`` and ``--no-audit``."""
    parser.add_argument("--allocator", help="backend name (default: VRAMCORE_ALLOCATOR or best)")
    parser.add_argument("--device", type=int, default=0, help="device index (default 0)")
    parser.add_argument(
        "--no-audit", action="store_true", help="run without audit sinks (audit='disabled')"
    )


def sink_reports(manager: Any) -> list[dict[str, Any]]:
    """Each sink's :meth:`~vramcore.audit.AuditSink.report` (after close), tagged by name."""
    reports = []
    for sink in manager.sinks:
        report = sink.report()
        if report is not None:
            reports.append({"sink": sink.name, **dict(report)})
    return reports


def report_lines(reports: list[dict[str, Any]]) -> list[str]:
    """One line per sink report (short values); its hint and warning on lines of their own."""
    lines = []
    for report in reports:
        shown = [
            f"{k}={v}"
            for k, v in report.items()
            if k not in ("sink", "warning", "hint") and (k == "path" or len(str(v)) <= 24)
        ]
        lines.append(f"audit    {report['sink']}: {', '.join(shown)}")
        for label in ("hint", "warning"):
            if report.get(label):
                lines.append(f"         {label}: {report[label]}")
    return lines
