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
import math
import struct
import sys
from array import array
from collections.abc import Iterable, Sequence
from typing import NoReturn

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vramcore.errors import InvalidInput

__all__ = [
    "MIN_TOKEN_BITS",
    "MIN_TOKEN_BYTES",
    "MODEL_FORMAT_VERSION",
    "MODEL_KEY_INFO",
    "SEAL_FORMAT_VERSION",
    "SEAL_KEY_INFO",
    "TOKEN_ADVICE",
    "SecretKey",
    "SecretValue",
    "WorkerToken",
    "canonical_model_message",
    "canonical_seal_message",
    "derive_key",
    "tensor_map_digest",
    "token_problem",
    "token_strength_bits",
]

#: Version of the signed encoding; bumped on any change to :func:`canonical_seal_message`.
#: Version 2 tags every field with its type, so ``gpu_device="0"`` and ``0`` sign differently.
SEAL_FORMAT_VERSION = 2
#: HKDF ``info`` for the seal key. Other purposes must use other strings.
SEAL_KEY_INFO = b"vramcore/v1/seal-key"
#: HKDF ``info`` of the key that signs a model directory's attestation, derived from the seal
#: key (:meth:`SecretKey.derive`), so a model attestation and a shard seal never share a key.
MODEL_KEY_INFO = b"vramcore/v1/model-attestation-key"
#: Version of the signed encoding of a model attestation (:func:`canonical_model_message`).
MODEL_FORMAT_VERSION = 1
#: HKDF salt: fixed and public (RFC 5869 allows it); domain-separates vramcore's derivations.
_HKDF_SALT = b"vramcore/v1/hkdf-salt"
#: A shorter token is refused: it could be guessed from a fingerprint or a signature.
MIN_TOKEN_BYTES = 16
#: A token whose estimated strength (:func:`token_strength_bits`) is lower is refused.
MIN_TOKEN_BITS = 128
#: How to make a good token; appended to every refusal.
TOKEN_ADVICE = (
    "make one with `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'` "  # noqa: S105
    "(256 random bits) and keep it like any other service secret"
)
_MAGIC = b"vramcore-seal"
_MODEL_MAGIC = b"vramcore-model"
_WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")
#: What a guesser tries first: words and fragments people put in tokens. A token made of
#: these (in any case) is priced as a few dictionary picks, not as random characters.
_COMMON_WORDS_TEXT = """
    password passwd secret token worker vramcore test testing demo example sample default
    admin root user guest login changeme letmein welcome qwerty asdf zxcv abc abcd iloveyou
    dragon monkey master shadow sunshine princess football baseball hello world prod
    production staging dev develop development local key api private public service server
    cluster node model weights gpu cuda nvidia seal audit chain change this that with your
    here please replace insert random value correct horse battery staple do not never print
    copy paste my our the and for from
"""
_COMMON_WORDS = frozenset(_COMMON_WORDS_TEXT.split())
_LONGEST_WORD = max(len(word) for word in _COMMON_WORDS)
#: Bits charged for a stretch of letters of one case: the log2 of a generous dictionary.
_WORD_BITS = 16.0
#: Only this many leading bytes are estimated (enough for any real token; bounds the cost).
_ESTIMATE_BYTES = 256
#: Bits charged for a common word, a repeat of earlier text or a run ("abcd", "1234").
_PATTERN_BITS = 8.0


def _pool_bits(raw: bytes) -> float:
    """log2 of the alphabet ``raw`` seems drawn from (lower, upper, digits, symbols, bytes)."""
    if any(b >= 0x7F or b < 0x20 for b in raw):
        return 8.0
    pool = 0
    if any(0x61 <= b <= 0x7A for b in raw):
        pool += 26
    if any(0x41 <= b <= 0x5A for b in raw):
        pool += 26
    if any(0x30 <= b <= 0x39 for b in raw):
        pool += 10
    if any(not chr(b).isalnum() for b in raw):
        pool += 33
    return math.log2(max(pool, 2))


def _run_length(raw: bytes, i: int) -> int:
    """Length of the arithmetic run (step -1, 0 or 1: "aaa", "abc", "321") starting at ``i``."""
    if i + 2 >= len(raw):
        return 0
    step = raw[i + 1] - raw[i]
    if step not in (-1, 0, 1):
        return 0
    j = i + 1
    while j < len(raw) and raw[j] - raw[j - 1] == step:
        j += 1
    return j - i if j - i >= 3 else 0


def _repeat_length(raw: bytes, i: int) -> int:
    """Length of the longest earlier text (at least 3 bytes) that repeats at ``i``."""
    best = 0
    start = raw.find(raw[i : i + 3], 0, i + 2)
    while 0 <= start < i:
        n = 3
        while i + n < len(raw) and raw[start + n] == raw[i + n]:
            n += 1
        best = max(best, n)
        start = raw.find(raw[i : i + 3], start + 1, i + 2)
    return best if i + 3 <= len(raw) else 0


def _word_length(raw: bytes, i: int) -> int:
    """Length of a common word (any case) starting at ``i``, the longest one."""
    text = raw[i : i + _LONGEST_WORD].decode("ascii", "replace").lower()
    return max((n for n in range(3, len(text) + 1) if text[:n] in _COMMON_WORDS), default=0)


def token_strength_bits(raw: bytes | bytearray) -> float:
    """A conservative estimate of how many bits of guessing ``raw`` takes.

    Read left to right, each character costs the log2 of the alphabet the token draws from
    (lower case, upper case, digits, symbols: about 6 bits for ``secrets.token_urlsafe``),
    except what a guesser tries first, priced as one pick each: a common word (``password``,
    ``token``...: :data:`_PATTERN_BITS`), a repeat of earlier text (``abab...``) or a run
    (``abcd``, ``1234``, ``aaaa``) (:data:`_PATTERN_BITS`), a stretch of 3 or more letters of
    one case (one word of a large dictionary: at most :data:`_WORD_BITS`), and a separator
    used before (1 bit). Random tokens lose a few bits to chance patterns; tokens made by
    people lose most of theirs.
    """
    data = bytes(raw[:_ESTIMATE_BYTES])
    per_char = _pool_bits(data)
    text = per_char < 8.0  # printable: words, letter stretches and separators apply
    bits = 0.0
    separators: set[int] = set()
    i = 0
    while i < len(data):
        pattern = max(_run_length(data, i), _repeat_length(data, i))
        word = _word_length(data, i) if text else 0
        letters = _letters_length(data, i) if text else 0
        if word >= 3 and word >= pattern:
            bits += min(_PATTERN_BITS, per_char * word)
            i += word
        elif pattern:
            bits += min(_PATTERN_BITS, per_char * pattern)
            i += pattern
        elif letters >= 3:
            bits += min(_WORD_BITS, per_char * letters)
            i += letters
        elif text and not chr(data[i]).isalnum() and data[i] in separators:
            bits += 1.0
            i += 1
        else:
            if text and not chr(data[i]).isalnum():
                separators.add(data[i])
            bits += per_char
            i += 1
    return bits


def _letters_length(raw: bytes, i: int) -> int:
    """Length of the stretch of ASCII letters of one case (or one capital, then lower case)
    starting at ``i``, at most 12: what a dictionary word looks like."""
    j = i
    while j < len(raw) and j - i < 12 and 0x61 <= (raw[j] | 0x20) <= 0x7A:
        j += 1
    text = raw[i:j].decode("ascii", "replace")
    while text and not (text.islower() or text.isupper() or text.istitle()):
        text = text[:-1]
    return len(text)


def token_problem(raw: bytes | bytearray) -> str | None:
    """Why ``raw`` cannot be a worker token, or ``None`` when it can.

    Refuses fewer than :data:`MIN_TOKEN_BYTES` bytes, only whitespace, one character
    repeated, and anything whose estimated strength (:func:`token_strength_bits`) is under
    :data:`MIN_TOKEN_BITS`: patterns (``abab...``, ``0123...``), common words, names. This
    cannot prove a token random; it refuses what a guesser would find.
    """
    if len(raw) < MIN_TOKEN_BYTES:
        return f"is too short ({len(raw)} bytes; at least {MIN_TOKEN_BYTES} random bytes)"
    meaningful = set(raw) - _WHITESPACE
    if not meaningful:
        return "is only whitespace"
    if len(meaningful) == 1:
        return "is one character repeated: it holds no secret"
    bits = token_strength_bits(raw)
    if bits < MIN_TOKEN_BITS:
        return (
            f"is too easy to guess (about {int(bits)} bits by a pattern and dictionary "
            f"estimate; at least {MIN_TOKEN_BITS} needed)"
        )
    return None


class SecretValue:
    """A secret as read (a token from the environment or a file), before it is checked.

    Wrap a secret the moment it is read, so that nothing (a repr, a traceback that captures
    local variables, as error reporters do) ever shows it; :class:`WorkerToken` takes it.
    Wrapping never fails, whatever the value.
    """

    __slots__ = ("_value",)

    def __init__(self, value: object) -> None:
        self._value = value

    def __repr__(self) -> str:
        return "<SecretValue hidden>"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("a SecretValue cannot be pickled")


def _fingerprint(material: bytes | bytearray, label: bytes) -> str:
    return hashlib.sha256(label + bytes(material)).hexdigest()[:12]


class WorkerToken:
    """The worker's secret token. Its repr, str and every message show a fingerprint only.

    :param token: at least :data:`MIN_TOKEN_BYTES` bytes (a ``str`` is UTF-8 encoded) with an
        estimated strength of :data:`MIN_TOKEN_BITS` bits (see :func:`token_problem`),
        preferably wrapped in a :class:`SecretValue` as soon as it is read.
    :param source: what the user called the token (``"VRAMCORE_WORKER_TOKEN"`` in the CLI),
        named in error messages.
    """

    __slots__ = ("_fingerprint", "_token")

    def __init__(
        self, token: str | bytes | bytearray | SecretValue, *, source: str = "worker_token"
    ) -> None:
        if not isinstance(token, SecretValue):
            token = SecretValue(token)
        raw = _token_bytes(token)
        if raw is None:
            raise InvalidInput(
                f"{source} must be str or bytes, got {type(token._value).__name__}; {TOKEN_ADVICE}"
            )
        problem = token_problem(raw)
        if problem is not None:
            raw[:] = bytes(len(raw))
            raise InvalidInput(f"{source} {problem}; {TOKEN_ADVICE}")
        self._token = raw
        self._fingerprint = _fingerprint(raw, b"vramcore/v1/token-fingerprint\x00")

    @classmethod
    def adopt(cls, secret: SecretValue, *, source: str = "worker_token") -> WorkerToken:
        """The :class:`WorkerToken` ``secret`` holds, or a new one made from what it holds."""
        if isinstance(secret._value, WorkerToken):  # no local holds the raw value
            return secret._value
        return cls(secret, source=source)

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
        # getattr: a traceback that captures locals shows a token whose __init__ refused it.
        return f"<WorkerToken fingerprint={getattr(self, '_fingerprint', 'none')}>"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("a WorkerToken cannot be pickled")


def _token_bytes(secret: SecretValue) -> bytearray | None:
    value = secret._value
    if isinstance(value, str):
        return bytearray(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, bytes | bytearray):
        return bytearray(value)
    return None


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


def canonical_model_message(
    *,
    model: str,
    index: str | None,
    publisher: Sequence[str] | None,
    shards: Sequence[tuple[str, bytes]],
) -> bytes:
    """The exact bytes a model attestation's HMAC covers (under the :data:`MODEL_KEY_INFO` key).

    ``magic ‖ version ‖ model ‖ index? ‖ publisher? ‖ count ‖ (file ‖ shard)...`` in the
    tagged, length-prefixed items of :func:`canonical_seal_message`; an absent index or
    publisher is a ``0`` flag, a present one a ``1`` flag before its fields (the publisher's:
    key fingerprint, manifest digest, model name). Each shard is its file name and the SHA-256
    of its own signed seal message, so the list, the order, the files and every field of every
    shard's seal are covered.
    """
    parts: list[str | int | bytes] = [_MODEL_MAGIC, MODEL_FORMAT_VERSION, model]
    parts += [0] if index is None else [1, index]
    parts += [0] if publisher is None else [1, *publisher]
    parts.append(len(shards))
    for file, seal_digest in shards:
        parts += [file, seal_digest]
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
