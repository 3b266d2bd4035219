"""Sample audit events for tests of sinks, witnesses and encoders: one helper, used everywhere."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from vramcore.events import (
    AuditEvent,
    DigestFallback,
    ModelSealed,
    PolicyViolation,
    SealRefused,
    SealVerificationFailed,
    SealVerified,
    VramAllocated,
    VramAllocationFailed,
    VramDeallocated,
    VramSealed,
)

__all__ = ["sample_events"]


def sample_events(
    n: int | None = None,
    *,
    worker_id: str = "w1",
    timestamp: datetime | None = None,
    correlation_id: str | None = None,
) -> list[AuditEvent]:
    """Audit events to feed a sink, a witness or an encoder in tests.

    ``sample_events()`` gives one event of every class in :data:`vramcore.events.EVENT_TYPES`
    (allocated, allocation failed, sealed, verified, verification failed, deallocated, policy
    violation, seal refused, digest fallback, model sealed, in that order), with every
    optional field set and text that an
    encoder must escape (non-ASCII, quotes, backslashes).

    ``sample_events(n)`` gives a stream of ``n`` events that tell each other apart (shard
    ``s{i}``, digest ``{i:064x}`` on verifications): mostly :class:`SealVerified`, a
    critical :class:`VramSealed` at every ``i % 7 == 3`` and a :class:`VramDeallocated` at
    every ``i % 5 == 4``. So ``sample_events(4)[0]`` is not critical, ``[3]`` is, and order
    checks can compare whole lists.

    :param worker_id: every event's worker id.
    :param timestamp: every event's time (default: when it is built). A time zone other than
        UTC is accepted and converted, as events do.
    :param correlation_id: every event's correlation id (default: the current one, if any).
    """
    common: dict[str, Any] = {"worker_id": worker_id}
    if timestamp is not None:
        common["timestamp"] = timestamp
    if correlation_id is not None:
        common["correlation_id"] = correlation_id
    if n is None:
        return _one_of_each(common)
    return [_stream_event(i, common) for i in range(n)]


def _one_of_each(common: dict[str, Any]) -> list[AuditEvent]:
    return [
        VramAllocated(**common, shard_id="s", device=0, nbytes=10, backend="mock"),
        VramAllocationFailed(
            **common, shard_id="s", device=1, nbytes=10, backend="mock", reason='oom \u00e9"\\'
        ),
        VramSealed(
            **common,
            shard_id="s",
            device=0,
            nbytes=10,
            digest="ab" * 32,
            digest_alg="rfc6962-sha256",
            leaf_size=65536,
            backend="mock",
            file_sha256="cd" * 32,
        ),
        SealVerified(
            **common,
            shard_id="s",
            device=0,
            nbytes=10,
            digest="ab" * 32,
            mode="sampled",
            leaves_checked=3,
        ),
        SealVerificationFailed(
            **common,
            shard_id="s",
            device=0,
            reason="digest",
            detail="bytes 0-65535",
            byte_ranges=((0, 65536), (131072, 131080)),
            tensors=("embed.weight", "head.weight"),
        ),
        VramDeallocated(**common, shard_id="s", device=0, nbytes=10),
        PolicyViolation(**common, device=-1, rule="ats", detail="ATS on"),
        SealRefused(
            **common,
            shard_id="s",
            device=0,
            nbytes=10,
            backend="mock",
            reason="sha256_mismatch",
            detail="file SHA-256 is not the published one",
        ),
        DigestFallback(
            **common,
            shard_id="s",
            device=0,
            backend="cupy",
            operation="seal",
            reason="no VRAM for the digest scratch",
        ),
        ModelSealed(
            **common,
            model='mini-\u00e9"model\\',
            shard_ids=("m:a.safetensors", "m:b.safetensors"),
            device=0,
            nbytes=20,
            backend="mock",
            index="model.safetensors.index.json",
            publisher_key="cd" * 32,
            manifest_digest="ef" * 32,
        ),
    ]


def _stream_event(i: int, common: dict[str, Any]) -> AuditEvent:
    if i % 7 == 3:
        return VramSealed(
            **common,
            shard_id=f"s{i}",
            device=0,
            nbytes=4096,
            digest="ab" * 32,
            digest_alg="rfc6962-sha256",
            leaf_size=65536,
            backend="mock",
        )
    if i % 5 == 4:
        return VramDeallocated(**common, shard_id=f"s{i}", device=0, nbytes=4096)
    return SealVerified(**common, shard_id=f"s{i}", device=0, nbytes=4096, digest=f"{i:064x}")
