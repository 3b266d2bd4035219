"""One audit event factory per manager, bound to its worker, device and backend.

The manager says what happened (``emitter.sealed(shard)``); the factory fills in the common
fields and hands the event to the :class:`~vramcore.audit.AuditTrail`. With no sink at all
(``audit="disabled"``) no event is even built, which keeps the fixed cost of a verification
low.
"""

from __future__ import annotations

from vramcore import events
from vramcore.audit import AuditTrail
from vramcore.shard import SealedShard
from vramcore.validation import scrub_text

__all__ = ["Emitter"]


class Emitter:
    """Builds and delivers the audit events of one manager.

    :param trail: where events go.
    :param worker_id: the manager's worker id.
    :param device: the manager's device.
    :param backend: the backend name.
    """

    def __init__(self, trail: AuditTrail, *, worker_id: str, device: int, backend: str) -> None:
        self._trail = trail
        self.worker_id = worker_id
        self.device = device
        self.backend = backend

    def _emit(self, event: events.AuditEvent) -> None:
        self._trail.emit(event)

    def allocated(self, shard_id: str, nbytes: int) -> None:
        """``vram.allocated``."""
        if self._trail.sinks:
            self._emit(
                events.VramAllocated(
                    worker_id=self.worker_id,
                    shard_id=shard_id,
                    device=self.device,
                    nbytes=nbytes,
                    backend=self.backend,
                )
            )

    def allocation_failed(self, shard_id: str, nbytes: int, reason: str) -> None:
        """``vram.allocation_failed``; ``reason`` is scrubbed (it may come from a backend)."""
        if self._trail.sinks:
            self._emit(
                events.VramAllocationFailed(
                    worker_id=self.worker_id,
                    shard_id=shard_id,
                    device=self.device,
                    nbytes=nbytes,
                    backend=self.backend,
                    reason=scrub_text(reason),
                )
            )

    def seal_refused(self, shard_id: str, nbytes: int, reason: str, detail: str) -> None:
        """``vram.seal_refused``: the input failed a check (SHA-256, format, changed)."""
        if self._trail.sinks:
            self._emit(
                events.SealRefused(
                    worker_id=self.worker_id,
                    shard_id=shard_id,
                    device=self.device,
                    nbytes=nbytes,
                    backend=self.backend,
                    reason=reason,
                    detail=scrub_text(detail),
                )
            )

    def sealed(self, shard: SealedShard) -> None:
        """``vram.sealed`` (critical)."""
        if self._trail.sinks:
            self._emit(
                events.VramSealed(
                    worker_id=self.worker_id,
                    shard_id=shard.shard_id,
                    device=self.device,
                    nbytes=shard.vram_bytes,
                    digest=shard.digest,
                    digest_alg=shard.digest_alg,
                    leaf_size=shard.leaf_size,
                    backend=self.backend,
                    file_sha256=shard.file_sha256 or "",
                )
            )

    def verified(self, shard: SealedShard, *, mode: str, leaves_checked: int) -> None:
        """``seal.verified``, saying whether the check was full or sampled."""
        if self._trail.sinks:
            self._emit(
                events.SealVerified(
                    worker_id=self.worker_id,
                    shard_id=shard.shard_id,
                    device=self.device,
                    nbytes=shard.vram_bytes,
                    digest=shard.digest,
                    mode=mode,
                    leaves_checked=leaves_checked,
                )
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
        if self._trail.sinks:
            self._emit(
                events.SealVerificationFailed(
                    worker_id=self.worker_id,
                    shard_id=shard_id,
                    device=self.device,
                    reason=str(reason),
                    detail=detail,
                    byte_ranges=ranges,
                    tensors=tensors,
                )
            )

    def deallocated(self, shard_id: str, nbytes: int) -> None:
        """``vram.deallocated``."""
        if self._trail.sinks:
            self._emit(
                events.VramDeallocated(
                    worker_id=self.worker_id, shard_id=shard_id, device=self.device, nbytes=nbytes
                )
            )

    def policy_violation(self, device: int, rule: str, detail: str, *, refused: bool) -> None:
        """``policy.violation`` (critical to record); severity ``warning`` when only reported."""
        if self._trail.sinks:
            severity = events.Severity.CRITICAL if refused else events.Severity.WARNING
            self._emit(
                events.PolicyViolation(
                    worker_id=self.worker_id,
                    device=device,
                    rule=rule,
                    detail=detail,
                    severity=severity,
                )
            )
