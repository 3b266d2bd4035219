"""Deciding whether a seal holds: the checks behind ``VramManager.verify_sealed``.

Checks run from cheapest to dearest, and the first failure wins:

1. ``signature``: the HMAC over the seal's canonical fields, under this worker's key;
2. ``device``: the seal names the device the manager runs on;
3. ``stale``: the seal is exactly the one recorded for the resident shard (an old or replayed
   seal of the same shard id, validly signed, is refused);
4. ``quarantined``: a background scrub found the shard corrupted; it stays refused until it is
   resealed;
5. ``digest``: the Merkle root recomputed from VRAM equals the sealed one (full check), or the
   sampled leaves recomputed from VRAM equal the sealed leaves (sampled check); on mismatch the
   sealed leaf hashes name the corrupted byte ranges and the tensors they touch.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import attrs

from vramcore.digest import DIGEST_ALG, corrupted_ranges
from vramcore.seal import SecretKey
from vramcore.shard import SealedShard

__all__ = ["Problem", "Reason", "digest_problem", "leaves_problem", "seal_problem"]

#: Tensor names quoted in a failure message at most (all of them are in ``Problem.tensors``).
_MAX_NAMED_TENSORS = 8


class Reason(enum.StrEnum):
    """Why a seal failed verification (``SealVerificationFailed.reason``)."""

    SIGNATURE = "signature"  #: the HMAC does not verify under this worker's key
    DEVICE = "device"  #: sealed for another device
    STALE = "stale"  #: not the seal of the resident shard (replayed or old)
    QUARANTINED = "quarantined"  #: a scrub found the shard corrupted; reseal it
    DIGEST = "digest"  #: the bytes in VRAM changed


@attrs.frozen
class Problem:
    """Why a seal failed: a machine-readable ``reason``, a sentence, and where, when known."""

    reason: Reason
    detail: str
    ranges: tuple[tuple[int, int], ...] = ()
    tensors: tuple[str, ...] = ()


def seal_problem(
    shard: SealedShard, key: SecretKey, device: int, resident: SealedShard | None
) -> Problem | None:
    """Checks 1-3 (see the module docstring); ``resident`` is ``None`` when none is held.

    The seal object the manager itself made and still holds for the resident shard was signed
    by this manager; when the caller passes that very object back, its signature is known
    good and the HMAC is not recomputed (``SealedShard`` is frozen).
    """
    if resident is not None and shard is resident:
        return None
    if not key.mac_matches(shard.signed_message(), shard.signature):
        return Problem(
            Reason.SIGNATURE, "the seal's signature is not valid under this worker's key"
        )
    if shard.gpu_device != device:
        return Problem(Reason.DEVICE, f"sealed for GPU {shard.gpu_device}, this is GPU {device}")
    if resident is not None and (shard.digest_alg != DIGEST_ALG or shard != resident):
        return Problem(
            Reason.STALE, "the seal is not the one of the resident shard (replayed or old)"
        )
    return None


def quarantine_problem(reason: str) -> Problem:
    """Check 4: the shard was found corrupted by a scrub."""
    return Problem(Reason.QUARANTINED, f"the shard is quarantined ({reason}); reseal it")


def digest_problem(
    shard: SealedShard, sealed_leaves: bytes, root: bytes, leaves: bytes
) -> Problem | None:
    """Check 5, full: compare ``root`` (of ``leaves``, read from VRAM now) with the seal."""
    if root.hex() == shard.digest:
        return None
    return _changed(
        shard, corrupted_ranges(sealed_leaves, leaves, shard.leaf_size, shard.vram_bytes)
    )


def leaves_problem(shard: SealedShard, runs: Sequence[tuple[int, bytes, bytes]]) -> Problem | None:
    """Check 5, sampled: ``runs`` of ``(first_leaf, sealed packed, current packed)`` leaves."""
    ranges: list[tuple[int, int]] = []
    for first, sealed, now in runs:
        if sealed != now:
            ranges += corrupted_ranges(sealed, now, shard.leaf_size, shard.vram_bytes, first)
    return _changed(shard, ranges) if ranges else None


def _changed(shard: SealedShard, ranges: list[tuple[int, int]]) -> Problem:
    tensors = shard.tensors_in(ranges)
    start, end = ranges[0] if ranges else (0, shard.vram_bytes)
    where = f"bytes {start}-{end - 1}"
    if tensors:
        where += f" (tensor {', '.join(tensors[:_MAX_NAMED_TENSORS])})"
    if len(ranges) > 1:
        where += f" and {len(ranges) - 1} more range(s)"
    return Problem(
        Reason.DIGEST,
        f"the bytes in VRAM changed since sealing: {where}",
        tuple(ranges),
        tuple(tensors),
    )
