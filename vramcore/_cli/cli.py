"""The ``vramcore`` command line.

Core commands: ``demo``, ``plugins``, ``devices``, ``seal PATH``, ``bench``; plugins add more
through ``vramcore_add_commands`` (the audit chain adds ``audit verify`` and ``audit show``).
Every command takes ``--json``. Exit codes: 0 ok; 1 an integrity, policy or audit failure was
found, or the operation failed; 2 usage or configuration error, or input that cannot be read.
Every failure is one line on stderr (one JSON object ``{"error": {...}}`` on stdout under
``--json``), never a traceback; text that did not come from vramcore is escaped first.

The worker token comes from ``VRAMCORE_WORKER_TOKEN``; ``demo``, ``seal`` and ``bench`` make an
ephemeral random one when it is unset and no audit log is configured (a seal only lives as long
as the process anyway) and show only its fingerprint.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import json
import logging
import os
import resource
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vramcore import __version__
from vramcore._cli.benchmark import tensor_count
from vramcore._cli.commands import (
    EXIT_FAILURE,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_USAGE,
    Commands,
    Console,
    SafeParser,
    UsageError,
    add_plugin_commands,
)
from vramcore._cli.config import ConfigReport, Doctor
from vramcore._cli.demo import cmd_bench, cmd_demo
from vramcore._cli.sealdir import add_signature_options, cmd_seal_dir
from vramcore._cli.support import (
    GIB,
    add_manager_options,
    count,
    fraction,
    human_bytes,
    make_manager,
    parse_size,
    rate,
    report_lines,
    sink_reports,
)
from vramcore._cli.verify import add_attestation_option, cmd_verify, write_attestation
from vramcore._config import Configuration, declared_settings
from vramcore.backend import log_host_memory
from vramcore.errors import (
    AuditError,
    BackendUnavailable,
    ConfigError,
    IntegrityViolation,
    InvalidInput,
    PolicyViolation,
    SealVerificationFailed,
    VramError,
)
from vramcore.plugins import (
    VramcorePluginManager,
    built_backend,
    collect_backends,
    get_plugin_manager,
    probe_devices,
)
from vramcore.validation import check_path, check_sha256_hex, check_shard_id, escape_text

__all__ = ["build_parser", "main", "version_text"]

# -- plugins / devices -------------------------------------------------------------------


def cmd_plugins(args: argparse.Namespace, console: Console, pm: VramcorePluginManager) -> int:
    """List loaded plugins, their hooks, the backends and why each can or cannot run."""
    backends = []
    for spec in sorted(collect_backends(pm).values(), key=lambda s: (-s.priority, s.name)):
        reason = spec.why_not()
        backends.append(
            {
                "name": spec.name,
                "priority": spec.priority,
                "viable": reason is None,
                "reason": reason,
                "install_hint": spec.install_hint,
                "description": spec.description,
                "host_memory": spec.host_memory,
            }
        )
    data = {
        "plugins": [
            {"name": p.name, "distribution": p.distribution, "version": p.version, "hooks": p.hooks}
            for p in pm.loaded
        ],
        "failures": [
            {"name": f.name, "distribution": f.distribution, "error": f.error} for f in pm.failures
        ],
        "backends": backends,
    }
    lines = ["Plugins:"]
    for p in pm.loaded:
        lines.append(f"  {p.name:<16} {p.distribution} {p.version}")
        lines.append(f"  {'':<16} hooks: {', '.join(p.hooks) or '-'}")
    if not pm.loaded:
        lines.append("  (none)")
    lines.append("Allocator backends:")
    for b in backends:
        state = "viable" if b["viable"] else f"not viable: {b['reason']}"
        if b["host_memory"]:
            state += " (host memory: used only when named)"
        lines.append(f"  {b['name']:<16} priority {b['priority']:>4}  {state}")
    if pm.failures:
        lines.append("Failed plugins (skipped):")
        lines.extend(f"  {f.name:<16} {f.distribution}: {f.error}" for f in pm.failures)
    console.result(data, "\n".join(lines))
    return EXIT_OK


def cmd_devices(args: argparse.Namespace, console: Console, pm: VramcorePluginManager) -> int:
    """Probe the backend's devices and give the VRAM-only policy's verdict on each."""
    from vramcore.plugins import select_backend
    from vramcore.policy import VramPolicy

    spec = select_backend(pm, args.allocator, source="--allocator")
    if spec.host_memory:
        log_host_memory(spec.name)
    backend = built_backend(spec)
    try:
        devices = probe_devices(pm, backend)
    finally:
        backend.close()
    policy = VramPolicy(strict_host_isolation=args.strict_host_isolation)
    rows = []
    lines = [f"Backend {spec.name}: {len(devices)} device(s)"]
    for info in devices:
        findings = policy.check_device(info)
        refusals = [f for f in findings if f.refused]
        notes = [f for f in findings if not f.refused]
        rows.append(
            {
                **info.to_dict(),
                "policy_ok": not refusals,
                "violations": [{"rule": f.rule, "detail": f.detail} for f in refusals],
                "reported": [{"rule": f.rule, "detail": f.detail} for f in notes],
            }
        )
        verdict = (
            "REFUSED: " + "; ".join(f.detail for f in refusals)
            if refusals
            else "OK" + "".join(f" (note: {f.detail})" for f in notes)
        )
        lines.append(
            f"  GPU {info.index}: {info.name}, {human_bytes(info.total_bytes)} "
            f"({human_bytes(info.free_bytes)} free) - {verdict}"
        )
    refused = any(not r["policy_ok"] for r in rows)
    console.result(
        {"backend": spec.name, "devices": rows, "policy_ok": not refused}, "\n".join(lines)
    )
    return EXIT_FAILURE if refused else EXIT_OK


# -- seal -----------------------------------------------------------------------------------


def cmd_seal(args: argparse.Namespace, console: Console, pm: VramcorePluginManager) -> int:
    """Seal a file into VRAM, verify it from VRAM, print the attestation and throughput.

    A directory is a model directory: see :mod:`vramcore._cli.sealdir`.
    """
    if isinstance(args.path, str) and os.path.isdir(args.path):
        return cmd_seal_dir(args, console, pm, Path(args.path))
    if args.signature is not None or args.public_key is not None:
        raise UsageError("--signature and --public-key need a model directory, not a file")
    if args.parallel is not None:
        raise UsageError("--parallel is for a model directory's shards, not a file")
    path = check_path(args.path, field="PATH")
    expected = (
        check_sha256_hex(args.expect_sha256, field="--expect-sha256")
        if args.expect_sha256 is not None
        else None
    )
    if args.shard_id is not None:
        check_shard_id(args.shard_id, field="--shard-id")
    size = path.stat().st_size
    with make_manager(args, console, pm) as manager:
        rss_before = _peak_rss()
        console.progress(
            f"sealing {path} ({human_bytes(size)}) on {manager.backend_name} GPU {manager.device}"
        )
        t0 = time.perf_counter()
        shard = manager.seal_file(
            path,
            shard_id=args.shard_id,
            expected_sha256=expected,
            progress=_progress_printer(console, size),
        )
        t1 = time.perf_counter()
        manager.verify_sealed(shard)
        t2 = time.perf_counter()
        manager.deallocate(shard)
    if args.attestation is not None:
        write_attestation(args.attestation, shard.to_json())
    reports = sink_reports(manager)
    peak = _peak_rss()
    # The mock keeps its "VRAM" in host memory; that part is not host overhead of sealing.
    stand_in = size if manager.backend_name == "mock" else 0
    overhead = max(0, peak - rss_before - stand_in)
    data = {
        "attestation": shard.to_dict(include_signature=False),
        "seal_seconds": round(t1 - t0, 6),
        "verify_seconds": round(t2 - t1, 6),
        # Four significant digits: a small file on a busy machine is not "0.0 GiB/s".
        "seal_throughput_gib_s": float(f"{size / max(t1 - t0, 1e-9) / GIB:.4g}"),
        "verify_throughput_gib_s": float(f"{size / max(t2 - t1, 1e-9) / GIB:.4g}"),
        "peak_rss_bytes": peak,
        "rss_before_seal_bytes": rss_before,
        "mock_vram_in_host_bytes": stand_in,
        "host_overhead_bytes": overhead,
        "audit": reports,
    }
    lines = [
        f"sealed   {shard.shard_id}: {human_bytes(size)} on GPU {shard.gpu_device}",
        f"digest   {shard.digest_alg} {shard.digest}",
        f"file     sha256 {shard.file_sha256 or 'not computed (give --expect-sha256 to check it)'}",
        f"tensors  {len(shard.tensors)}",
        f"seal     {(t1 - t0) * 1000:.1f} ms ({rate(size, t1 - t0)})",
        f"verify   {(t2 - t1) * 1000:.1f} ms ({rate(size, t2 - t1)})",
        f"memory   peak RSS {human_bytes(peak)} = {human_bytes(rss_before)} before sealing"
        + (f" + {human_bytes(stand_in)} mock stand-in VRAM" if stand_in else "")
        + f" + {human_bytes(overhead)} for sealing"
        + (f" ({overhead * 100 / size:.1f}% of the file)" if size >= (64 << 20) else ""),
    ]
    lines.extend(report_lines(reports))
    console.result(data, "\n".join(lines))
    return EXIT_OK


def _peak_rss() -> int:
    """This process's peak resident set size in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _progress_printer(console: Console, total: int) -> Any:
    """A ``progress`` callback drawing one updating line on an interactive stderr."""
    if console.json or total < (64 << 20) or not sys.stderr.isatty():
        return None
    start = time.perf_counter()

    def show(done: int, _total: int) -> None:
        speed = rate(done, time.perf_counter() - start)
        end = "\n" if done >= total else ""
        line = f"\r  loaded {done * 100 // total:3d}% ({speed})"
        print(line, end=end, file=sys.stderr, flush=True)

    return show


# -- main -----------------------------------------------------------------------------------


def build_parser(
    pm: VramcorePluginManager,
    config: Configuration | None = None,
    console: Console | None = None,
) -> argparse.ArgumentParser:
    """The full parser: core commands plus the plugins' ones (a plugin whose
    ``vramcore_add_commands`` fails loses its own commands; ``console`` says so).

    :param config: the configuration files read (``config`` and ``doctor`` show them).
    """
    config = Configuration() if config is None else config
    parser = SafeParser(
        prog="vramcore",
        description="Keep model weights resident in GPU memory, and prove it.",
    )
    parser.add_argument(
        "--version",
        action=_Version,
        version=version_text(pm),
        help="the versions of vramcore and of each loaded plugin",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=SafeParser)
    commands = Commands(sub)

    def core(handler: Any) -> Any:
        return lambda args, console: handler(args, console, pm)

    p = commands.add(
        "demo", help="seal, verify and tamper with a synthetic model", handler=core(cmd_demo)
    )
    add_manager_options(p)
    p.add_argument(
        "--keep-audit-log",
        action="store_true",
        help="keep the demo's temporary audit log (and print how to verify it)",
    )
    commands.add(
        "plugins", help="list plugins, hooks and allocator backends", handler=core(cmd_plugins)
    )
    p = commands.add(
        "devices", help="probe devices and check the VRAM-only policy", handler=core(cmd_devices)
    )
    p.add_argument("--allocator", help="backend name (default: VRAMCORE_ALLOCATOR or best)")
    p.add_argument(
        "--strict-host-isolation",
        action="store_true",
        help="refuse devices that can read pageable host memory (HMM/ATS), not just report them",
    )
    p = commands.add(
        "seal",
        help="seal a file or a model directory into VRAM, verify it, print the attestation",
        handler=core(cmd_seal),
    )
    p.add_argument(
        "path",
        metavar="PATH|DIR",
        help="file to seal (a .safetensors file gets a tensor map), or a model directory "
        "(one shard per *.safetensors file, its index checked)",
    )
    p.add_argument("--expect-sha256", help="the file's published SHA-256, checked while loading")
    p.add_argument(
        "--shard-id", help="shard id (default: the file name; for DIR the shard id prefix)"
    )
    add_signature_options(p)
    add_attestation_option(p)
    add_manager_options(p)
    p = commands.add(
        "verify",
        help="check a saved attestation (seal --attestation) under this worker's key",
        handler=core(cmd_verify),
    )
    p.add_argument("file", metavar="FILE", help="the attestation `seal --attestation` wrote")
    add_manager_options(p)
    p = commands.add(
        "bench",
        help="seal/verify throughput by shard size and worker count, against baselines",
        handler=core(cmd_bench),
    )
    p.add_argument(
        "--size",
        type=parse_size,
        action="append",
        help="a shard size, repeatable (default 64KiB to 1GiB)",
    )
    p.add_argument("--repeat", type=count, default=3, help="runs per measurement, best kept")
    p.add_argument(
        "--workers", type=count, action="append", help="hash worker count, repeatable (1 and all)"
    )
    p.add_argument(
        "--sample", type=fraction, default=0.01, help="sampled check fraction (default 0.01)"
    )
    p.add_argument("--quick", action="store_true", help="small sizes, one run each (CI smoke)")
    p.add_argument(
        "--tensors",
        type=tensor_count,
        help="tensors in the header-parse measurement (default 10^6, --quick 10^4; 0 skips it)",
    )
    p.add_argument("--plot", metavar="PNG", help="write a throughput plot (needs matplotlib)")
    add_manager_options(p)
    p = commands.add(
        "config",
        help="every setting's effective value and where it came from (file, environment, "
        "argument, default)",
        handler=ConfigReport(pm, config).run,
    )
    p.add_argument("--allocator", help="show the effect of --allocator NAME")
    commands.add(
        "doctor",
        help="for each backend, audit sink and witness: active or why not, and the fix",
        handler=Doctor(pm, config).run,
    )
    add_plugin_commands(pm, commands, console or Console(json_mode=False))
    return parser


def version_text(pm: VramcorePluginManager) -> str:
    """``vramcore --version``: the core's version, then each loaded plugin's distribution."""
    lines = [f"vramcore {__version__}"]
    lines += [f"  plugin {p.name}: {p.distribution} {p.version}" for p in pm.loaded]
    return "\n".join(lines)


class _Version(argparse.Action):
    """``--version`` printed as written, one line per plugin (argparse's own re-wraps it)."""

    def __init__(self, option_strings: Sequence[str], version: str, **kwargs: Any) -> None:
        super().__init__(option_strings, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.version = version

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any, **_kwargs: Any) -> None:
        print(self.version, flush=True)
        parser.exit()


_QUIET_LOGGERS = ("vramcore.narration", "vramcore.events")
#: Where the CLI's log handler sends records from: the core's loggers and the plugins'
#: (``vramcore.*``, and plugin packages logging under their module name, ``vramcore_*``).
_OURS = ("vramcore.", "vramcore_")
#: ``VRAMCORE_LOG_FORMAT``: ``text`` (one line per record) or ``json`` (one object per line).
LOG_FORMATS = ("text", "json")


class _OneLineFormatter(logging.Formatter):
    """Log records as one escaped line each; an exception is named, never a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            message += f" ({type(exc).__name__}: {exc})"
        return escape_text(f"vramcore: {record.name}: {message}".replace("\n", " "))


class _JsonFormatter(logging.Formatter):
    """One JSON object per record (``time``, ``level``, ``logger``, ``message``, ``error``);
    all non-ASCII escaped, an exception named, never a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            doc["error"] = f"{type(exc).__name__}: {exc}"
        return json.dumps(doc, ensure_ascii=True, sort_keys=True)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted: the handler outlives
    this ``main()`` call (a library manager made later in the process logs through it), and
    the stream it started with may be gone by then (a test's captured stderr)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class _Once(logging.Filter):
    """Let each message of one logger through once (the host-memory notice, however many
    managers a command makes)."""

    def __init__(self, logger: str) -> None:
        super().__init__()
        self._logger = logger
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != self._logger:
            return True
        message = record.getMessage()
        if message in self._seen:
            return False
        self._seen.add(message)
        return True


class _OursOnly(logging.Filter):
    """Records of vramcore and its plugins; narration and events only when verbose."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self._verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if name != "vramcore" and not name.startswith(_OURS):
            return False
        return self._verbose or not name.startswith(_QUIET_LOGGERS)


def _configure_logging(verbose: bool) -> None:
    """Warnings of vramcore and its plugins to stderr; narration and events only with -v.

    The CLI prints what matters itself; per-operation narration would repeat it. With
    ``VRAMCORE_LOG_FORMAT=json`` each record is one JSON object per line.

    :raises ConfigError: an unknown ``VRAMCORE_LOG_FORMAT``.
    """
    fmt = os.environ.get("VRAMCORE_LOG_FORMAT", "text").strip().lower() or "text"
    if fmt not in LOG_FORMATS:
        raise ConfigError(f"VRAMCORE_LOG_FORMAT={fmt[:20]!r} must be text or json")
    root = logging.getLogger()
    for logger in (root, logging.getLogger("vramcore")):
        for old in [h for h in logger.handlers if getattr(h, "_vramcore_cli", False)]:
            logger.removeHandler(old)
    level = logging.INFO if verbose else logging.WARNING
    handler = _StderrHandler()
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _OneLineFormatter())
    handler.setLevel(level)
    handler.addFilter(_OursOnly(verbose))
    handler.addFilter(_Once("vramcore.host_memory"))
    handler._vramcore_cli = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    logging.getLogger("vramcore").setLevel(level)
    if verbose and root.level > logging.INFO:
        root.setLevel(logging.INFO)  # plugin loggers named after their module inherit it


def _load_plugins(console: Console) -> VramcorePluginManager:
    """The plugin manager; a plugin skipped while loading is one warning line, not a Python
    warning with its source line (``vramcore plugins`` lists the failures in full)."""
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        pm = get_plugin_manager()
    for failure in pm.failures:
        console.progress(
            f"vramcore: warning: plugin {failure.name} ({failure.distribution}) skipped: "
            f"{failure.error}"
        )
    return pm


#: Error kinds the CLI reports (``error.kind`` under ``--json``) and their exit codes.
_KINDS: tuple[tuple[type[BaseException], str, int], ...] = (
    (UsageError, "usage", EXIT_USAGE),
    (InvalidInput, "invalid_input", EXIT_USAGE),
    (ConfigError, "configuration", EXIT_USAGE),
    (BackendUnavailable, "configuration", EXIT_USAGE),
    (PolicyViolation, "policy", EXIT_FAILURE),
    (IntegrityViolation, "integrity", EXIT_FAILURE),
    (SealVerificationFailed, "integrity", EXIT_FAILURE),
    (VramError, "failure", EXIT_FAILURE),
)


def _classify(exc: BaseException) -> tuple[str, int, str]:
    """``(kind, exit code, message)`` for an exception that ended a command."""
    if isinstance(exc, AuditError):
        return "audit", EXIT_USAGE if exc.configuration else EXIT_FAILURE, str(exc)
    for cls, kind, code in _KINDS:
        if isinstance(exc, cls):
            named = kind in ("policy", "integrity", "failure")
            return kind, code, f"{type(exc).__name__}: {exc}" if named else str(exc)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        problem = exc.strerror or type(exc).__name__
        if exc.errno in (errno.EACCES, errno.EPERM):
            problem = "permission denied (cannot read it)"
        return "unreadable_input", EXIT_USAGE, f"{where}{problem}"
    if isinstance(exc, SystemExit):
        message = (
            f"a plugin tried to end the process (SystemExit {exc.code!r}); the operation failed"
        )
        return "plugin_exit", EXIT_FAILURE, message
    if isinstance(exc, RecursionError):
        return "internal", EXIT_INTERNAL, "input nested too deeply to process"
    message = f"unexpected {type(exc).__name__}: {exc} (a bug: VRAMCORE_DEBUG=1 shows a traceback)"
    return "internal", EXIT_INTERNAL, message


def _quiet_broken_pipe() -> None:
    """The reader of our stdout went away (``| head``): send the rest nowhere, quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (a test's)
        pass


def _run(argv: list[str], console: Console, config: Configuration) -> int:
    """Load the plugins, check the configuration files, parse ``argv`` and run the command."""
    pm = _load_plugins(console)
    config.check(declared_settings(pm))
    parser = build_parser(pm, config, console)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    handler = getattr(args, "handler", None)
    if handler is None:
        (getattr(args, "group_parser", None) or parser).print_help(sys.stderr)
        return EXIT_USAGE
    return int(handler(args, console))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    json_mode = "--json" in argv
    console = Console(json_mode=json_mode)
    try:
        config = Configuration.load()
        with config.applied(os.environ):
            _configure_logging("-v" in argv or "--verbose" in argv)
            return _run(argv, console, config)
    except BrokenPipeError:
        _quiet_broken_pipe()
        return EXIT_FAILURE
    except KeyboardInterrupt:
        console.error("interrupted", kind="interrupted", exit_code=130)
        return 130
    except BaseException as exc:
        if os.environ.get("VRAMCORE_DEBUG") == "1":
            raise
        kind, code, message = _classify(exc)
        try:
            console.error(message, kind=kind, exit_code=code)
        except BrokenPipeError:
            _quiet_broken_pipe()
        return code


if __name__ == "__main__":
    sys.exit(main())
