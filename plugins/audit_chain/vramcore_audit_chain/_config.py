"""Configuration of the audit chain, from arguments or the environment."""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs

from vramcore.errors import ConfigError
from vramcore_audit_chain._format import INITIAL_KEY_NAME

__all__ = ["ChainConfig", "Durability"]

_T = TypeVar("_T", int, float)


class Durability(enum.StrEnum):
    """When :meth:`ChainSink.emit` returns.

    ``immediate``: after the record is fsynced. ``batched``: after it is queued; a writer
    thread fsyncs queued records together within ``flush_interval`` (group commit).
    ``mixed`` (default): critical events immediate, the others batched.

    A critical event is fsynced (and witnessed) before ``emit`` returns in every mode, as the
    core's contract for a durable sink asks, so ``batched`` now behaves as ``mixed``; both
    names are kept.
    """

    IMMEDIATE = "immediate"
    BATCHED = "batched"
    MIXED = "mixed"


def _positive(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ConfigError(f"audit chain setting {attr.name} must be positive, got {value}")


def _not_negative(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if not value >= 0:
        raise ConfigError(f"audit chain setting {attr.name} must be 0 or more, got {value}")


@attrs.frozen(kw_only=True)
class ChainConfig:
    """Settings of one audit chain.

    :attr directory: the log directory (created 0700 when missing).
    :attr durability: see :class:`Durability`.
    :attr flush_interval: batched mode: the longest a queued record waits for its fsync (s).
    :attr max_bytes: rotate to the next file once a file reaches this size.
    :attr checkpoint_records: a checkpoint (and a new key epoch) after this many records...
    :attr checkpoint_seconds: ...or after this many seconds with records in the epoch.
    :attr initial_key_file: where setup writes the auditor's initial key (default: in
        ``directory``).
    :attr max_pending_bytes: batched mode: emit blocks while this much is queued unwritten.
    :attr thin_verified_seconds: write a shard's successful verifications at most once per
        this many seconds, with a count of those not written (0: write every one).
    """

    directory: Path = attrs.field(converter=Path)
    durability: Durability = attrs.field(default=Durability.MIXED, converter=Durability)
    flush_interval: float = attrs.field(default=0.05, validator=_positive)
    max_bytes: int = attrs.field(default=64 * 1024 * 1024, validator=_positive)
    checkpoint_records: int = attrs.field(default=10_000, validator=_positive)
    checkpoint_seconds: float = attrs.field(default=300.0, validator=_positive)
    initial_key_file: Path | None = attrs.field(
        default=None, converter=attrs.converters.optional(Path)
    )
    max_pending_bytes: int = attrs.field(default=16 * 1024 * 1024, validator=_positive)
    thin_verified_seconds: float = attrs.field(default=0.0, validator=_not_negative)

    @property
    def initial_key_path(self) -> Path:
        """Where the initial key file is (to be) written."""
        return self.initial_key_file or self.directory / INITIAL_KEY_NAME

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ChainConfig | None:
        """Read ``VRAMCORE_AUDIT_*``; ``None`` when ``VRAMCORE_AUDIT_LOG`` is unset or empty.

        :raises ConfigError: a value is malformed (the message names the variable).
        """
        env = os.environ if env is None else env
        directory = env.get("VRAMCORE_AUDIT_LOG", "").strip()
        if not directory:
            return None
        durability = env.get("VRAMCORE_AUDIT_DURABILITY", "mixed").strip().lower()
        if durability not in {d.value for d in Durability}:
            raise ConfigError(
                f"VRAMCORE_AUDIT_DURABILITY must be one of immediate, batched, mixed; "
                f"got {durability[:20]!r}"
            )
        key_file = env.get("VRAMCORE_AUDIT_INITIAL_KEY_FILE", "").strip() or None
        return cls(
            directory=Path(directory),
            durability=Durability(durability),
            flush_interval=_number(env, "VRAMCORE_AUDIT_FLUSH_MS", float, 50.0) / 1000.0,
            max_bytes=_number(env, "VRAMCORE_AUDIT_MAX_BYTES", int, 64 * 1024 * 1024),
            checkpoint_records=_number(env, "VRAMCORE_AUDIT_CHECKPOINT_RECORDS", int, 10_000),
            checkpoint_seconds=_number(env, "VRAMCORE_AUDIT_CHECKPOINT_SECONDS", float, 300.0),
            initial_key_file=key_file,
            thin_verified_seconds=_number(
                env, "VRAMCORE_AUDIT_THIN_VERIFIED_SECONDS", float, 0.0, zero=True
            ),
        )


def _number(
    env: Mapping[str, str],
    name: str,
    kind: Callable[[str], _T],
    default: _T,
    *,
    zero: bool = False,
) -> _T:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a positive number, got {raw[:20]!r}") from None
    if not (value >= 0 if zero else value > 0) or value != value or value == float("inf"):
        raise ConfigError(f"{name} must be {'0 or more' if zero else 'positive'}, got {raw[:20]!r}")
    return value
