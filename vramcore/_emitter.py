"""One audit event factory per manager, bound to its worker, device and backend.

The flows say what happened (``emitter.sealed(shard)``); the emitter fills in the common
fields and hands the event to the :class:`~vramcore.audit.AuditTrail`. With no sink at all
(``audit="disabled"``) the emitter records into :data:`NOWHERE`, a null recorder that builds no
event, which keeps the fixed cost of a verification low without a guard in every method.
"""

from __future__ import annotations

from typing import Any, Protocol

from vramcore import events
from vramcore.audit import AuditTrail
from vramcore.shard import SealedShard
from vramcore.validation import scrub_text

__all__ = ["NOWHERE", "Emitter"]


class _Recorder(Protocol):
    def record(self, kind: type[events.AuditEvent], fields: dict[str, Any]) -> None: ...


class _Trail:
    """Builds each event and delivers it to every sink of the trail."""

    def __init__(self, trail: AuditTrail, worker_id: str) -> None:
        self._trail = trail
        self._worker_id = worker_id

    def record(self, kind: type[events.AuditEvent], fields: dict[str, Any]) -> None:
        self._trail.emit(kind(worker_id=self._worker_id, **fields))


class _Nowhere:
    """The null recorder: no sink, so no event is even built."""

    def record(self, kind: type[events.AuditEvent], fields: dict[str, Any]) -> None:
        return None


#: Where the events of a manager without audit sinks go.
NOWHERE = _Nowhere()


class Emitter:
    """Builds and delivers the audit events of one manager.

    :param trail: where events go (its sinks must be collected already).
    :param worker_id: the manager's worker id.
    :param device: the manager's device.
    :param backend: the backend name.
    """

    def __init__(self, trail: AuditTrail, *, worker_id: str, device: int, backend: str) -> None:
        self._out: _Recorder = _Trail(trail, worker_id) if trail.sinks else NOWHERE
        self.worker_id = worker_id
        self.device = device
        self.backend = backend

    def allocated(self, shard_id: str, nbytes: int) -> None:
        """``vram.allocated``."""
        self._out.record(
            events.VramAllocated,
            dict(shard_id=shard_id, device=self.device, nbytes=nbytes, backend=self.backend),
        )

    def allocation_failed(self, shard_id: str, nbytes: int, reason: str) -> None:
        """``vram.allocation_failed``; ``reason`` is scrubbed (it may come from a backend)."""
        self._out.record(
            events.VramAllocationFailed,
            dict(
                shard_id=shard_id,
                device=self.device,
                nbytes=nbytes,
                backend=self.backend,
                reason=scrub_text(reason),
            ),
        )

    def seal_refused(self, shard_id: str, nbytes: int, reason: str, detail: str) -> None:
        """``vram.seal_refused``: the bytes failed a check (SHA-256, format, cross-check)."""
        self._out.record(
            events.SealRefused,
            dict(
                shard_id=shard_id,
                device=self.device,
                nbytes=nbytes,
                backend=self.backend,
                reason=reason,
                detail=scrub_text(detail),
            ),
        )

    def sealed(self, shard: SealedShard) -> None:
        """``vram.sealed`` (critical)."""
        self._out.record(
            events.VramSealed,
            dict(
                shard_id=shard.shard_id,
                device=self.device,
                nbytes=shard.vram_bytes,
                digest=shard.digest,
                digest_alg=shard.digest_alg,
                leaf_size=shard.leaf_size,
                backend=self.backend,
                file_sha256=shard.file_sha256 or "",
            ),
        )

    def model_sealed(self, model: Any) -> None:
        """``vram.model_sealed`` (critical): a directory, its shards and its publisher.

        :param model: a :class:`vramcore._sealdir.SealedModel` (not imported: it imports this).
        """
        self._out.record(
            events.ModelSealed,
            dict(
                model=model.model,
                shard_ids=tuple(s.shard_id for s in model.shards),
                device=self.device,
                nbytes=model.vram_bytes,
                backend=self.backend,
                index=model.index or "",
                publisher_key=model.publisher.key_fingerprint if model.publisher else "",
                manifest_digest=model.publisher.manifest_digest if model.publisher else "",
            ),
        )

    def verified(self, shard: SealedShard, *, mode: str, leaves_checked: int) -> None:
        """``seal.verified``, saying whether the check was full or sampled."""
        self._out.record(
            events.SealVerified,
            dict(
                shard_id=shard.shard_id,
                device=self.device,
                nbytes=shard.vram_bytes,
                digest=shard.digest,
                mode=mode,
                leaves_checked=leaves_checked,
            ),
        )

    def verification_failed(
        self,
        shard_id: str,
        *,
        reason: str,
        detail: str,
        ranges: tuple[tuple[int, int], ...] = (),
        tensors: tuple[str, ...] = (),
    ) -> None:
        """``seal.verification_failed`` (critical)."""
        self._out.record(
            events.SealVerificationFailed,
            dict(
                shard_id=shard_id,
                device=self.device,
                reason=str(reason),
                detail=scrub_text(detail),
                byte_ranges=ranges,
                tensors=tensors,
            ),
        )

    def digest_fallback(self, shard_id: str, operation: str, reason: str) -> None:
        """``digest.fallback`` (a warning): the device declined; the host hashed."""
        self._out.record(
            events.DigestFallback,
            dict(
                shard_id=shard_id,
                device=self.device,
                backend=self.backend,
                operation=operation,
                reason=scrub_text(reason),
            ),
        )

    def deallocated(self, shard_id: str, nbytes: int) -> None:
        """``vram.deallocated``."""
        self._out.record(
            events.VramDeallocated, dict(shard_id=shard_id, device=self.device, nbytes=nbytes)
        )

    def policy_violation(self, device: int, rule: str, detail: str, *, refused: bool) -> None:
        """``policy.violation`` (critical to record); severity ``warning`` when only reported."""
        severity = events.Severity.CRITICAL if refused else events.Severity.WARNING
        self._out.record(
            events.PolicyViolation,
            dict(device=device, rule=rule, detail=detail, severity=severity),
        )
