"""Helpers shared by the core CLI commands (sizes, rates, the manager, sink reports)."""

from __future__ import annotations

import argparse
import math
import os
import secrets
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

from vramcore._cli.commands import Console, UsageError
from vramcore._keyproviders import read_worker_token
from vramcore.audit import AuditMode
from vramcore.backend import AllocatorBackend
from vramcore.errors import AuditError, ConfigError, InvalidInput
from vramcore.plugins import VramcorePluginManager
from vramcore.seal import TOKEN_ADVICE, WorkerToken

__all__ = [
    "AUDIT_ADVICE",
    "AUDIT_CONFIG_ADVICE",
    "GIB",
    "MAX_BENCH_BYTES",
    "add_manager_options",
    "cli_command",
    "count",
    "human_bytes",
    "make_backend",
    "make_manager",
    "parse_size",
    "rate",
    "report_lines",
    "sink_reports",
    "worker_token",
]

#: Bytes in a GiB.
GIB = 1 << 30
#: Largest ``bench --size`` (it holds the data in host memory twice on the mock).
MAX_BENCH_BYTES = 16 * GIB
#: What to do when no audit sink is configured, in the CLI's own words.
AUDIT_ADVICE = (
    "no durable audit sink is configured: install the audit chain plugin (from a clone of "
    "the vramcore repository: pip install ./plugins/audit_chain) and set "
    "VRAMCORE_AUDIT_LOG=/path/to/dir together with VRAMCORE_WORKER_TOKEN, or pass --no-audit "
    "to run without an audit trail on purpose"
)
#: The same when the audit chain plugin is installed but not configured.
AUDIT_CONFIG_ADVICE = (
    "no durable audit sink is configured: the audit chain plugin is installed but "
    "VRAMCORE_AUDIT_LOG is not set; set VRAMCORE_AUDIT_LOG=/path/to/dir together with "
    "VRAMCORE_WORKER_TOKEN, or pass --no-audit to run without an audit trail on purpose"
)


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def rate(nbytes: int, seconds: float) -> str:
    """Throughput as text, in the unit that shows it (a small file is MiB/s, not 0.00 GiB/s)."""
    per_second = nbytes / max(seconds, 1e-9)
    if per_second >= GIB:
        return f"{per_second / GIB:.2f} GiB/s"
    return f"{per_second / (1 << 20):.1f} MiB/s"


def parse_size(text: str) -> int:
    """Parse ``"64MiB"``, ``"1G"`` or ``"4096"`` (argparse ``type=``)."""
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in units else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 64MiB or 1GiB)") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"size must be a positive number of bytes: {text!r}")
    return max(1, int(value * units[unit]))


def count(text: str) -> int:
    """A positive integer (argparse ``type=`` for ``--repeat``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def fraction(text: str) -> float:
    """A number in ``(0, 1]`` (argparse ``type=`` for ``--sample``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text!r}")
    return value


def device_index(text: str) -> int:
    """A device index, 0 or more (argparse ``type=`` for ``--device``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a device index: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def worker_token(console: Console, *, audit: bool) -> WorkerToken:
    """The worker token from ``VRAMCORE_WORKER_TOKEN``, ``VRAMCORE_WORKER_TOKEN_FILE`` or
    ``VRAMCORE_WORKER_TOKEN_KEYRING`` (wrapped as it is read: see
    :func:`vramcore._keyproviders.read_worker_token`), or an ephemeral random token (and a
    note saying so).

    :raises InvalidInput: the token is no usable secret (the message names its source).
    :raises ConfigError: the token file or keyring cannot give it (the message says why).
    :raises UsageError: no token is set while ``VRAMCORE_AUDIT_LOG`` is set: the log would be
        bound to a random token and the next run could not continue it.
    """
    token = read_worker_token()
    if token is not None:
        return token
    if audit and os.environ.get("VRAMCORE_AUDIT_LOG"):
        raise UsageError(
            "VRAMCORE_AUDIT_LOG is set but VRAMCORE_WORKER_TOKEN is not: an audit log is bound "
            f"to the worker token, so set VRAMCORE_WORKER_TOKEN ({TOKEN_ADVICE}) or "
            "VRAMCORE_WORKER_TOKEN_FILE, or pass --no-audit"
        )
    console.progress("VRAMCORE_WORKER_TOKEN is unset: using an ephemeral random token")
    return WorkerToken(secrets.token_urlsafe(32))


#: ``VRAMCORE_AUDIT_MODE``: how the CLI's managers audit unless ``--no-audit`` disables it.
#: ``disabled`` is not among them: running without an audit trail is asked for each time.
CLI_AUDIT_MODES = ("required", "best_effort")


def audit_mode() -> AuditMode:
    """``VRAMCORE_AUDIT_MODE`` (``required`` when unset).

    :raises UsageError: another value (the message names the variable).
    """
    text = os.environ.get("VRAMCORE_AUDIT_MODE", "").strip() or "required"
    if text == "required":
        return "required"
    if text == "best_effort":
        return "best_effort"
    raise UsageError(
        f"VRAMCORE_AUDIT_MODE={text[:20]!r} must be required or best_effort "
        "(--no-audit runs without an audit trail)"
    )


def make_manager(
    args: argparse.Namespace,
    console: Console,
    pm: VramcorePluginManager,
    *,
    temporary_log: bool = False,
    hash_workers: int | None = None,
    read_threads: int | None = None,
    backend: AllocatorBackend | None = None,
) -> Any:
    """A manager from the ``--allocator``, ``--device`` and ``--no-audit`` options.

    :param temporary_log: the audit log is the caller's own throw-away directory (the demo),
        so an ephemeral token is fine for it.
    :param hash_workers: host hashing threads (default: the manager's).
    :param read_threads: threads reading a file to seal (default: the manager's).
    :param backend: a backend the caller built (:func:`make_backend`) and closes itself;
        default: the manager builds and owns the one ``--allocator`` names.
    """
    from vramcore.manager import VramManager
    from vramcore.plugins import select_backend

    audit = not args.no_audit
    mode = audit_mode() if audit else "disabled"
    token = worker_token(console, audit=audit and not temporary_log)
    if backend is None and args.allocator is not None:
        select_backend(pm, args.allocator, source="--allocator")  # its message names the flag
    try:
        return VramManager(
            token,
            device=args.device,
            allocator=backend if backend is not None else args.allocator,
            plugin_manager=pm,
            audit=mode,
            hash_workers=hash_workers,
            read_threads=read_threads,
        )
    except AuditError as exc:
        if exc.configuration:
            chain = any(p.name == "audit_chain" for p in pm.loaded)
            no_log = not os.environ.get("VRAMCORE_AUDIT_LOG")
            raise UsageError(AUDIT_CONFIG_ADVICE if chain and no_log else AUDIT_ADVICE) from None
        raise
    except InvalidInput as exc:
        if f"device {args.device} " in str(exc):
            raise UsageError(f"--device {args.device}: {exc}") from None
        raise


def make_backend(args: argparse.Namespace, pm: VramcorePluginManager) -> AllocatorBackend:
    """The backend ``--allocator`` names (else the selection's choice), for a caller that
    needs the backend object itself (the demo's fault injection); the caller closes it.

    :raises UsageError: ``--allocator`` names an unknown or non-viable backend.
    :raises ConfigError: the plugin's factory built something that is not a backend.
    """
    from vramcore.plugins import select_backend

    backend = select_backend(pm, args.allocator, source="--allocator").factory()
    if not isinstance(backend, AllocatorBackend):
        raise ConfigError(f"the allocator plugin built a {type(backend).__name__}, not a backend")
    return backend


def add_manager_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--allocator``, ``--device`` and ``--no-audit``."""
    parser.add_argument("--allocator", help="backend name (default: VRAMCORE_ALLOCATOR or best)")
    parser.add_argument("--device", type=device_index, default=0, help="device index (default 0)")
    parser.add_argument(
        "--no-audit", action="store_true", help="run without an audit trail, on purpose"
    )


def cli_command() -> str:
    """How to run this ``vramcore`` again from the user's shell, exactly as printed.

    ``vramcore`` when the shell finds this very installation on its ``PATH``; else the
    absolute path of this environment's script (under ``./dev`` or ``uv run`` the venv is on
    ``PATH`` for this process only); else ``python -m vramcore``.
    """
    script = Path(sys.executable).parent / "vramcore"
    found = shutil.which("vramcore")
    under_uv = "UV_RUN_RECURSION_DEPTH" in os.environ
    if found and script.exists() and not under_uv and Path(found).resolve() == script.resolve():
        return "vramcore"
    if script.exists():
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m vramcore"


def sink_reports(manager: Any) -> list[dict[str, Any]]:
    """Each sink's :meth:`~vramcore.audit.AuditSink.report` (after close), tagged by name."""
    reports = []
    for sink in manager.sinks:
        report = sink.report()
        if report is not None:
            reports.append({"sink": sink.name, **dict(report)})
    return reports


def report_lines(reports: list[dict[str, Any]]) -> list[str]:
    """One line per sink report (short values); its hint and warning on lines of their own.

    A hint that tells the user to run ``vramcore ...`` is rewritten with :func:`cli_command`
    so it works as printed.
    """
    lines = []
    command = cli_command()
    for report in reports:
        shown = [
            f"{k}={v}"
            for k, v in report.items()
            if k not in ("sink", "warning", "hint") and (k == "path" or len(str(v)) <= 24)
        ]
        lines.append(f"audit    {report['sink']}: {', '.join(shown)}")
        for label in ("hint", "warning"):
            text = report.get(label)
            if text:
                if label == "hint" and command != "vramcore":
                    text = str(text).replace("vramcore audit ", f"{command} audit ")
                lines.append(f"         {label}: {text}")
    return lines
