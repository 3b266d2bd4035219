"""The sealed shard record and its JSON attestation.

A :class:`SealedShard` is what :meth:`vramcore.VramManager.seal_model` returns: the facts of a
shard resident in VRAM, its Merkle digest and the HMAC signature over them. It holds no device
pointer. Its ``signature`` is left out of ``repr``/``str`` and of logs; :meth:`to_json` includes
it (an attestation without it cannot be checked) unless asked not to.
"""

from __future__ import annotations

import bisect
import functools
import json
import re
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, overload

import attrs

from vramcore.digest import DIGEST_ALG
from vramcore.errors import InvalidInput
from vramcore.events import format_timestamp, parse_timestamp
from vramcore.seal import canonical_seal_message, tensor_map_digest
from vramcore.validation import check_shard_id, clean_text, safe_repr

__all__ = [
    "ATTESTATION_VERSION",
    "MAX_ATTESTATION_BYTES",
    "MAX_SHAPE_DIMS",
    "READABLE_ATTESTATION_VERSIONS",
    "SealedShard",
    "TensorMap",
    "TensorRange",
]

#: Version 2 records each tensor's dtype and shape (``[name, start, end, dtype, shape]``).
#: Version 1 attestations (``[name, start, end]``, written before dtypes were recorded) are
#: still read and their signatures still check (the signed map digest covers dtype and shape
#: only when the map records them); their shards have no layout, so
#: :meth:`vramcore.backend.DeviceBuffer.tensors` refuses them: reseal to serve from them.
ATTESTATION_VERSION = 2
#: The attestation versions :meth:`SealedShard.from_json` reads.
READABLE_ATTESTATION_VERSIONS = (1, 2)
#: Larger attestations are refused before parsing (a million-tensor map takes about 60 MB).
MAX_ATTESTATION_BYTES = 256 << 20
#: Longest tensor name accepted (the audit events carry names whole).
MAX_TENSOR_NAME_CHARS = 1024
#: Most dimensions a tensor may have (real models use at most a handful).
MAX_SHAPE_DIMS = 64
_HEX64 = re.compile(r"[0-9a-f]{64}")
_DTYPE_NAME = re.compile(r"[A-Z0-9_]{1,16}")
_MAX_OFFSET = (1 << 63) - 1
_V2_ITEM = "[name, start, end, dtype, shape]"
_ATTESTATION_FIELDS = frozenset(
    {
        "attestation_version",
        "shard_id",
        "gpu_device",
        "vram_bytes",
        "digest",
        "digest_alg",
        "leaf_size",
        "sealed_at",
        "tensors",
        "file_sha256",
        "signature",
    }
)


@attrs.frozen
class TensorRange:
    """Where one tensor's bytes lie in the shard, ``[start, end)``, and how to read them.

    :attr dtype: the safetensors dtype name (``"BF16"``), ``None`` when not recorded.
    :attr shape: the tensor's shape, ``None`` when not recorded.
    """

    name: str
    start: int
    end: int
    dtype: str | None = None
    shape: tuple[int, ...] | None = None

    def overlaps(self, start: int, end: int) -> bool:
        """Whether this tensor shares a byte with ``[start, end)``."""
        return self.start < end and start < self.end


def check_tensor_name(name: object) -> str:
    """A tensor name safe to show and audit: a string, printable, at most 1024 characters."""
    if not isinstance(name, str):
        raise InvalidInput(f"tensor name must be a string, got {type(name).__name__}")
    if len(name) > MAX_TENSOR_NAME_CHARS:
        raise InvalidInput(
            f"tensor name {safe_repr(name)} is {len(name)} characters long "
            f"(at most {MAX_TENSOR_NAME_CHARS})"
        )
    if not (name.isascii() and name.isprintable()):  # the fast path covers real models
        clean_text(name, field="tensor name")
    return name


def check_layout(name: str, dtype: object, shape: object) -> tuple[int, ...]:
    """Check a tensor's recorded dtype and shape; return the shape as a tuple.

    Structural checks only (a dtype name of ``[A-Z0-9_]``, at most :data:`MAX_SHAPE_DIMS`
    non-negative dimensions): the dtype table and the byte count (``prod(shape)`` items fill
    exactly ``nbytes``) are checked by the safetensors parser when the map is made and again
    by :mod:`vramcore._tensors` before any view is made.

    :raises InvalidInput: malformed dtype or shape.
    """
    if not isinstance(dtype, str) or not _DTYPE_NAME.fullmatch(dtype):
        raise InvalidInput(f"tensor {safe_repr(name)} has a malformed dtype {safe_repr(dtype)}")
    if (
        not isinstance(shape, tuple | list)
        or len(shape) > MAX_SHAPE_DIMS
        or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _MAX_OFFSET for d in shape
        )
    ):
        raise InvalidInput(f"tensor {safe_repr(name)} has a malformed shape {safe_repr(shape)}")
    return tuple(shape)


def _offset(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_OFFSET:
        raise InvalidInput(f"{what} must be an integer from 0 to 2**63-1, got {safe_repr(value)}")
    return value


def _layout_columns(
    n: int, dtypes: Sequence[str] | None, shapes: Sequence[Sequence[int]] | None
) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]] | None:
    if dtypes is None and shapes is None:
        return None
    if dtypes is None or shapes is None or not len(dtypes) == len(shapes) == n:
        raise InvalidInput("a tensor map records dtype and shape for every tensor or for none")
    return tuple(dtypes), tuple(tuple(s) for s in shapes)


class TensorMap(Sequence[TensorRange]):
    """A shard's tensor map, stored as columns: a million tensors cost tens of MB, not a GB.

    Behaves as a read-only sequence of :class:`TensorRange`, sorted by ``(start, end, name)``.
    Equality compares the columns, the hash and the signed :attr:`digest` are computed once.
    Build one with :meth:`from_ranges` (checks and sorts) or :func:`vramcore.safetensors`'s
    parser. A map read from a safetensors header also records each tensor's dtype and shape
    (:attr:`has_layout`); both are covered by the seal.
    """

    __slots__ = (
        "__weakref__",
        "_digest",
        "_disjoint",
        "_dtypes",
        "_ends",
        "_names",
        "_shapes",
        "_starts",
    )

    def __init__(
        self,
        names: Sequence[str],
        starts: Sequence[int],
        ends: Sequence[int],
        dtypes: Sequence[str] | None = None,
        shapes: Sequence[Sequence[int]] | None = None,
    ) -> None:
        """Columns already sorted by ``(start, end, name)`` and checked; see :meth:`from_ranges`.

        ``dtypes`` and ``shapes`` are given together (one per tensor) or not at all.
        """
        if not len(names) == len(starts) == len(ends):
            raise InvalidInput("tensor map columns must have the same length")
        layout = _layout_columns(len(names), dtypes, shapes)
        self._names = tuple(names)
        self._starts = array("q", starts)
        self._ends = array("q", ends)
        self._dtypes: tuple[str, ...] | None = None
        self._shapes: tuple[tuple[int, ...], ...] | None = None
        if layout is not None:
            self._dtypes, self._shapes = layout
        self._digest: bytes | None = None
        # Non-overlapping ranges in order have non-decreasing ends: bisect finds a byte's tensor.
        self._disjoint = all(map(int.__le__, self._ends[:-1], self._starts[1:]))

    @classmethod
    def from_ranges(
        cls, ranges: Iterable[TensorRange | Sequence[Any]] | TensorMap | None
    ) -> TensorMap:
        """Check and sort ``(name, start, end[, dtype, shape])`` items (or :class:`TensorRange`).

        Either every item carries a dtype and shape or none does.

        :raises InvalidInput: a name is not printable text, an offset is not an integer,
            ``start > end``, a name appears twice, a dtype or shape is malformed or does not
            fit the byte range.
        """
        if isinstance(ranges, TensorMap):
            return ranges
        items: list[tuple[int, int, str, str | None, tuple[int, ...] | None]] = []
        for item in ranges or ():
            if isinstance(item, TensorRange):
                name, start, end = item.name, item.start, item.end
                dtype, shape = item.dtype, item.shape
            elif len(item) == 5:
                name, start, end, dtype, shape = item
            else:
                name, start, end = item
                dtype, shape = None, None
            check_tensor_name(name)
            if _offset(start, "tensor start") > _offset(end, "tensor end"):
                raise InvalidInput(f"tensor {safe_repr(name)} ends before it starts")
            if dtype is not None or shape is not None:
                shape = check_layout(name, dtype, shape)
            items.append((start, end, name, dtype, shape))
        items.sort(key=lambda i: i[:3])
        names = [i[2] for i in items]
        if len(set(names)) != len(names):
            raise InvalidInput("a tensor name appears twice in the tensor map")
        layout = [i for i in items if i[3] is not None]
        if layout and len(layout) != len(items):
            raise InvalidInput("a tensor map records dtype and shape for every tensor or for none")
        return cls(
            names,
            [i[0] for i in items],
            [i[1] for i in items],
            [i[3] for i in items] if layout else None,  # type: ignore[misc]
            [i[4] for i in items] if layout else None,  # type: ignore[misc]
        )

    @property
    def names(self) -> tuple[str, ...]:
        """Tensor names, in shard order."""
        return self._names

    @property
    def has_layout(self) -> bool:
        """Whether the map records each tensor's dtype and shape (a non-empty map read from a
        safetensors header does; one from a version-1 attestation does not)."""
        return self._dtypes is not None and bool(self._names)

    @property
    def digest(self) -> bytes:
        """SHA-256 of the map as the seal signs it (:func:`vramcore.seal.tensor_map_digest`)."""
        if self._digest is None:
            self._digest = tensor_map_digest(
                (),
                names=self._names,
                starts=self._starts,
                ends=self._ends,
                dtypes=self._dtypes if self.has_layout else None,
                shapes=self._shapes if self.has_layout else None,
            )
        return self._digest

    def __len__(self) -> int:
        return len(self._names)

    @overload
    def __getitem__(self, index: int) -> TensorRange: ...

    @overload
    def __getitem__(self, index: slice) -> TensorMap: ...

    def __getitem__(self, index: int | slice) -> TensorRange | TensorMap:
        if isinstance(index, slice):
            return TensorMap(
                self._names[index],
                self._starts[index],
                self._ends[index],
                None if self._dtypes is None else self._dtypes[index],
                None if self._shapes is None else self._shapes[index],
            )
        if self._dtypes is None or self._shapes is None:
            return TensorRange(self._names[index], self._starts[index], self._ends[index])
        return TensorRange(
            self._names[index],
            self._starts[index],
            self._ends[index],
            self._dtypes[index],
            self._shapes[index],
        )

    def __iter__(self) -> Iterator[TensorRange]:
        if self._dtypes is None or self._shapes is None:
            return map(TensorRange, self._names, self._starts, self._ends)
        return map(TensorRange, self._names, self._starts, self._ends, self._dtypes, self._shapes)

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if isinstance(other, TensorMap):
            return (
                self._names == other._names
                and self._starts == other._starts
                and self._ends == other._ends
                and self._dtypes == other._dtypes
                and self._shapes == other._shapes
            )
        if isinstance(other, tuple | list):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.digest)

    def __bool__(self) -> bool:
        return bool(self._names)

    def __repr__(self) -> str:
        shown = ", ".join(self._names[:3]) + (", ..." if len(self) > 3 else "")
        return f"TensorMap({len(self)} tensors: {shown})"

    def to_list(self) -> list[list[Any]]:
        """``[[name, start, end, dtype, shape], ...]`` as the attestation writes it
        (``[name, start, end]`` for a map without layout)."""
        if self._dtypes is None or self._shapes is None:
            return [list(t) for t in zip(self._names, self._starts, self._ends, strict=True)]
        return [
            [n, s, e, d, list(sh)]
            for n, s, e, d, sh in zip(
                self._names, self._starts, self._ends, self._dtypes, self._shapes, strict=True
            )
        ]

    def overlapping(self, ranges: Sequence[tuple[int, int]]) -> list[str]:
        """Names of the tensors sharing a byte with any of ``ranges`` (shard order, once each)."""
        hits: set[int] = set()
        for a, b in ranges:
            if self._disjoint:
                i = bisect.bisect_right(self._ends, a)
                while i < len(self._names) and self._starts[i] < b:
                    if a < self._ends[i]:
                        hits.add(i)
                    i += 1
            else:
                hits.update(
                    i for i in range(len(self._names)) if self._starts[i] < b and a < self._ends[i]
                )
        return [self._names[i] for i in sorted(hits)]


_EMPTY_MAP = TensorMap((), (), ())


def _tensors(value: Iterable[TensorRange | Sequence[Any]] | TensorMap | None) -> TensorMap:
    if value is None or (isinstance(value, tuple | list) and not value):
        return _EMPTY_MAP
    return TensorMap.from_ranges(value)


def _hex64(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise InvalidInput(f"{attr.name} must be 64 lower-case hex digits, got {safe_repr(value)}")


def _optional_hex64(inst: object, attr: attrs.Attribute[str | None], value: str | None) -> None:
    if value is not None:
        _hex64(inst, attr, value)  # type: ignore[arg-type]


def _non_negative_int(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{attr.name} must be a non-negative integer, got {safe_repr(value)}")


def _positive_int(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidInput(f"{attr.name} must be a positive integer, got {safe_repr(value)}")


def _text(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
    clean_text(value, field=attr.name, limit=256)


def _aware(_inst: object, attr: attrs.Attribute[datetime], value: datetime) -> None:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise InvalidInput(f"{attr.name} must be a timezone-aware datetime")


def _bytes(_inst: object, attr: attrs.Attribute[bytes], value: bytes) -> None:
    if not isinstance(value, bytes):
        raise InvalidInput(f"{attr.name} must be bytes, got {type(value).__name__}")


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
    :attr tensors: tensor name → byte range (a :class:`TensorMap`), when sealed from a
        safetensors file; empty otherwise.
    :attr file_sha256: the whole-file SHA-256 checked while loading, when one was given.

    Every field is type-checked (:class:`~vramcore.errors.InvalidInput` otherwise), so the
    signed encoding cannot confuse ``gpu_device=0`` with ``"0"``.
    """

    shard_id: str = attrs.field(validator=lambda _i, _a, v: check_shard_id(v))
    gpu_device: int = attrs.field(validator=_non_negative_int)
    vram_bytes: int = attrs.field(validator=_positive_int)
    digest: str = attrs.field(validator=_hex64)
    digest_alg: str = attrs.field(default=DIGEST_ALG, validator=_text)
    leaf_size: int = attrs.field(validator=_positive_int)
    sealed_at: datetime = attrs.field(validator=_aware)
    signature: bytes = attrs.field(repr=False, validator=_bytes)
    tensors: TensorMap = attrs.field(default=_EMPTY_MAP, converter=_tensors)
    file_sha256: str | None = attrs.field(default=None, validator=_optional_hex64)

    @functools.cached_property
    def _signed_message(self) -> bytes:
        return canonical_seal_message(
            shard_id=self.shard_id,
            gpu_device=self.gpu_device,
            vram_bytes=self.vram_bytes,
            digest_alg=self.digest_alg,
            leaf_size=self.leaf_size,
            digest=self.digest,
            sealed_at=format_timestamp(self.sealed_at),
            tensors=self.tensors.digest,
            file_sha256=self.file_sha256 or "",
        )

    def signed_message(self) -> bytes:
        """The canonical bytes the signature covers (see :mod:`vramcore.seal`); computed once."""
        return self._signed_message

    def tensors_in(self, ranges: Sequence[tuple[int, int]]) -> list[str]:
        """Names of the tensors overlapping any of ``ranges`` (shard order, no repeats)."""
        return self.tensors.overlapping(ranges)

    def __str__(self) -> str:
        return (
            f"SealedShard {self.shard_id} on GPU {self.gpu_device}: {self.vram_bytes} bytes, "
            f"{self.digest_alg} {self.digest[:16]}..."
        )

    @property
    def attestation_version(self) -> int:
        """The version :meth:`to_json` writes: 2, or 1 for a shard read from a version-1
        attestation (its tensor map has no dtypes and shapes), so it round-trips unchanged."""
        if self.tensors and not self.tensors.has_layout:
            return 1
        return ATTESTATION_VERSION

    def to_dict(self, *, include_signature: bool = True) -> dict[str, Any]:
        """The attestation as plain JSON types."""
        return self._to_dict(include_signature, self.attestation_version)

    def _to_dict(self, include_signature: bool, version: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "attestation_version": version,
            "shard_id": self.shard_id,
            "gpu_device": self.gpu_device,
            "vram_bytes": self.vram_bytes,
            "digest": self.digest,
            "digest_alg": self.digest_alg,
            "leaf_size": self.leaf_size,
            "sealed_at": format_timestamp(self.sealed_at),
            "tensors": self.tensors.to_list(),
            "file_sha256": self.file_sha256,
        }
        if include_signature:
            out["signature"] = self.signature.hex()
        return out

    def to_json(self, *, include_signature: bool = True) -> str:
        """The attestation as compact JSON with sorted keys: its one canonical form."""
        return json.dumps(
            self.to_dict(include_signature=include_signature),
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> SealedShard:
        """Read an attestation written by :meth:`to_json` (with its signature).

        Only the canonical form is accepted: the attestation must be exactly what
        :meth:`to_json` writes for the shard it describes (same keys, types, order, spacing
        and timestamp format), so an attestation cannot be rewritten and still verify.

        :raises InvalidInput: malformed JSON, a missing, unknown or mistyped field, an unknown
            version, or any form other than the canonical one.
        """
        if isinstance(text, str):
            raw = text.encode("utf-8", "surrogatepass")
        elif isinstance(text, bytes | bytearray | memoryview):
            raw = bytes(text)
        else:
            raise InvalidInput(f"attestation must be str or bytes, got {type(text).__name__}")
        if len(raw) > MAX_ATTESTATION_BYTES:
            raise InvalidInput(
                f"attestation is {len(raw)} bytes, over the {MAX_ATTESTATION_BYTES}-byte limit"
            )
        try:
            data = json.loads(raw)
        except RecursionError:
            raise InvalidInput("attestation is not valid JSON: nested too deeply") from None
        except (ValueError, TypeError) as exc:
            raise InvalidInput(f"attestation is not valid JSON: {exc}") from None
        if not isinstance(data, Mapping):
            raise InvalidInput("attestation must be a JSON object")
        shard = cls._from_mapping(data)
        canonical = json.dumps(
            shard._to_dict(True, data["attestation_version"]),
            sort_keys=True,
            separators=(",", ":"),
        )
        if canonical.encode("utf-8") != raw:
            raise InvalidInput(
                "attestation is not in canonical form (compact JSON, sorted keys, as to_json() "
                "writes it); refusing a rewritten attestation"
            )
        return shard

    @classmethod
    def _from_mapping(cls, data: Mapping[str, Any]) -> SealedShard:
        version = data.get("attestation_version")
        if (
            isinstance(version, bool)
            or not isinstance(version, int)
            or version not in READABLE_ATTESTATION_VERSIONS
        ):
            raise InvalidInput(
                f"unsupported attestation_version {safe_repr(version)}; this vramcore reads "
                f"versions {', '.join(map(str, READABLE_ATTESTATION_VERSIONS))}"
            )
        unknown = sorted(str(k) for k in data if k not in _ATTESTATION_FIELDS)
        if unknown:
            raise InvalidInput(f"attestation has unknown field(s) {safe_repr(unknown)}")
        missing = sorted(_ATTESTATION_FIELDS - set(data))
        if missing:
            raise InvalidInput(f"attestation lacks field {missing[0]!r}")
        for key in ("gpu_device", "vram_bytes", "leaf_size"):
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidInput(f"attestation field {key!r} must be an integer")
        for key in ("shard_id", "digest", "digest_alg", "sealed_at"):
            if not isinstance(data[key], str):
                raise InvalidInput(f"attestation field {key!r} must be a string")
        signature_hex = data["signature"]
        if not isinstance(signature_hex, str) or not _HEX64.fullmatch(signature_hex):
            raise InvalidInput("attestation field 'signature' must be 64 hex digits")
        raw_tensors = data["tensors"]
        if not isinstance(raw_tensors, list):
            raise InvalidInput("attestation field 'tensors' must be a list")
        width, form = (3, "[name, start, end]") if version == 1 else (5, _V2_ITEM)
        for item in raw_tensors:
            if not isinstance(item, list) or len(item) != width:
                raise InvalidInput(f"attestation field 'tensors' must hold {form} items")
        file_sha256 = data["file_sha256"]
        if file_sha256 is not None and (
            not isinstance(file_sha256, str) or not _HEX64.fullmatch(file_sha256)
        ):
            raise InvalidInput("attestation field 'file_sha256' must be 64 hex digits or null")
        return cls(
            shard_id=data["shard_id"],
            gpu_device=data["gpu_device"],
            vram_bytes=data["vram_bytes"],
            digest=data["digest"],
            digest_alg=data["digest_alg"],
            leaf_size=data["leaf_size"],
            sealed_at=parse_timestamp(data["sealed_at"]),
            signature=bytes.fromhex(signature_hex),
            tensors=TensorMap.from_ranges(raw_tensors),
            file_sha256=file_sha256,
        )
