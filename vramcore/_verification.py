"""One verification of a seal, as an object: full, sampled, or one scrub slice.

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

When the bytes cannot be read or hashed (the backend or a device-digest plugin raised), the
verification fails closed with reason ``digest_failed``: audited, never a bare error, never a
pass. The reasons are :class:`vramcore.events.VerificationReason`.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Sequence
from typing import NoReturn

import attrs

from vramcore._core import Core
from vramcore._digests import Digest, differing_ranges
from vramcore._residency import Resident
from vramcore.digest import DIGEST_ALG, corrupted_ranges, merkle_root
from vramcore.errors import (
    InvalidInput,
    ManagerClosed,
    NotSealed,
    SealVerificationFailed,
    VramError,
)
from vramcore.events import VerificationReason as Reason
from vramcore.narration import Operation
from vramcore.seal import SecretKey
from vramcore.shard import SealedShard

__all__ = [
    "Problem",
    "ScrubTarget",
    "Verification",
    "check_sample",
    "fail",
    "refuse_absent",
    "sample_indices",
    "seal_problem",
]

log = logging.getLogger("vramcore")

#: Tensor names quoted in a failure message at most (all of them are in ``Problem.tensors``).
_MAX_NAMED_TENSORS = 8


@attrs.frozen
class Problem:
    """Why a seal failed: a machine-readable ``reason``, a sentence, and where, when known."""

    reason: Reason
    detail: str
    ranges: tuple[tuple[int, int], ...] = ()
    tensors: tuple[str, ...] = ()


class Verification:
    """Verify ``shard`` against the ``resident`` one on ``core``'s device.

    :param core: the manager's working parts.
    :param shard: the seal the caller presents.
    :param resident: the resident shard of that id.
    """

    def __init__(self, core: Core, shard: SealedShard, resident: Resident) -> None:
        self._core = core
        self.shard = shard
        self.resident = resident
        self.wanted: float | int | None = None
        self.mode = "full"
        self.leaves_checked = 0

    def run(self, wanted: float | int | None) -> None:
        """Checks 1-5, as the narrated ``verify`` operation; ``wanted`` is the sample (or
        ``None``: every leaf).

        :raises SealVerificationFailed: a check failed (audited first).
        """
        self.wanted = wanted
        self.mode = "full" if wanted is None else "sampled"
        shard, core = self.shard, self._core
        core.perform(
            "verify",
            self._verify,
            **core.facts(
                shard.shard_id,
                shard.vram_bytes,
                digest_alg=shard.digest_alg,
                leaf_size=shard.leaf_size,
            ),
        )

    def _verify(self, op: Operation) -> None:
        shard, resident, wanted = self.shard, self.resident, self.wanted
        problem = seal_problem(shard, self._core.key(), self._core.device, resident.shard)
        if problem is None and resident.quarantined:
            problem = Problem(
                Reason.QUARANTINED, f"the shard is quarantined ({resident.quarantined}); reseal it"
            )
        if problem is None:
            problem = self._full() if wanted is None else self._sampled(wanted)
        op.attributes["mode"] = self.mode
        op.attributes["leaves_checked"] = self.leaves_checked
        if problem is not None:
            op.attributes["outcome"] = "mismatch"
            op.attributes["reason"] = str(problem.reason)
            fail(self._core, shard, problem)
        self._core.emitter.verified(shard, mode=self.mode, leaves_checked=self.leaves_checked)

    def _full(self) -> Problem | None:
        digest = self._rehash("verify", None)
        if isinstance(digest, Problem):
            return digest
        assert digest.root is not None
        self.leaves_checked = len(digest.leaves) // 32
        if digest.root.hex() == self.shard.digest:
            return None
        sealed = self.resident.digest.leaves
        return _changed(
            self.shard,
            corrupted_ranges(sealed, digest.leaves, self.shard.leaf_size, self.shard.vram_bytes),
        )

    def _sampled(self, wanted: float | int) -> Problem | None:
        indices = sample_indices(self.resident.digest.leaf_count, wanted)
        return self._compare(indices, "verify")

    def scrub(self, first: int, stop: int) -> bool:
        """Re-verify leaves ``first`` to ``stop - 1`` (one step of a scrubber).

        A mismatch quarantines the shard and is audited as a failed verification; a backend
        error is audited the same way (reason ``digest_failed``) without quarantine.

        :return: ``True`` when the leaves match, ``False`` when the shard is corrupted (found
            now or before).
        :raises SealVerificationFailed: the leaves could not be read or hashed (audited).
        """
        resident = self.resident
        if resident.quarantined:
            return False
        stop = min(stop, resident.digest.leaf_count)
        if first >= stop:
            return True
        problem = self._compare(range(first, stop), "scrub")
        if problem is None:
            return True
        if problem.reason is Reason.DIGEST_FAILED:
            fail(self._core, self.shard, attrs.evolve(problem, detail=f"scrub: {problem.detail}"))
        resident.quarantined = f"a scrub found {problem.detail}"
        self._core.emitter.verification_failed(
            self.shard.shard_id,
            reason=problem.reason,
            detail=f"scrub: {problem.detail}",
            ranges=problem.ranges,
            tensors=problem.tensors,
        )
        log.error("scrub: shard %s is corrupted: %s", self.shard.shard_id, problem.detail)
        return False

    def _compare(self, indices: Sequence[int], operation: str) -> Problem | None:
        """Check 5 on some leaves: re-hash ``indices`` from VRAM, compare with the seal's.

        The sealed leaves are compared only once they are shown to give the signed root
        (leaves that came from a device with its root are not trusted before that; the check
        runs once per resident shard).
        """
        sealed = self.resident.digest
        if not self.resident.leaves_checked:
            if merkle_root(sealed.leaves).hex() != self.shard.digest:
                return Problem(Reason.DIGEST, "the sealed leaf hashes do not give the sealed root")
            self.resident.leaves_checked = True
        digest = self._rehash(operation, indices)
        if isinstance(digest, Problem):
            return digest
        self.leaves_checked = len(indices)
        if isinstance(indices, range):
            expected = sealed.leaf_range(indices.start, indices.stop)
        else:
            expected = b"".join(sealed.leaf(i) for i in indices)
        ranges = differing_ranges(
            expected, digest.leaves, indices, self.shard.leaf_size, self.shard.vram_bytes
        )
        return _changed(self.shard, ranges) if ranges else None

    def _rehash(self, operation: str, indices: Sequence[int] | None) -> Digest | Problem:
        """Re-hash from VRAM (every leaf, or ``indices``) as the narrated ``digest``
        operation; a failure to read or hash is a :class:`Problem`, never a bare error."""
        core, shard = self._core, self.shard
        step = _DigestStep(core, self.resident, indices)
        try:
            digest: Digest = core.perform(
                "digest",
                step.run,
                **core.facts(shard.shard_id, shard.vram_bytes, leaf_size=shard.leaf_size),
            )
        except ManagerClosed:
            raise
        except (Exception, SystemExit) as exc:
            said = f": {str(exc)[:200]}" if isinstance(exc, VramError) else ""
            return Problem(
                Reason.DIGEST_FAILED,
                f"the bytes could not be read back or hashed ({type(exc).__name__}{said}); "
                "the shard was not verified",
            )
        core.residency.check_running()
        if digest.fallback:
            core.emitter.digest_fallback(shard.shard_id, operation, digest.fallback)
        return digest


class ScrubTarget:
    """What a :class:`~vramcore.scrub.Scrubber` walks: the resident shards of one manager.

    :param core: the manager's working parts.
    """

    def __init__(self, core: Core) -> None:
        self._core = core
        self.leaf_size = core.leaf_size

    def shards(self) -> list[SealedShard]:
        """The seals of the resident shards."""
        return self._core.residency.seals()

    def scrub_slice(self, shard_id: str, first: int, stop: int) -> bool | None:
        """Re-verify leaves ``first`` to ``stop - 1`` of a resident shard.

        :return: ``True`` when they match, ``False`` when the shard is corrupted (now or
            before), ``None`` when it is no longer resident.
        :raises SealVerificationFailed: they could not be read or hashed (audited).
        :raises ManagerClosed: the manager is closing.
        """
        residency = self._core.residency
        with residency.reading(shard_id) as resident, residency.operation():
            if resident is None:
                return None
            return Verification(self._core, resident.shard, resident).scrub(first, stop)


class _DigestStep:
    """The ``digest`` step of a verification: every leaf, a leaf range or some leaves."""

    def __init__(self, core: Core, resident: Resident, indices: Sequence[int] | None) -> None:
        self._digests = core.digests
        self._buffer = resident.buffer
        self._indices = indices

    def run(self, op: Operation) -> Digest:
        """Compute the digest and annotate ``op`` with its source and leaf count."""
        indices, buf = self._indices, self._buffer
        if indices is None:
            digest = self._digests.whole(buf)
        elif isinstance(indices, range):
            digest = self._digests.leaf_range(buf, indices.start, indices.stop)
        else:
            digest = self._digests.leaves(buf, indices)
        op.attributes["source"] = digest.source
        op.attributes["leaf_count"] = len(digest.leaves) // 32
        return digest


def refuse_absent(core: Core, shard: SealedShard) -> NoReturn:
    """The shard is not resident: a forged, tampered or foreign seal is a verification failure
    (audited), not merely "not resident"; a good seal of a shard freed since is ``NotSealed``.
    """
    problem = seal_problem(shard, core.key(), core.device, None)
    if problem is not None:
        fail(core, shard, problem)
    raise NotSealed(
        f"shard {shard.shard_id} is not resident on this manager (never sealed here, "
        "or deallocated); seal it again"
    )


def fail(core: Core, shard: SealedShard, problem: Problem) -> NoReturn:
    """Audit ``problem`` (critical) and raise it as :class:`SealVerificationFailed`."""
    core.emitter.verification_failed(
        shard.shard_id,
        reason=problem.reason,
        detail=problem.detail,
        ranges=problem.ranges,
        tensors=problem.tensors,
    )
    raise SealVerificationFailed(
        f"seal of shard {shard.shard_id} failed verification: {problem.detail}",
        shard_id=shard.shard_id,
        reason=problem.reason,
        corrupted_ranges=problem.ranges,
        tensors=problem.tensors,
    )


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


def sample_indices(leaves: int, wanted: float | int) -> list[int]:
    """The leaves a sampled check reads, sorted: chosen afresh by a CSPRNG on every call.

    ``wanted`` is a fraction of ``leaves`` (rounded up, at least one) or a count (at most
    ``leaves``). An attacker who knows the seal cannot predict which leaves the next check
    reads.
    """
    k = min(leaves, max(1, math.ceil(wanted * leaves)) if isinstance(wanted, float) else wanted)
    return sorted(secrets.SystemRandom().sample(range(leaves), k))


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
