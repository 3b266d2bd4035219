"""The sealed shard record and its JSON attestation.

A :class:`SealedShard` is what :meth:`vramcore.VramManager.seal_model` returns: the facts of a
shard resident in VRAM, its Merkle digest and the HMAC signature over them. It holds no device
pointer. Its ``signature`` is left out of ``repr``/``str`` and of logs; :meth:`to_json` includes
it (an attestation without it cannot be checked) unless asked not to.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import attrs

from vramcore.digest import DIGEST_ALG
from vramcore.errors import InvalidInput
from vramcore.events import format_timestamp, parse_timestamp
from vramcore.seal import canonical_seal_message
from vramcore.validation import check_shard_id, safe_repr

__all__ = ["ATTESTATION_VERSION", "SealedShard", "TensorRange"]

ATTESTATION_VERSION = 1
_HEX64 = re.compile(r"[0-9a-f]{64}")


@attrs.frozen
class TensorRange:
    """Where one tensor's bytes lie in the shard: ``[start, end)``."""

    name: str
    start: int
    end: int

    def overlaps(self, start: int, end: int) -> bool:
        """Whether this tensor shares a byte with ``[start, end)``."""
        return self.start < end and start < self.end


def _hex64(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise InvalidInput(f"{attr.name} must be 64 lower-case hex digits")


def _tensors(value: Sequence[TensorRange] | None) -> tuple[TensorRange, ...]:
    return tuple(value or ())


@attrs.frozen(kw_only=True)
class SealedShard:
    """A shard sealed in VRAM.

    :attr shard_id: the caller's name for the shard.
    :attr gpu_device: device index it lives on.
    :attr vram_bytes: its size in bytes.
    :attr digest: RFC 6962 Merkle root, 64 hex digits.
    :attr digest_alg: ``"rfc6962-sha256"``.
    :attr leaf_size: Merkle leaf size in bytes.
    :attr sealed_at: when it was sealed (UTC, microseconds).
    :attr signature: HMAC-SHA256 over the canonical seal message (never shown in repr).
    :attr tensors: tensor name → byte range, when sealed from a safetensors file.
    :attr file_sha256: the whole-file SHA-256 checked while loading, when one was given.
    """

    shard_id: str = attrs.field(validator=lambda _i, _a, v: check_shard_id(v))
    gpu_device: int
    vram_bytes: int
    digest: str = attrs.field(validator=_hex64)
    digest_alg: str = DIGEST_ALG
    leaf_size: int
    sealed_at: datetime
    signature: bytes = attrs.field(repr=False)
    tensors: tuple[TensorRange, ...] = attrs.field(default=(), converter=_tensors)
    file_sha256: str | None = None

    def signed_message(self) -> bytes:
        """The canonical bytes the signature covers (see :mod:`vramcore.seal`)."""
        return canonical_seal_message(
            shard_id=self.shard_id,
            gpu_device=self.gpu_device,
            vram_bytes=self.vram_bytes,
            digest_alg=self.digest_alg,
            leaf_size=self.leaf_size,
            digest=self.digest,
            sealed_at=format_timestamp(self.sealed_at),
            tensors=[(t.name, t.start, t.end) for t in self.tensors],
            file_sha256=self.file_sha256 or "",
        )

    def tensors_in(self, ranges: Sequence[tuple[int, int]]) -> list[str]:
        """Names of the tensors overlapping any of ``ranges`` (shard order, no repeats)."""
        return [t.name for t in self.tensors if any(t.overlaps(a, b) for a, b in ranges)]

    def __str__(self) -> str:
        return (
            f"SealedShard {self.shard_id} on GPU {self.gpu_device}: {self.vram_bytes} bytes, "
            f"{self.digest_alg} {self.digest[:16]}..."
        )

    def to_dict(self, *, include_signature: bool = True) -> dict[str, Any]:
        """The attestation as plain JSON types."""
        out: dict[str, Any] = {
            "attestation_version": ATTESTATION_VERSION,
            "shard_id": self.shard_id,
            "gpu_device": self.gpu_device,
            "vram_bytes": self.vram_bytes,
            "digest": self.digest,
            "digest_alg": self.digest_alg,
            "leaf_size": self.leaf_size,
            "sealed_at": format_timestamp(self.sealed_at),
            "tensors": [[t.name, t.start, t.end] for t in self.tensors],
            "file_sha256": self.file_sha256,
        }
        if include_signature:
            out["signature"] = self.signature.hex()
        return out

    def to_json(self, *, include_signature: bool = True) -> str:
        """The attestation as compact JSON with sorted keys."""
        return json.dumps(
            self.to_dict(include_signature=include_signature),
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> SealedShard:
        """Read an attestation written by :meth:`to_json` (with its signature).

        :raises InvalidInput: malformed JSON, a missing or mistyped field, or an unknown version.
        """
        try:
            data = json.loads(text)
        except (ValueError, TypeError) as exc:
            raise InvalidInput(f"attestation is not valid JSON: {exc}") from None
        if not isinstance(data, Mapping):
            raise InvalidInput("attestation must be a JSON object")
        return cls._from_mapping(data)

    @classmethod
    def _from_mapping(cls, data: Mapping[str, Any]) -> SealedShard:
        if data.get("attestation_version") != ATTESTATION_VERSION:
            raise InvalidInput(
                f"unsupported attestation_version {safe_repr(data.get('attestation_version'))}; "
                f"this vramcore reads version {ATTESTATION_VERSION}"
            )
        try:
            ints = {k: data[k] for k in ("gpu_device", "vram_bytes", "leaf_size")}
            strs = {k: data[k] for k in ("shard_id", "digest", "digest_alg", "sealed_at")}
            signature_hex = data["signature"]
        except KeyError as exc:
            raise InvalidInput(f"attestation lacks field {exc.args[0]!r}") from None
        for key, value in ints.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidInput(f"attestation field {key!r} must be an integer")
        for key, value in strs.items():
            if not isinstance(value, str):
                raise InvalidInput(f"attestation field {key!r} must be a string")
        if not isinstance(signature_hex, str) or not _HEX64.fullmatch(signature_hex):
            raise InvalidInput("attestation field 'signature' must be 64 hex digits")
        raw_tensors = data.get("tensors")
        if raw_tensors is not None and not isinstance(raw_tensors, list):
            raise InvalidInput("attestation field 'tensors' must be a list or null")
        tensors = []
        for item in raw_tensors or ():
            if (
                not isinstance(item, list)
                or len(item) != 3
                or not isinstance(item[0], str)
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in item[1:])
            ):
                raise InvalidInput("attestation field 'tensors' must hold [name, start, end] items")
            tensors.append(TensorRange(item[0], item[1], item[2]))
        file_sha256 = data.get("file_sha256")
        if file_sha256 is not None and (
            not isinstance(file_sha256, str) or not _HEX64.fullmatch(file_sha256)
        ):
            raise InvalidInput("attestation field 'file_sha256' must be 64 hex digits or null")
        return cls(
            shard_id=strs["shard_id"],
            gpu_device=ints["gpu_device"],
            vram_bytes=ints["vram_bytes"],
            digest=strs["digest"],
            digest_alg=strs["digest_alg"],
            leaf_size=ints["leaf_size"],
            sealed_at=parse_timestamp(strs["sealed_at"]),
            signature=bytes.fromhex(signature_hex),
            tensors=tensors,
            file_sha256=file_sha256,
        )
