"""Secrets and signatures: the worker token, the seal key and the seal HMAC.

The worker token is the one secret an operator gives a worker. From it,
HKDF-SHA256 (RFC 5869, via ``cryptography``) derives independent keys, one per purpose, each
named by its own ``info`` string (:data:`SEAL_KEY_INFO` for seals; the audit chain uses its
own). A key never leaves its :class:`SecretKey` holder, which shows only a fingerprint and
wipes its buffer on :meth:`SecretKey.wipe`.

The seal signature is HMAC-SHA256 under the seal key over :func:`canonical_seal_message`:
a magic string and format version followed by every signed field, each length-prefixed, so
no two different field lists encode to the same bytes. Signatures are compared in constant
time.

Limits of a Python process, stated plainly: ``cryptography`` and ``hmac`` take a copy of the
key for the duration of a call, and CPython may leave freed copies in memory. Wiping the
long-lived buffer removes the key the process keeps; it is no defence against an attacker
who can read this process's memory while it runs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import sys
from array import array
from collections.abc import Iterable, Sequence
from typing import NoReturn

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vramcore.errors import InvalidInput

__all__ = [
    "MIN_TOKEN_BYTES",
    "SEAL_FORMAT_VERSION",
    "SEAL_KEY_INFO",
    "TOKEN_ADVICE",
    "SecretKey",
    "WorkerToken",
    "canonical_seal_message",
    "derive_key",
    "tensor_map_digest",
    "token_problem",
]

#: Version of the signed encoding; bumped on any change to :func:`canonical_seal_message`.
#: Version 2 tags every field with its type, so ``gpu_device="0"`` and ``0`` sign differently.
SEAL_FORMAT_VERSION = 2
#: HKDF ``info`` for the seal key. Other purposes must use other strings.
SEAL_KEY_INFO = b"vramcore/v1/seal-key"
#: HKDF salt: fixed and public (RFC 5869 allows it); domain-separates vramcore's derivations.
_HKDF_SALT = b"vramcore/v1/hkdf-salt"
#: A shorter token is refused: it could be guessed from a fingerprint or a signature.
MIN_TOKEN_BYTES = 16
#: How to make a good token; appended to every refusal.
TOKEN_ADVICE = (
    "make one with `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'` "  # noqa: S105
    "and keep it like any other service secret"
)
_MAGIC = b"vramcore-seal"
_WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")


def token_problem(raw: bytes | bytearray) -> str | None:
    """Why ``raw`` cannot be a worker token, or ``None`` when it can.

    Refuses what obviously holds no entropy: fewer than :data:`MIN_TOKEN_BYTES` bytes, only
    whitespace, or one character repeated (whitespace aside). This cannot prove a token is
    random; it catches placeholders and typos such as an unset variable padded with spaces.
    """
    if len(raw) < MIN_TOKEN_BYTES:
        return f"is too short ({len(raw)} bytes; at least {MIN_TOKEN_BYTES} random bytes)"
    meaningful = set(raw) - _WHITESPACE
    if not meaningful:
        return "is only whitespace"
    if len(meaningful) == 1:
        return "is one character repeated: it holds no secret"
    return None


def _fingerprint(material: bytes | bytearray, label: bytes) -> str:
    return hashlib.sha256(label + bytes(material)).hexdigest()[:12]


class WorkerToken:
    """The worker's secret token. Its repr, str and every message show a fingerprint only.

    :param token: at least :data:`MIN_TOKEN_BYTES` bytes (a ``str`` is UTF-8 encoded), not
        only whitespace, not one character repeated (see :func:`token_problem`).
    :param source: what the user called the token (``"VRAMCORE_WORKER_TOKEN"`` in the CLI),
        named in error messages.
    """

    __slots__ = ("_fingerprint", "_token")

    def __init__(self, token: str | bytes | bytearray, *, source: str = "worker_token") -> None:
        if isinstance(token, str):
            raw = bytearray(token.encode("utf-8", "surrogatepass"))
        elif isinstance(token, bytes | bytearray):
            raw = bytearray(token)
        else:
            raise InvalidInput(
                f"{source} must be str or bytes, got {type(token).__name__}; {TOKEN_ADVICE}"
            )
        problem = token_problem(raw)
        if problem is not None:
            raw[:] = bytes(len(raw))
            raise InvalidInput(f"{source} {problem}; {TOKEN_ADVICE}")
        self._token = raw
        self._fingerprint = _fingerprint(raw, b"vramcore/v1/token-fingerprint\x00")

    @property
    def fingerprint(self) -> str:
        """A short, stable, non-reversible identifier of the token (12 hex digits)."""
        return self._fingerprint

    def derive(self, info: bytes, length: int = 32) -> SecretKey:
        """Derive an independent key for the purpose named by ``info`` (HKDF-SHA256)."""
        if not self._token:
            raise InvalidInput("worker token was wiped; create a new manager")
        return derive_key(self._token, info, length)

    def wipe(self) -> None:
        """Overwrite the token in memory; :meth:`derive` fails afterwards."""
        self._token[:] = bytes(len(self._token))
        self._token = bytearray()

    def __repr__(self) -> str:
        return f"<WorkerToken fingerprint={self._fingerprint}>"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("a WorkerToken cannot be pickled")


def derive_key(material: bytes | bytearray, info: bytes, length: int = 32) -> SecretKey:
    """HKDF-SHA256 over ``material`` with vramcore's salt and the given ``info``."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=length, salt=_HKDF_SALT, info=info)
    return SecretKey(bytearray(hkdf.derive(bytes(material))), label=info)


class SecretKey:
    """A symmetric key in a wipeable buffer. Never shown: repr gives a fingerprint.

    :param key: the key bytes; the buffer is taken over, not copied.
    :param label: what the key is for (shown in repr).
    """

    __slots__ = ("_fingerprint", "_key", "label")

    def __init__(self, key: bytearray, *, label: bytes = b"") -> None:
        if not key:
            raise InvalidInput("a key must not be empty")
        self._key = key
        self.label = label
        self._fingerprint = _fingerprint(key, b"vramcore/v1/key-fingerprint\x00")

    @property
    def fingerprint(self) -> str:
        """A short, non-reversible identifier of the key (12 hex digits)."""
        return self._fingerprint

    @property
    def wiped(self) -> bool:
        """Whether :meth:`wipe` has run."""
        return not self._key

    def _require(self) -> bytearray:
        if not self._key:
            raise InvalidInput("the key was wiped (manager closed); create a new manager")
        return self._key

    def mac(self, message: bytes | bytearray | memoryview) -> bytes:
        """HMAC-SHA256 of ``message`` under this key."""
        return hmac.new(self._require(), message, hashlib.sha256).digest()

    def mac_matches(self, message: bytes | bytearray | memoryview, tag: bytes) -> bool:
        """Check ``tag`` against the HMAC of ``message`` in constant time."""
        return hmac.compare_digest(self.mac(message), tag)

    def derive(self, info: bytes, length: int = 32) -> SecretKey:
        """Derive a further key from this one (used for one-way key evolution)."""
        return derive_key(self._require(), info, length)

    def export(self) -> bytes:
        """Return the raw key bytes. Only for handing a key to an auditor at setup."""
        return bytes(self._require())

    def wipe(self) -> None:
        """Overwrite the key with zeros and forget it."""
        self._key[:] = bytes(len(self._key))
        self._key = bytearray()

    def __repr__(self) -> str:
        state = "wiped" if self.wiped else f"fingerprint={self._fingerprint}"
        return f"<SecretKey {self.label.decode('ascii', 'replace')} {state}>"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("a SecretKey cannot be pickled")


def _field(value: str | int | bytes) -> bytes:
    """One item: a type tag (``i`` integer, ``s`` text, ``b`` bytes), a length, the value."""
    if isinstance(value, bool):
        raise TypeError("booleans are not seal fields")
    if isinstance(value, int):
        tag, raw = b"i", str(value).encode("ascii")
    elif isinstance(value, str):
        tag, raw = b"s", value.encode("utf-8")
    elif isinstance(value, bytes):
        tag, raw = b"b", value
    else:
        raise TypeError(f"a seal field must be int, str or bytes, not {type(value).__name__}")
    return tag + struct.pack(">I", len(raw)) + raw


def canonical_seal_message(
    *,
    shard_id: str,
    gpu_device: int,
    vram_bytes: int,
    digest_alg: str,
    leaf_size: int,
    digest: str,
    sealed_at: str,
    tensors: Sequence[tuple[str, int, int]] | bytes = (),
    file_sha256: str = "",
) -> bytes:
    """The exact bytes the seal HMAC covers.

    ``magic ‖ version ‖ field...`` with every item as a one-byte type tag (``i``, ``s``,
    ``b``), a 4-byte big-endian length and its value (integers in decimal ASCII, text in
    UTF-8), so no two different field lists, and no two field types, encode to the same bytes.
    The tensor map is covered through its :func:`tensor_map_digest` (pass the digest itself
    as ``bytes`` when it is already known), so a tampered map cannot misname a tensor. The file
    SHA-256 checked while loading (``""`` when none) is covered too, so an attestation cannot
    claim another file.
    """
    map_digest = tensors if isinstance(tensors, bytes) else tensor_map_digest(tensors)
    parts: Iterable[str | int | bytes] = (
        _MAGIC,
        SEAL_FORMAT_VERSION,
        shard_id,
        gpu_device,
        vram_bytes,
        digest_alg,
        leaf_size,
        digest,
        sealed_at,
        map_digest,
        file_sha256,
    )
    return b"".join(_field(p) for p in parts)


def tensor_map_digest(
    tensors: Sequence[tuple[str, int, int]],
    *,
    names: Sequence[str] | None = None,
    starts: Sequence[int] | None = None,
    ends: Sequence[int] | None = None,
    dtypes: Sequence[str] | None = None,
    shapes: Sequence[Sequence[int]] | None = None,
) -> bytes:
    """SHA-256 of a tensor map: the count, the names, the starts, the ends, each a field.

    Names are one JSON array (ASCII-escaped, compact: one byte string per map, encoded in C),
    starts and ends unsigned 64-bit big-endian integers. A caller holding the columns already
    (:class:`vramcore.shard.TensorMap`) passes them as ``names``/``starts``/``ends`` so a map
    of a million tensors digests in milliseconds. When the map records each tensor's dtype
    and shape (``dtypes``/``shapes``, given together), two more fields follow: the dtypes and
    the shapes, each one compact JSON array; a map without them digests as before, so seals
    made before dtypes were recorded still verify.
    """
    if names is None or starts is None or ends is None:
        names = [t[0] for t in tensors]
        starts = [t[1] for t in tensors]
        ends = [t[2] for t in tensors]
    h = hashlib.sha256()
    h.update(_field(len(names)))
    h.update(_field(json.dumps(list(names), ensure_ascii=True, separators=(",", ":")).encode()))
    for column in (starts, ends):
        packed = array("Q", column)
        if sys.byteorder == "little":
            packed.byteswap()
        h.update(_field(packed.tobytes()))
    if dtypes is not None or shapes is not None:
        if dtypes is None or shapes is None:
            raise ValueError("dtypes and shapes are digested together")
        for layout in (list(dtypes), [list(s) for s in shapes]):
            h.update(_field(json.dumps(layout, ensure_ascii=True, separators=(",", ":")).encode()))
    return h.digest()
