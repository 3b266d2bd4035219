"""``vramcore demo`` and ``vramcore bench``: the showcase and the measurement.

``demo`` writes a small synthetic safetensors model, seals it on the best viable backend,
verifies it from VRAM, flips one bit through the mock's fault injection and shows that
verification names the corrupted tensor, then prints each audit sink's report (the audit chain
verifies the log it wrote). ``bench`` measures digest, seal and verify throughput against a
one-thread SHA-256 baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

from vramcore._cli_support import (
    GIB,
    human_bytes,
    make_manager,
    rate,
    report_lines,
    sink_reports,
)
from vramcore.commands import EXIT_FAILURE, EXIT_OK, Console
from vramcore.errors import AuditError, SealVerificationFailed
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


def cmd_demo(args: argparse.Namespace, console: Console, pm: VramcorePluginManager) -> int:
    """Seal a synthetic model, verify it, tamper with one bit, show the detection."""
    if not os.environ.get("VRAMCORE_AUDIT_LOG") and not args.no_audit:
        # Kept after the demo so the log can be inspected: `vramcore audit verify DIR`.
        os.environ["VRAMCORE_AUDIT_LOG"] = tempfile.mkdtemp(prefix="vramcore-demo-audit-")
    with tempfile.TemporaryDirectory(prefix="vramcore-demo-") as tmp:
        model = _demo_model(Path(tmp))
        size = model.stat().st_size
        published = hashlib.sha256(model.read_bytes()).hexdigest()
        console.progress(f"wrote a synthetic model: {model.name}, {human_bytes(size)}")
        steps: dict[str, Any] = {"model_bytes": size}
        lines = []
        try:
            manager = make_manager(args, console, pm)
        except AuditError:
            console.progress(
                "no audit sink available (install vramcore-audit-chain); running "
                "the demo with audit disabled"
            )
            args.no_audit = True
            manager = make_manager(args, console, pm)
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
            detected = _demo_tamper(manager, shard, steps, lines)
            manager.deallocate(shard)
        reports = sink_reports(manager)
        lines.extend(report_lines(reports))
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

    console.progress(f"benchmarking on {human_bytes(size)}, best of {args.repeat}")
    baseline = best(lambda: hashlib.sha256(data).digest())
    merkle = best(lambda: merkle_root(hash_leaves(data)))
    with make_manager(args, console, pm) as manager:
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
        results[name] = {"seconds": t, "gib_s": size / t / GIB, "ratio": baseline / t}
        lines.append(f"{name:<36} {size / t / GIB:>8.2f} {baseline / t:>11.2f}x")
    console.result(results, "\n".join(lines))
    return EXIT_OK
