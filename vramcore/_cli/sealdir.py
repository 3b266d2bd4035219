"""``vramcore seal DIR``: seal a model directory, verify every shard from VRAM, report the set.

One summary line for the directory, one line per shard, then the audit sinks' reports; under
``--json`` one object holding the directory's attestation (signatures left out), each shard's
verification and the timings. With ``--signature SIG --public-key PEM`` the directory is sealed
against the publisher's OpenSSF Model Signing bundle.

A shard lives in the VRAM of the process that sealed it, so this command verifies the whole
set from VRAM right after sealing (as ``seal PATH`` does for one file). ``--attestation FILE``
saves the signed attestation (the model's own signature and every shard's);
``vramcore verify FILE`` checks those signatures later under the worker's key
(:mod:`vramcore._cli.verify`), and the ``vram.model_sealed`` audit event is what an auditor
checks with ``vramcore audit verify``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from vramcore._cli.commands import EXIT_OK, Console, UsageError
from vramcore._cli.support import human_bytes, make_manager, rate, report_lines, sink_reports
from vramcore._cli.verify import write_attestation
from vramcore._sealdir import check_parallel
from vramcore.plugins import VramcorePluginManager
from vramcore.validation import check_path, check_shard_id, escape_text

__all__ = ["add_signature_options", "cmd_seal_dir"]


def add_signature_options(parser: argparse.ArgumentParser) -> None:
    """``--signature`` and ``--public-key`` (for a model directory)."""
    parser.add_argument(
        "--signature",
        help="the publisher's OpenSSF Model Signing bundle (model_signing sign key); DIR only",
    )
    parser.add_argument(
        "--public-key", help="the publisher's PEM public key the bundle must verify with"
    )
    parser.add_argument(
        "--parallel",
        metavar="N",
        help=(
            "shards of a directory sealed at once (default: one per four CPUs, at most 4; "
            "at least 2 with --signature)"
        ),
    )


def cmd_seal_dir(
    args: argparse.Namespace, console: Console, pm: VramcorePluginManager, path: Path
) -> int:
    """Seal the model directory ``path``, verify each shard from VRAM, print the set."""
    if args.expect_sha256 is not None:
        raise UsageError("--expect-sha256 is for one file; a directory is checked with --signature")
    if (args.signature is None) != (args.public_key is None):
        raise UsageError("--signature and --public-key go together")
    signature = public_key = None
    if args.signature is not None:
        signature = check_path(args.signature, field="--signature")
        public_key = check_path(args.public_key, field="--public-key")
    if args.shard_id is not None:
        check_shard_id(args.shard_id, field="--shard-id")
    parallel = None
    if args.parallel is not None:
        text = str(args.parallel).strip()
        # "²" is a digit to isdigit but not to int; 5,000 digits are too many for int
        number = text.isascii() and text.isdigit() and len(text) <= 4
        parallel = check_parallel(int(text) if number else text, field="--parallel")
    with make_manager(args, console, pm) as manager:
        console.progress(f"sealing model directory {path} on {manager.backend_name}")
        t0 = time.perf_counter()
        sealed = manager.seal_dir(
            path,
            signature=signature,
            public_key=public_key,
            shard_prefix=args.shard_id,
            parallel=parallel,
        )
        t1 = time.perf_counter()
        verified = []
        for name, shard in sealed.files.items():
            s0 = time.perf_counter()
            manager.verify_sealed(shard)
            verified.append((name, shard, time.perf_counter() - s0))
        t2 = time.perf_counter()
        for shard in sealed.shards:
            manager.deallocate(shard)
    if args.attestation is not None:
        write_attestation(args.attestation, sealed.to_json())
    reports = sink_reports(manager)
    size = sealed.vram_bytes
    data: dict[str, Any] = {
        "model_attestation": sealed.to_dict(include_signature=False),
        "verified": [
            {"file": name, "shard_id": shard.shard_id, "seconds": round(seconds, 6)}
            for name, shard, seconds in verified
        ],
        "seal_seconds": round(t1 - t0, 6),
        "verify_seconds": round(t2 - t1, 6),
        "audit": reports,
    }
    lines = [sealed.summary()]
    lines += [
        f"  {escape_text(name)}: {human_bytes(shard.vram_bytes)}, {len(shard.tensors)} tensors, "
        f"{shard.digest_alg} {shard.digest[:16]}..., verified from VRAM"
        for name, shard, _seconds in verified
    ]
    lines.append(f"seal     {(t1 - t0) * 1000:.1f} ms ({rate(size, t1 - t0)})")
    lines.append(f"verify   {(t2 - t1) * 1000:.1f} ms ({rate(size, t2 - t1)})")
    lines.extend(report_lines(reports))
    console.result(data, "\n".join(lines))
    return EXIT_OK
