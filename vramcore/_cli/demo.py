"""``vramcore demo`` and ``vramcore bench``: the showcase and the measurement.

``demo`` writes a small synthetic safetensors model, seals it on the best viable backend,
verifies it from VRAM, flips one bit through the mock's fault injection and shows that
verification names the corrupted tensor, then prints each audit sink's report (the audit chain
verifies the log it wrote). ``bench`` measures digest, seal and verify throughput against a
one-thread SHA-256 baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import secrets
import shlex
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vramcore._cli.commands import EXIT_FAILURE, EXIT_OK, Console, UsageError
from vramcore._cli.support import (
    GIB,
    MAX_BENCH_BYTES,
    cli_command,
    human_bytes,
    make_backend,
    make_manager,
    rate,
    report_lines,
    sink_reports,
)
from vramcore.backend import AllocatorBackend
from vramcore.errors import SealVerificationFailed
from vramcore.plugins import VramcorePluginManager

__all__ = ["cmd_bench", "cmd_demo"]


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


@contextlib.contextmanager
def _demo_audit_log(
    args: argparse.Namespace, console: Console, pm: VramcorePluginManager
) -> Iterator[str | None]:
    """A temporary ``VRAMCORE_AUDIT_LOG`` when none is set (removed after, unless kept)."""
    if args.no_audit or os.environ.get("VRAMCORE_AUDIT_LOG"):
        yield None
        return
    if "audit_chain" not in {p.name for p in pm.loaded}:
        console.progress(
            "no audit chain plugin: running the demo with audit disabled (from a clone of the "
            "vramcore repository: pip install ./plugins/audit_chain)"
        )
        args.no_audit = True
        yield None
        return
    directory = tempfile.mkdtemp(prefix="vramcore-demo-audit-")
    os.environ["VRAMCORE_AUDIT_LOG"] = directory
    try:
        yield directory
    finally:
        del os.environ["VRAMCORE_AUDIT_LOG"]
        if not args.keep_audit_log:
            shutil.rmtree(directory, ignore_errors=True)


def cmd_demo(args: argparse.Namespace, console: Console, pm: VramcorePluginManager) -> int:
    """Seal a synthetic model, verify it, tamper with one bit, show the detection."""
    with (
        _demo_audit_log(args, console, pm) as temp_log,
        tempfile.TemporaryDirectory(prefix="vramcore-demo-") as tmp,
    ):
        model = _demo_model(Path(tmp))
        published = hashlib.sha256(model.read_bytes()).hexdigest()
        console.progress(
            f"wrote a synthetic model: {model.name}, {human_bytes(model.stat().st_size)}"
        )
        # The demo builds the backend itself: it owns the mock's fault injection it uses below.
        backend = make_backend(args, pm)
        with contextlib.closing(backend):
            return _demo_run(args, console, pm, backend, model, published, temp_log)


def _named_backend(args: argparse.Namespace) -> str:
    """`` --allocator NAME`` when the command line named the backend: a hint runs as printed
    (a host-memory backend such as the mock is used only when named)."""
    return f" --allocator {shlex.quote(args.allocator)}" if args.allocator else ""


def _demo_run(
    args: argparse.Namespace,
    console: Console,
    pm: VramcorePluginManager,
    backend: AllocatorBackend,
    model: Path,
    published: str,
    temp_log: str | None,
) -> int:
    """Seal, verify and tamper with the demo model on ``backend``; print what happened."""
    size = model.stat().st_size
    steps: dict[str, Any] = {"model_bytes": size}
    lines = []
    manager = make_manager(args, console, pm, temporary_log=temp_log is not None, backend=backend)
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
            f"sealed   {shard.shard_id}: {human_bytes(size)}, {len(shard.tensors)} tensors, "
            f"{shard.digest_alg} {shard.digest[:16]}...",
            f"         in {(t1 - t0) * 1000:.1f} ms ({rate(size, t1 - t0)}); file SHA-256 "
            "matched the published hash",
            f"verified from VRAM in {(t2 - t1) * 1000:.1f} ms ({rate(size, t2 - t1)})",
        ]
        detected = _demo_tamper(manager, backend, shard, steps, lines)
        manager.deallocate(shard)
    reports = sink_reports(manager)
    if temp_log is not None and not args.keep_audit_log:
        for report in reports:  # the log is removed below: no hint pointing at it
            report.pop("hint", None)
            report.pop("warning", None)
    lines.extend(report_lines(reports))
    if temp_log is not None and not args.keep_audit_log:
        lines.append(
            "         (temporary log, removed now; "
            f"`{cli_command()} demo{_named_backend(args)} --keep-audit-log` keeps it to "
            "verify it yourself)"
        )
    audit_ok = all(r.get("verified", True) for r in reports)
    steps["audit"] = reports
    ok = detected is not False and audit_ok
    lines.append("demo     OK" if ok else "demo     FAILED")
    console.result({**steps, "ok": ok}, "\n".join(lines))
    return EXIT_OK if ok else EXIT_FAILURE


def _demo_tamper(
    manager: Any, backend: AllocatorBackend, shard: Any, steps: dict[str, Any], lines: list[str]
) -> bool | None:
    """Flip one bit through the mock's fault injection; ``None`` when not on the mock."""
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


def cmd_bench(args: argparse.Namespace, console: Console, pm: VramcorePluginManager) -> int:
    """Seal, verify and sampled-verify throughput by shard size and worker count, beside
    one-thread SHA-256, a memory copy and ``model_signing`` measured in the same run (see
    :mod:`vramcore._cli.benchmark`)."""
    from vramcore._cli import benchmark

    sizes = args.size or (benchmark.QUICK_SIZES if args.quick else benchmark.DEFAULT_SIZES)
    biggest = max(sizes)
    room = min(MAX_BENCH_BYTES, _available_memory() // 3)
    if biggest > room:
        raise UsageError(
            f"--size {biggest} bytes is more than this machine can benchmark (at most "
            f"{human_bytes(room)}: the data is held in host memory, and on the mock its VRAM too)"
        )
    workers = args.workers or [1, os.cpu_count() or 2]

    def manager(count: int, read_threads: int | None = None) -> Any:
        return make_manager(args, console, pm, hash_workers=count, read_threads=read_threads)

    report = benchmark.run(
        manager,
        sizes=sizes,
        workers=workers,
        repeat=1 if args.quick else args.repeat,
        sample=args.sample,
        tensors=_tensors(
            args, benchmark.QUICK_TENSORS if args.quick else benchmark.DEFAULT_TENSORS
        ),
        plugin_manager=pm,
        progress=console.progress,
    )
    if args.plot:
        benchmark.plot(report, args.plot)
        console.progress(f"plot written to {args.plot}")
    console.result(report, benchmark.format_table(report))
    return EXIT_OK


def _tensors(args: argparse.Namespace, default: int) -> int:
    return default if args.tensors is None else int(args.tensors)


def _available_memory() -> int:
    """Bytes of host memory available now (Linux), else a conservative 4 GiB."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 4 * GIB
