"""``vramcore verify FILE``: check a saved attestation's signatures under this worker's key.

``vramcore seal PATH|DIR --attestation FILE`` saves the signed attestation (a shard's, or a
model directory's with every shard's); ``vramcore verify FILE`` reads it back and checks, with
``VRAMCORE_WORKER_TOKEN`` (or the configured seal key provider), the model attestation's own
signature (its list of shards, files, index and publisher) and every shard's seal. Exit 0: the
attestation is one this worker signed, unedited; 1: it is not (edited, or another worker's);
2: the file is not an attestation. The bytes in VRAM are checked only by the process that
holds them (``verify_model`` / ``verify_sealed``): a shard's VRAM dies with its process.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from vramcore._cli.commands import EXIT_OK, Console, UsageError
from vramcore._cli.support import make_manager
from vramcore._sealdir import SealedModel
from vramcore.plugins import VramcorePluginManager
from vramcore.shard import SealedShard
from vramcore.validation import check_path, escape_text

__all__ = [
    "MAX_ATTESTATION_BYTES",
    "add_attestation_option",
    "cmd_verify",
    "read_attestation",
    "write_attestation",
]

#: Larger files are refused before parsing (a model of a million tensors takes about 100 MB).
MAX_ATTESTATION_BYTES = 512 << 20


def add_attestation_option(parser: argparse.ArgumentParser) -> None:
    """``--attestation FILE`` (for ``seal``)."""
    parser.add_argument(
        "--attestation",
        metavar="FILE",
        help="also write the signed attestation to FILE (mode 0600), for `vramcore verify`",
    )


def write_attestation(path: str, text: str) -> None:
    """Write ``text`` to ``path``: created with mode 0600, truncated, never through a symlink.

    :raises UsageError: the file cannot be written (one line).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)  # exactly to_json(): from_json reads it back as it is
    except OSError as exc:
        raise UsageError(f"--attestation {escape_text(path)}: {exc.strerror}") from None


def read_attestation(path: object) -> SealedModel | SealedShard:
    """The attestation in ``path``: a model directory's or one shard's (by its fields).

    :raises InvalidInput: not a readable file, too large, or not an attestation.
    :raises UsageError: too large.
    """
    p = check_path(path, field="FILE")
    if p.stat().st_size > MAX_ATTESTATION_BYTES:
        raise UsageError(f"{escape_text(str(p))} is over {MAX_ATTESTATION_BYTES} bytes")
    raw = p.read_bytes().rstrip(b"\n")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise UsageError(f"{escape_text(str(p))} is not valid JSON (not an attestation)") from None
    if isinstance(data, dict) and "model_attestation_version" in data:
        return SealedModel.from_json(raw)
    return SealedShard.from_json(raw)


def cmd_verify(args: argparse.Namespace, console: Console, pm: VramcorePluginManager) -> int:
    """Check the saved attestation ``args.file`` under this worker's key (no VRAM read)."""
    attestation = read_attestation(args.file)
    with make_manager(args, console, pm) as manager:
        manager.verify_attestation(attestation)
    data: dict[str, Any]
    if isinstance(attestation, SealedModel):
        publisher = attestation.publisher
        data = {
            "model": attestation.model,
            "shards": [s.shard_id for s in attestation.shards],
            "publisher": publisher.to_dict() if publisher else None,
            "signed_by_this_worker": True,
        }
        signed = (
            f"publisher key {publisher.key_fingerprint[:16]}, manifest "
            f"{publisher.manifest_digest[:16]}"
            if publisher
            else "no publisher signature"
        )
        text = (
            f"attestation of model {escape_text(attestation.model)}: signed by this worker, "
            f"unedited; {len(attestation.files)} shard(s), each seal valid; {signed}"
        )
    else:
        data = {"shard_id": attestation.shard_id, "signed_by_this_worker": True}
        text = f"attestation of shard {attestation.shard_id}: signed by this worker, unedited"
    text += "\n(the signatures only: the bytes in VRAM are verified by the process holding them)"
    console.result(data, text)
    return EXIT_OK
