"""Audit events: what happened to VRAM, as frozen records every audit sink receives.

Each event class carries the common fields ``timestamp`` (UTC), ``worker_id``, ``severity``
and ``correlation_id`` (from :func:`vramcore.correlate`, empty when none), plus its own fields.
:meth:`AuditEvent.to_dict` gives a stable JSON form tagged with ``event_type``;
:func:`event_from_dict` reads it back.

Every string field is checked when the event is built (no control, ESC, NUL, bidi, zero-width
or BOM characters; at most :data:`vramcore.validation.MAX_FIELD_CHARS` characters, longer values
cut with a marker), so sinks can write events without escaping worries. No event has a field
for a secret or a device pointer: there is nowhere to put one.

Events whose :attr:`AuditEvent.critical` is true (sealed, verification failed, policy
violation) fail the operation that produced them when a sink cannot record them.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar

import attrs

from vramcore._context import current_correlation_id
from vramcore.errors import InvalidInput
from vramcore.validation import clean_text

__all__ = [
    "EVENT_FIELDS",
    "EVENT_TYPES",
    "AuditEvent",
    "DigestFallback",
    "ModelSealed",
    "PolicyViolation",
    "SealRefused",
    "SealVerificationFailed",
    "SealVerified",
    "Severity",
    "VerificationReason",
    "VramAllocated",
    "VramAllocationFailed",
    "VramDeallocated",
    "VramSealed",
    "event_from_dict",
    "format_timestamp",
    "parse_timestamp",
]


class Severity(enum.StrEnum):
    """How much an event matters to an operator, in OpenTelemetry's severity vocabulary."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


class VerificationReason(enum.StrEnum):
    """Why a seal failed verification: ``SealVerificationFailed.reason``, of the error and of
    the audit event alike."""

    SIGNATURE = "signature"  #: the HMAC does not verify under this worker's key
    DEVICE = "device"  #: sealed for another device
    STALE = "stale"  #: not the seal of the resident shard (replayed or old)
    QUARANTINED = "quarantined"  #: a scrub found the shard corrupted; reseal it
    DIGEST = "digest"  #: the bytes in VRAM changed
    DIGEST_FAILED = "digest_failed"  #: the bytes could not be read or hashed: not verified


def _utcnow() -> datetime:
    return datetime.now(UTC)


def format_timestamp(ts: datetime) -> str:
    """Render a timestamp as ISO 8601 UTC with microseconds and a ``Z`` suffix."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_timestamp(text: str) -> datetime:
    """Parse what :func:`format_timestamp` writes."""
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"timestamp must look like 2026-01-31T12:00:00.000000Z: {exc}") from None


def _check_timestamp(_inst: object, _attr: object, value: datetime) -> None:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise InvalidInput("timestamp must be a timezone-aware datetime")


@attrs.frozen(kw_only=True)
class AuditEvent:
    """Fields every audit event carries.

    :attr event_type: the stable tag of the concrete class (``"vram.sealed"``...).
    :attr critical: whether a sink failure on this event fails the operation.
    """

    event_type: ClassVar[str] = "audit.event"
    critical: ClassVar[bool] = False
    default_severity: ClassVar[Severity] = Severity.INFO

    worker_id: str
    timestamp: datetime = attrs.field(factory=_utcnow, validator=_check_timestamp)
    severity: Severity = attrs.field(
        default=attrs.Factory(lambda self: type(self).default_severity, takes_self=True),
        converter=Severity,
    )
    correlation_id: str = attrs.field(factory=current_correlation_id)

    def __attrs_post_init__(self) -> None:
        cls = type(self)
        checks = _CHECKS.get(cls) or _checks_of(cls)
        for name, kind in checks:
            value = getattr(self, name)
            if kind is _Kind.INT:
                if type(value) is not int and (isinstance(value, bool) or not _is_int(value)):
                    raise InvalidInput(f"{name} must be an integer, got {type(value).__name__}")
            elif kind is _Kind.STR or isinstance(value, str):
                if kind is _Kind.STR and not isinstance(value, str):
                    raise InvalidInput(f"{name} must be a string, got {type(value).__name__}")
                if name != "severity":
                    cleaned_text = clean_text(value, field=name)
                    if cleaned_text is not value:
                        object.__setattr__(self, name, cleaned_text)
            elif kind is _Kind.STRINGS or kind is _Kind.RANGES:
                if not isinstance(value, tuple | list):
                    raise InvalidInput(f"{name} must be a list, got {type(value).__name__}")
                strings = kind is _Kind.STRINGS
                object.__setattr__(self, name, _clean_tuple(tuple(value), name, strings=strings))

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON form: plain types only, tagged with ``event_type``."""
        out: dict[str, Any] = {"event_type": self.event_type}
        for field in attrs.fields(type(self)):
            value = getattr(self, field.name)
            if isinstance(value, datetime):
                value = format_timestamp(value)
            elif isinstance(value, Severity):
                value = value.value
            elif isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            out[field.name] = value
        return out

    def to_json(self) -> str:
        """:meth:`to_dict` as compact JSON with sorted keys (the same bytes every time)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


class _Kind(enum.Enum):
    """How :meth:`AuditEvent.__attrs_post_init__` checks a field, by its declared type."""

    STR = "str"
    INT = "int"
    STRINGS = "tuple of strings"
    RANGES = "tuple of byte ranges"
    OTHER = "other"


#: Each event class's fields and how each is checked, worked out once per class.
_CHECKS: dict[type, tuple[tuple[str, _Kind], ...]] = {}


def _checks_of(cls: type[AuditEvent]) -> tuple[tuple[str, _Kind], ...]:
    checks: list[tuple[str, _Kind]] = []
    for field in attrs.fields(cls):
        # Field types are the annotation strings (postponed annotations).
        if field.type in ("str", str):
            kind = _Kind.STR
        elif field.type in ("int", int):
            kind = _Kind.INT
        elif str(field.type).startswith("tuple"):
            strings = field.type in ("tuple[str, ...]", tuple[str, ...])
            kind = _Kind.STRINGS if strings else _Kind.RANGES
        else:
            kind = _Kind.OTHER
        checks.append((field.name, kind))
    _CHECKS[cls] = result = tuple(checks)
    return result


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _clean_tuple(values: tuple[Any, ...], field: str, *, strings: bool) -> tuple[Any, ...]:
    """Check a tuple field: strings (tensor names) or ``(start, end)`` byte ranges."""
    cleaned: list[Any] = []
    for v in values:
        if strings and isinstance(v, str):
            cleaned.append(clean_text(v, field=field))
        elif (
            not strings
            and isinstance(v, list | tuple)
            and len(v) == 2
            and all(_is_int(x) for x in v)
            and 0 <= v[0] <= v[1]
        ):
            cleaned.append(tuple(v))
        else:
            wanted = "strings" if strings else "(start, end) byte ranges"
            raise InvalidInput(f"{field} must hold {wanted}, got {type(v).__name__}")
    return tuple(cleaned)


@attrs.frozen(kw_only=True)
class VramAllocated(AuditEvent):
    """Device memory was allocated for a shard."""

    event_type: ClassVar[str] = "vram.allocated"
    shard_id: str
    device: int
    nbytes: int
    backend: str


@attrs.frozen(kw_only=True)
class VramAllocationFailed(AuditEvent):
    """An allocation or the copy into it failed; nothing stays allocated."""

    event_type: ClassVar[str] = "vram.allocation_failed"
    default_severity: ClassVar[Severity] = Severity.ERROR
    shard_id: str
    device: int
    nbytes: int
    backend: str
    reason: str


@attrs.frozen(kw_only=True)
class SealRefused(AuditEvent):
    """A shard was not sealed because its input failed a check, not because of the device.

    ``reason`` is one of ``"sha256_mismatch"`` (the file is not the published one),
    ``"malformed_file"`` (a safetensors header refused) or ``"changed_while_loading"``;
    ``detail`` says more. Nothing stays allocated. Distinct from
    :class:`VramAllocationFailed` so an auditor sees tampered inputs as what they are.
    """

    event_type: ClassVar[str] = "vram.seal_refused"
    default_severity: ClassVar[Severity] = Severity.ERROR
    shard_id: str
    device: int
    nbytes: int
    backend: str
    reason: str
    detail: str = ""


@attrs.frozen(kw_only=True)
class VramSealed(AuditEvent):
    """A shard's bytes in VRAM were digested and signed."""

    event_type: ClassVar[str] = "vram.sealed"
    critical: ClassVar[bool] = True
    shard_id: str
    device: int
    nbytes: int
    digest: str
    digest_alg: str
    leaf_size: int
    backend: str
    file_sha256: str = ""


@attrs.frozen(kw_only=True)
class SealVerified(AuditEvent):
    """A seal verified: signature valid and the digest recomputed from VRAM matched.

    :attr mode: ``"full"`` (every byte re-hashed, the root compared) or ``"sampled"`` (a
        random subset of leaves compared with the sealed leaves).
    :attr leaves_checked: how many leaves were re-hashed from VRAM.
    """

    event_type: ClassVar[str] = "seal.verified"
    shard_id: str
    device: int
    nbytes: int
    digest: str
    mode: str = "full"
    leaves_checked: int = 0


@attrs.frozen(kw_only=True)
class SealVerificationFailed(AuditEvent):
    """A seal failed to verify; ``byte_ranges`` and ``tensors`` say where, when known."""

    event_type: ClassVar[str] = "seal.verification_failed"
    critical: ClassVar[bool] = True
    default_severity: ClassVar[Severity] = Severity.CRITICAL
    shard_id: str
    device: int
    reason: str
    detail: str
    byte_ranges: tuple[tuple[int, int], ...] = ()
    tensors: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class DigestFallback(AuditEvent):
    """The device declined a digest this time (no scratch memory, a kernel that failed to
    launch): the bytes were hashed on the host instead, and a seal was still cross-checked.

    :attr operation: ``"seal"``, ``"verify"`` or ``"scrub"``.
    :attr reason: what the device-digest plugin said.
    """

    event_type: ClassVar[str] = "digest.fallback"
    default_severity: ClassVar[Severity] = Severity.WARNING
    shard_id: str
    device: int
    backend: str
    operation: str
    reason: str


@attrs.frozen(kw_only=True)
class VramDeallocated(AuditEvent):
    """A shard's device memory was freed."""

    event_type: ClassVar[str] = "vram.deallocated"
    shard_id: str
    device: int
    nbytes: int


@attrs.frozen(kw_only=True)
class ModelSealed(AuditEvent):
    """A model directory was sealed: one shard per file, all of them resident now.

    :attr model: the directory's name.
    :attr shard_ids: the shards, in file order (each has its own ``vram.sealed`` event).
    :attr index: the index file's name, ``""`` without an index.
    :attr publisher_key: SHA-256 of the publisher's public key (PEM), ``""`` when unsigned.
    :attr manifest_digest: the signed manifest's digest, ``""`` when unsigned.
    """

    event_type: ClassVar[str] = "vram.model_sealed"
    critical: ClassVar[bool] = True
    model: str
    shard_ids: tuple[str, ...]
    device: int
    nbytes: int
    backend: str
    index: str = ""
    publisher_key: str = ""
    manifest_digest: str = ""


@attrs.frozen(kw_only=True)
class PolicyViolation(AuditEvent):
    """A device or allocation broke the VRAM-only policy (``device`` is -1 when unknown)."""

    event_type: ClassVar[str] = "policy.violation"
    critical: ClassVar[bool] = True
    default_severity: ClassVar[Severity] = Severity.CRITICAL
    device: int
    rule: str
    detail: str


#: Every concrete event class by its ``event_type`` tag.
EVENT_TYPES: Mapping[str, type[AuditEvent]] = {
    cls.event_type: cls
    for cls in (
        VramAllocated,
        VramAllocationFailed,
        SealRefused,
        VramSealed,
        SealVerified,
        SealVerificationFailed,
        DigestFallback,
        VramDeallocated,
        ModelSealed,
        PolicyViolation,
    )
}

#: Every field an event of :data:`EVENT_TYPES` carries besides the common ones -> its type
#: (tuples hold byte ranges or names). What audit and tracing sinks export comes from here.
EVENT_FIELDS: Mapping[str, type] = {
    "worker_id": str,
    "shard_id": str,
    "device": int,
    "nbytes": int,
    "backend": str,
    "digest": str,
    "digest_alg": str,
    "leaf_size": int,
    "file_sha256": str,
    "mode": str,
    "leaves_checked": int,
    "operation": str,
    "reason": str,
    "detail": str,
    "rule": str,
    "byte_ranges": tuple,
    "tensors": tuple,
    "model": str,
    "shard_ids": tuple,
    "index": str,
    "publisher_key": str,
    "manifest_digest": str,
}


def event_from_dict(data: Mapping[str, Any]) -> AuditEvent:
    """Rebuild an event from :meth:`AuditEvent.to_dict` output (checks every field again)."""
    try:
        cls = EVENT_TYPES[data["event_type"]]
    except (KeyError, TypeError):
        raise InvalidInput(
            f"unknown event_type; expected one of: {', '.join(sorted(EVENT_TYPES))}"
        ) from None
    kwargs = {k: v for k, v in data.items() if k != "event_type"}
    if "timestamp" in kwargs:
        kwargs["timestamp"] = parse_timestamp(kwargs["timestamp"])
    for name in ("byte_ranges", "tensors"):
        if name in kwargs and not isinstance(kwargs[name], list | tuple):
            raise InvalidInput(f"{name} must be a list, got {type(kwargs[name]).__name__}")
    try:
        return cls(**kwargs)
    except InvalidInput:
        raise
    except (TypeError, ValueError) as exc:  # e.g. an unknown severity
        raise InvalidInput(f"malformed {cls.event_type} event: {exc}") from None
