"""Deciding whether a seal holds: the checks behind ``VramManager.verify_sealed``.

Checks run from cheapest to dearest, and the first failure wins:

1. ``signature``: the HMAC over the seal's canonical fields, under this worker's key;
2. ``device``: the seal names the device the manager runs on;
3. ``stale``: the seal is exactly the one recorded for the resident shard (an old or replayed
   seal of the same shard id, validly signed, is refused);
4. ``digest``: the Merkle root recomputed from VRAM equals the sealed one; on mismatch the
   leaf hashes kept from sealing name the corrupted byte ranges and the tensors they touch.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from vramcore.digest import DIGEST_ALG, corrupted_ranges, merkle_root
from vramcore.seal import SecretKey
from vramcore.shard import SealedShard

__all__ = ["Problem", "digest_problem", "seal_problem"]

#: Tensor names quoted in a failure message at most (all of them are in ``Problem.tensors``).
_MAX_NAMED_TENSORS = 8


@attrs.frozen
class Problem:
    """Why a seal failed: a machine-readable ``reason``, a sentence, and where, when known."""

    reason: str
    detail: str
    ranges: tuple[tuple[int, int], ...] = ()
    tensors: tuple[str, ...] = ()


def seal_problem(
    shard: SealedShard, key: SecretKey, device: int, resident: SealedShard | None
) -> Problem | None:
    """Checks 1-3 (see the module docstring); ``resident`` is ``None`` when none is held."""
    if not key.mac_matches(shard.signed_message(), shard.signature):
        return Problem("signature", "the seal's signature is not valid under this worker's key")
    if shard.gpu_device != device:
        return Problem("device", f"sealed for GPU {shard.gpu_device}, this is GPU {device}")
    if resident is not None and (shard.digest_alg != DIGEST_ALG or shard != resident):
        return Problem("stale", "the seal is not the one of the resident shard (replayed or old)")
    return None


def digest_problem(
    shard: SealedShard, sealed_leaves: Sequence[bytes], leaves: Sequence[bytes]
) -> Problem | None:
    """Check 4: compare the root of ``leaves`` (read from VRAM now) with the sealed digest."""
    if merkle_root(leaves).hex() == shard.digest:
        return None
    ranges = corrupted_ranges(sealed_leaves, leaves, shard.leaf_size, shard.vram_bytes)
    tensors = shard.tensors_in(ranges)
    start, end = ranges[0] if ranges else (0, shard.vram_bytes)
    where = f"bytes {start}-{end - 1}"
    if tensors:
        where += f" (tensor {', '.join(tensors[:_MAX_NAMED_TENSORS])})"
    if len(ranges) > 1:
        where += f" and {len(ranges) - 1} more range(s)"
    return Problem(
        "digest", f"the bytes in VRAM changed since sealing: {where}", tuple(ranges), tuple(tensors)
    )
