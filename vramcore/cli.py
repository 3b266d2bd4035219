"""The ``vramcore`` command line.

Core commands: ``demo``, ``plugins``, ``devices``, ``seal PATH``, ``bench``; plugins add more
through ``vramcore_add_commands`` (the audit chain adds ``audit verify`` and ``audit show``).
Every command takes ``--json``. Exit codes: 0 ok; 1 an integrity, policy or audit failure was
found, or the operation failed; 2 usage or configuration error. A user mistake is one line on
stderr, never a traceback.

The worker token comes from ``VRAMCORE_WORKER_TOKEN``; ``demo``, ``seal`` and ``bench`` make an
ephemeral random one when it is unset (a seal only lives as long as the process anyway) and
show only its fingerprint.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import resource
import secrets
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vramcore import __version__
from vramcore.commands import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, Commands, Console, UsageError
from vramcore.errors import (
    AuditError,
    ConfigError,
    IntegrityViolation,
    InvalidInput,
    PolicyViolation,
    SealVerificationFailed,
    VramError,
)
from vramcore.plugins import VramcorePluginManager, collect_backends, get_plugin_manager

__all__ = ["build_parser", "main"]

_GIB = 1 << 30


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / max(seconds, 1e-9) / _GIB:.2f} GiB/s"


def _parse_size(text: str) -> int:
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


def _token(console: Console) -> str:
    token = os.environ.get("VRAMCORE_WORKER_TOKEN")
    if token:
        return token
    console.progress("VRAMCORE_WORKER_TOKEN is unset: using an ephemeral random token")
    return secrets.token_urlsafe(32)


def _manager(args: argparse.Namespace, console: Console, pm: VramcorePluginManager) -> Any:
    from vramcore.manager import VramManager

    return VramManager(
        _token(console),
        device=args.device,
        allocator=args.allocator,
        plugin_manager=pm,
        audit="disabled" if args.no_audit else "required",
    )


def _add_manager_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allocator", help="backend name (default: VRAMCORE_ALLOCATOR or best)")
    parser.add_argument("--device", type=int, default=0, help="device index (default 0)")
    parser.add_argument(
        "--no-audit", action="store_true", help="run without audit sinks (audit='disabled')"
    )


def _sink_reports(manager: Any) -> list[dict[str, Any]]:
    reports = []
    for sink in manager.sinks:
        report = sink.report()
        if report is not None:
            reports.append({"sink": sink.name, **dict(report)})
    return reports


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

    spec = select_backend(pm, args.allocator)
    backend = spec.factory()
    try:
        devices = list(pm.hook.vramcore_probe_devices(backend=backend) or ())
    finally:
        backend.close()
    policy = VramPolicy(allow_host_access=args.allow_host_access)
    rows = []
    lines = [f"Backend {spec.name}: {len(devices)} device(s)"]
    for info in devices:
        findings = policy.check_device(info)
        rows.append(
            {
                **info.to_dict(),
                "policy_ok": not findings,
                "violations": [{"rule": f.rule, "detail": f.detail} for f in findings],
            }
        )
        verdict = "OK" if not findings else "REFUSED: " + "; ".join(f.detail for f in findings)
        lines.append(
            f"  GPU {info.index}: {info.name}, {_human_bytes(info.total_bytes)} "
            f"({_human_bytes(info.free_bytes)} free) - {verdict}"
        )
    refused = any(not r["policy_ok"] for r in rows)
    console.result(
        {"backend": spec.name, "devices": rows, "policy_ok": not refused}, "\n".join(lines)
    )
    return EXIT_FAILURE if refused else EXIT_OK


# -- seal -----------------------------------------------------------------------------------


def cmd_seal(args: argparse.Namespace, console: Console, pm: VramcorePluginManager) -> int:
    """Seal a file into VRAM, verify it from VRAM, print the attestation and throughput."""
    path = Path(args.path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    size = path.stat().st_size
    with _manager(args, console, pm) as manager:
        rss_before = _peak_rss()
        console.progress(
            f"sealing {path} ({_human_bytes(size)}) on {manager.backend_name} GPU {manager.device}"
        )
        t0 = time.perf_counter()
        shard = manager.seal_file(
            path,
            shard_id=args.shard_id,
            expected_sha256=args.expect_sha256,
            progress=_progress_printer(console, size),
        )
        t1 = time.perf_counter()
        manager.verify_sealed(shard)
        t2 = time.perf_counter()
        manager.deallocate(shard)
    reports = _sink_reports(manager)
    peak = _peak_rss()
    # The mock keeps its "VRAM" in host memory; that part is not host overhead of sealing.
    stand_in = size if manager.backend_name == "mock" else 0
    overhead = max(0, peak - rss_before - stand_in)
    data = {
        "attestation": shard.to_dict(include_signature=False),
        "seal_seconds": round(t1 - t0, 6),
        "verify_seconds": round(t2 - t1, 6),
        "seal_throughput_gib_s": round(size / max(t1 - t0, 1e-9) / _GIB, 3),
        "verify_throughput_gib_s": round(size / max(t2 - t1, 1e-9) / _GIB, 3),
        "peak_rss_bytes": peak,
        "rss_before_seal_bytes": rss_before,
        "mock_vram_in_host_bytes": stand_in,
        "host_overhead_bytes": overhead,
        "audit": reports,
    }
    lines = [
        f"sealed   {shard.shard_id}: {_human_bytes(size)} on GPU {shard.gpu_device}",
        f"digest   {shard.digest_alg} {shard.digest}",
        f"file     sha256 {shard.file_sha256}",
        f"tensors  {len(shard.tensors)}",
        f"seal     {(t1 - t0) * 1000:.1f} ms ({_rate(size, t1 - t0)})",
        f"verify   {(t2 - t1) * 1000:.1f} ms ({_rate(size, t2 - t1)})",
        f"memory   peak RSS {_human_bytes(peak)} = {_human_bytes(rss_before)} before sealing"
        + (f" + {_human_bytes(stand_in)} mock stand-in VRAM" if stand_in else "")
        + f" + {_human_bytes(overhead)} for sealing ({overhead * 100 / size:.1f}% of the file)",
    ]
    lines.extend(_report_lines(reports))
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
        rate = _rate(done, time.perf_counter() - start)
        end = "\n" if done >= total else ""
        line = f"\r  loaded {done * 100 // total:3d}% ({rate})"
        print(line, end=end, file=sys.stderr, flush=True)

    return show


def _report_lines(reports: list[dict[str, Any]]) -> list[str]:
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


# -- demo -----------------------------------------------------------------------------------


def _demo_model(directory: Path) -> Path:
    from vramcore.safetensors import write_safetensors

    rng = secrets.token_bytes
    tensors = {
        "embed.weight": ("F16", [1024, 1024], rng(2 << 20)),
        "layers.0.attn.qkv.weight": ("F16", [768, 1024], rng(1536 << 10)),
        "layers.0.mlp.up.weight": ("F16", [1024, 768], rng(1536 << 10)),
        "layers.1.attn.qkv.weight": ("F16", [768, 1024], rng(1536 << 10)),
        "layers.1.mlp.up.weight": ("F16", [1024, 768], rng(1536 << 10)),
        "lm_head.weight": ("F16", [512, 1024], rng(1 << 20)),
    }
    path = directory / "demo-model.safetensors"
    with path.open("wb") as fh:
        write_safetensors(fh, tensors)
    return path


def cmd_demo(args: argparse.Namespace, console: Console, pm: VramcorePluginManager) -> int:
    """Seal a synthetic model, verify it, tamper with one bit, show the detection."""
    if not os.environ.get("VRAMCORE_AUDIT_LOG") and not args.no_audit:
        # Kept after the demo so the log can be inspected: `vramcore audit verify DIR`.
        os.environ["VRAMCORE_AUDIT_LOG"] = tempfile.mkdtemp(prefix="vramcore-demo-audit-")
    with tempfile.TemporaryDirectory(prefix="vramcore-demo-") as tmp:
        model = _demo_model(Path(tmp))
        size = model.stat().st_size
        published = hashlib.sha256(model.read_bytes()).hexdigest()
        console.progress(f"wrote a synthetic model: {model.name}, {_human_bytes(size)}")
        steps: dict[str, Any] = {"model_bytes": size}
        lines = []
        try:
            manager = _manager(args, console, pm)
        except AuditError:
            console.progress(
                "no audit sink available (install vramcore-audit-chain); running "
                "the demo with audit disabled"
            )
            args.no_audit = True
            manager = _manager(args, console, pm)
        with manager:
            lines.append(
                f"backend  {manager.backend_name}, GPU {manager.device} "
                f"({manager.device_info.name}), token fingerprint {manager.token_fingerprint}"
            )
            if not args.no_audit:
                lines.append(f"audit    log directory {os.environ['VRAMCORE_AUDIT_LOG']}")
            t0 = time.perf_counter()
            shard = manager.seal_file(model, expected_sha256=published)
            t1 = time.perf_counter()
            manager.verify_sealed(shard)
            t2 = time.perf_counter()
            steps |= {
                "seal_seconds": t1 - t0,
                "verify_seconds": t2 - t1,
                "digest": shard.digest,
                "tensors": len(shard.tensors),
            }
            lines += [
                f"sealed   {shard.shard_id}: {_human_bytes(size)}, {len(shard.tensors)} tensors, "
                f"{shard.digest_alg} {shard.digest[:16]}...",
                f"         in {(t1 - t0) * 1000:.1f} ms ({_rate(size, t1 - t0)}); file SHA-256 "
                "matched the published hash",
                f"verified from VRAM in {(t2 - t1) * 1000:.1f} ms ({_rate(size, t2 - t1)})",
            ]
            detected = _demo_tamper(manager, shard, steps, lines)
            manager.deallocate(shard)
        reports = _sink_reports(manager)
        lines.extend(_report_lines(reports))
        audit_ok = all(r.get("verified", True) for r in reports)
        steps["audit"] = reports
        ok = detected is not False and audit_ok
        lines.append("demo     OK" if ok else "demo     FAILED")
        console.result({**steps, "ok": ok}, "\n".join(lines))
        return EXIT_OK if ok else EXIT_FAILURE


def _demo_tamper(manager: Any, shard: Any, steps: dict[str, Any], lines: list[str]) -> bool | None:
    """Flip one bit through the mock's fault injection; ``None`` when not on the mock."""
    backend = manager._backend  # the demo is allowed to reach the mock's fault injection
    if not hasattr(backend, "flip_bit"):
        lines.append("tamper   skipped: the backend has no fault injection (not the mock)")
        return None
    target = next(t for t in shard.tensors if t.name == "layers.1.mlp.up.weight")
    offset = target.start + (target.end - target.start) // 3
    with manager.verified(shard) as buf:
        backend.flip_bit(buf, offset, 5)
    try:
        manager.verify_sealed(shard)
    except SealVerificationFailed as exc:
        start, end = exc.byte_range or (0, 0)
        steps["tamper"] = {
            "offset": offset,
            "detected": True,
            "byte_range": [start, end],
            "tensors": list(exc.tensors),
        }
        lines.append(
            f"tamper   flipped bit 5 of byte {offset} in VRAM -> verification FAILED as it must:"
        )
        lines.append(f"         bytes {start}-{end - 1} changed, tensor {', '.join(exc.tensors)}")
        return target.name in exc.tensors
    steps["tamper"] = {"offset": offset, "detected": False}
    lines.append("tamper   NOT detected: this is a bug")
    return False


# -- bench ----------------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace, console: Console, pm: VramcorePluginManager) -> int:
    """Digest and seal/verify throughput, against a one-thread SHA-256 baseline (same run)."""
    from vramcore.digest import hash_leaves, merkle_root

    size = args.size
    data = secrets.token_bytes(size)
    results: dict[str, Any] = {"bytes": size, "repeat": args.repeat}

    def best(fn: Any) -> float:
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    console.progress(f"benchmarking on {_human_bytes(size)}, best of {args.repeat}")
    baseline = best(lambda: hashlib.sha256(data).digest())
    merkle = best(lambda: merkle_root(hash_leaves(data)))
    with _manager(args, console, pm) as manager:
        shards: list[Any] = []

        def seal() -> None:
            if shards:
                manager.deallocate(shards.pop())
            shards.append(manager.seal_model(data))

        seal_t = best(seal)
        verify_t = best(lambda: manager.verify_sealed(shards[0]))
        backend = manager.backend_name
    rows = [
        ("sha256, 1 thread (baseline)", baseline),
        (f"merkle leaves, {os.cpu_count()} threads", merkle),
        (f"seal_model ({backend})", seal_t),
        (f"verify_sealed ({backend})", verify_t),
    ]
    lines = [f"{'what':<36} {'GiB/s':>8} {'vs baseline':>12}"]
    for name, t in rows:
        results[name] = {"seconds": t, "gib_s": size / t / _GIB, "ratio": baseline / t}
        lines.append(f"{name:<36} {size / t / _GIB:>8.2f} {baseline / t:>11.2f}x")
    console.result(results, "\n".join(lines))
    return EXIT_OK


# -- main -----------------------------------------------------------------------------------


def build_parser(pm: VramcorePluginManager) -> argparse.ArgumentParser:
    """The full parser: core commands plus the plugins' ones."""
    parser = argparse.ArgumentParser(
        prog="vramcore",
        description="Keep model weights resident in GPU memory, and prove it.",
    )
    parser.add_argument("--version", action="version", version=f"vramcore {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    commands = Commands(sub)

    def core(handler: Any) -> Any:
        return lambda args, console: handler(args, console, pm)

    p = commands.add(
        "demo", help="seal, verify and tamper with a synthetic model", handler=core(cmd_demo)
    )
    _add_manager_options(p)
    commands.add(
        "plugins", help="list plugins, hooks and allocator backends", handler=core(cmd_plugins)
    )
    p = commands.add(
        "devices", help="probe devices and check the VRAM-only policy", handler=core(cmd_devices)
    )
    p.add_argument("--allocator", help="backend name (default: VRAMCORE_ALLOCATOR or best)")
    p.add_argument(
        "--allow-host-access", action="store_true", help="accept ATS/HMM devices (not recommended)"
    )
    p = commands.add(
        "seal",
        help="seal a file into VRAM, verify it, print the attestation",
        handler=core(cmd_seal),
    )
    p.add_argument("path", help="file to seal (a .safetensors file gets a tensor map)")
    p.add_argument("--expect-sha256", help="the file's published SHA-256, checked while loading")
    p.add_argument("--shard-id", help="shard id (default: the file name)")
    _add_manager_options(p)
    p = commands.add("bench", help="digest and seal/verify throughput", handler=core(cmd_bench))
    p.add_argument("--size", type=_parse_size, default=256 << 20, help="bytes (default 256MiB)")
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement, best kept")
    _add_manager_options(p)
    pm.hook.vramcore_add_commands(commands=commands)
    return parser


_QUIET_LOGGERS = ("vramcore.narration", "vramcore.events")


def _configure_logging(verbose: bool) -> None:
    """Warnings of vramcore and its plugins to stderr; narration and events only with -v.

    The CLI prints what matters itself; per-operation narration would repeat it.
    """
    logger = logging.getLogger("vramcore")
    for old in [h for h in logger.handlers if getattr(h, "_vramcore_cli", False)]:
        logger.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vramcore: %(name)s: %(message)s"))
    handler.setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        handler.addFilter(lambda record: not record.name.startswith(_QUIET_LOGGERS))
    handler._vramcore_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    json_mode = "--json" in argv
    console = Console(json_mode=json_mode)
    _configure_logging("-v" in argv or "--verbose" in argv)
    try:
        pm = get_plugin_manager()
        parser = build_parser(pm)
        args = parser.parse_args(argv)
        handler = getattr(args, "handler", None)
        if handler is None:
            (getattr(args, "group_parser", None) or parser).print_help(sys.stderr)
            return EXIT_USAGE
        return int(handler(args, console))
    except (UsageError, InvalidInput, ConfigError) as exc:
        console.error(str(exc))
        return EXIT_USAGE
    except AuditError as exc:
        console.error(str(exc))
        return EXIT_USAGE if exc.configuration else EXIT_FAILURE
    except (IntegrityViolation, SealVerificationFailed, PolicyViolation, VramError) as exc:
        console.error(f"{type(exc).__name__}: {exc}")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        console.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
