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
import math
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence

import attrs

from vramcore._residency import Resident
from vramcore.digest import DIGEST_ALG, corrupted_ranges, merkle_root
from vramcore.errors import InvalidInput
from vramcore.seal import SecretKey
from vramcore.shard import SealedShard

__all__ = [
    "Problem",
    "Reason",
    "check_leaves",
    "check_sample",
    "digest_problem",
    "leaves_problem",
    "quarantine_problem",
    "sample_ranges",
    "seal_problem",
]

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


def check_leaves(
    shard: SealedShard,
    resident: Resident,
    ranges: Iterable[tuple[int, int]],
    rehash: Callable[[int, int], bytes],
) -> Problem | None:
    """Check 5 on leaf ``ranges``: ``rehash(first, stop)`` reads them from VRAM now.

    The sealed leaves are compared only once they are shown to give the signed root (leaves
    that came from a device with its root are not trusted before that; the check runs once
    per resident shard).
    """
    sealed = resident.digest
    if not resident.leaves_checked:
        if merkle_root(sealed.leaves).hex() != shard.digest:
            return Problem(Reason.DIGEST, "the sealed leaf hashes do not give the sealed root")
        resident.leaves_checked = True
    runs = [(first, sealed.leaf_range(first, stop), rehash(first, stop)) for first, stop in ranges]
    return leaves_problem(shard, runs)


def check_sample(value: object) -> float | int | None:
    """A valid ``sample`` argument: ``None``, a fraction in ``(0, 1]`` or a leaf count >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(
            f"sample must be None, a fraction in (0, 1] or a leaf count, got {value!r:.40}"
        )
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise InvalidInput(f"sample as a fraction must be in (0, 1], got {value!r}")
    if isinstance(value, int) and value < 1:
        raise InvalidInput(f"sample as a leaf count must be at least 1, got {value}")
    return value


def sample_ranges(leaves: int, wanted: float | int) -> tuple[list[tuple[int, int]], int]:
    """Leaves to sample, as runs ``(first, stop)``, and how many: chosen by a CSPRNG.

    ``wanted`` is a fraction of ``leaves`` (rounded up, at least one) or a count (at most
    ``leaves``). A fresh :class:`secrets.SystemRandom` draw every call: an attacker who knows
    the seal cannot predict which leaves the next check reads.
    """
    k = min(leaves, max(1, math.ceil(wanted * leaves)) if isinstance(wanted, float) else wanted)
    chosen = sorted(secrets.SystemRandom().sample(range(leaves), k))
    return list(_runs(chosen)), k


def _runs(indices: Sequence[int]) -> Iterator[tuple[int, int]]:
    """Consecutive runs ``(first, stop)`` of sorted distinct ``indices``."""
    start = prev = -2
    for i in indices:
        if i != prev + 1:
            if start >= 0:
                yield start, prev + 1
            start = i
        prev = i
    if start >= 0:
        yield start, prev + 1


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
