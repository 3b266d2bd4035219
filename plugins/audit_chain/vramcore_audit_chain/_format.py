"""The on-disk format: one source of truth for every constant, and the line codec.

FORMAT.md (next to this package) is the normative description; this module implements it.
A record line is::

    {"seq":N,"epoch":E,"prev":"<64 hex>","type":"<type>","data":{...}}   <- the MACed body
    {"seq":N,"epoch":E,"prev":"<64 hex>","type":"<type>","data":{...},"mac":"<64 hex>"}\\n

The MAC is HMAC-SHA256 under the epoch key over the exact body bytes; the line is the body
with its final ``}`` replaced by ``,"mac":"<hex>"}`` and a newline.
"""

from __future__ import annotations

import _hashlib
import errno
import hashlib
import hmac
import json
import os
import re
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from vramcore import _heads
from vramcore.errors import ConfigError
from vramcore.seal import derive_key
from vramcore.validation import MAX_JSON_DEPTH, json_depth_ok

__all__ = [
    "CHAIN_KEY_PURPOSE",
    "CHECKPOINT_DATA_FIELDS",
    "CHECKPOINT_SIGNING_PURPOSE",
    "EVOLVE_INFO",
    "FORMAT",
    "GENESIS_PREV",
    "HEAD_FORMAT",
    "INITIAL_KEY_INFO",
    "KEY_SCOPE",
    "MAX_LINE",
    "STATE_KEY_PURPOSE",
    "ParsedLine",
    "build_checkpoint",
    "build_line",
    "canonical_json",
    "checkpoint_data",
    "checkpoint_mac_body",
    "checkpoint_message",
    "evolve_key",
    "iter_lines",
    "key_id",
    "loads_bounded",
    "log_files",
    "mac_context",
    "open_regular",
    "parse_line",
    "read_bounded",
    "record_at",
    "record_mac_body",
    "utc_now_text",
]

#: Format tag written into the genesis record.
FORMAT = "vramcore-audit-chain/2"
#: HKDF info of the token-derived base of the chain key (never the seal key's info).
#: The identity the manager derives this plugin's keys from (distribution:entry-point): the
#: CLI re-derives the checkpoint signing key under it (``vramcore audit public-key``).
KEY_SCOPE = "vramcore-audit-chain:audit_chain"
CHAIN_KEY_PURPOSE = "audit_chain/chain-key"
#: HKDF info that turns base key + setup nonce into the epoch-0 key.
INITIAL_KEY_INFO = b"vramcore/v1/audit-chain/epoch-0"
#: HKDF info of the one-way evolution K(e+1) = HKDF(K(e), EVOLVE_INFO).
EVOLVE_INFO = b"vramcore/v1/audit-chain/evolve"
#: HKDF info of the 32-byte Ed25519 seed that signs checkpoints.
CHECKPOINT_SIGNING_PURPOSE = "audit_chain/checkpoint-signing-key"
#: HKDF info of the AES-256-GCM key that encrypts the writer's state file.
STATE_KEY_PURPOSE = "audit_chain/state-key"
#: Domain separation prefix of the Ed25519 checkpoint signature.
CHECKPOINT_SIG_PREFIX = b"vramcore-audit-checkpoint/2\n"
#: Format tag of a head (defined once in the core, :mod:`vramcore._heads`).
HEAD_FORMAT = _heads.HEAD_FORMAT
#: Domain separation prefix of the public key id.
KEY_ID_PREFIX = b"vramcore-audit-chain/key-id\n"
#: The ``prev`` of the genesis record.
GENESIS_PREV = "0" * 64

#: Record types.
GENESIS = "genesis"
EVENT = "event"
CHECKPOINT = "checkpoint"
OPEN = "open"
RECOVERY = "recovery"
RECORD_TYPES = frozenset({GENESIS, EVENT, CHECKPOINT, OPEN, RECOVERY})
#: Why a checkpoint was written.
CHECKPOINT_REASONS = frozenset({"periodic", "rotate", "close"})

#: File names inside the log directory.
LOG_PATTERN = re.compile(r"audit-(\d{8})\.ndjson")
LOCK_NAME = "chain.lock"
STATE_NAME = "chain.state"
PUBLIC_KEY_NAME = "checkpoint.pub"
INITIAL_KEY_NAME = "auditor-initial.key"

#: The longest record line a reader accepts (a record is a few hundred bytes; events'
#: strings are length-capped). Longer lines are ``malformed``, and memory stays bounded.
MAX_LINE = 1 << 20
#: Checkpoint ``data`` members, in canonical order, besides ``sig``.
CHECKPOINT_DATA_FIELDS = ("head", "log_id", "reason", "records", "segment", "ts")

_hmac_new: Callable[..., Any] = getattr(_hashlib, "hmac_new", hmac.new)
_MAC_SUFFIX_LEN = 75  # '},"mac":"' (9) + 64 hex + '"}' (2)
_HEADER = re.compile(
    rb'\{"seq":(0|[1-9][0-9]{0,18}),"epoch":(0|[1-9][0-9]{0,18}),'
    rb'"prev":"([0-9a-f]{64})","type":"([a-z]{1,32})","data":\{'
)


def log_file_name(index: int) -> str:
    """The name of the ``index``-th log file (1-based)."""
    return f"audit-{index:08d}.ndjson"


def log_files(directory: Path) -> list[tuple[int, Path]]:
    """The log files of ``directory`` as ``(index, path)``, in index order.

    Every name that looks like a log file counts, whatever it is: a reader that opens one
    that is not a regular file (a symlink to a device, a FIFO) refuses it (:func:`open_regular`)
    rather than skipping it silently.
    """
    found: list[tuple[int, Path]] = []
    try:
        names = list(directory.iterdir())
    except OSError as exc:
        raise ConfigError(
            f"cannot list the audit log directory {directory}: "
            f"{exc.strerror or type(exc).__name__}; give the auditor read access to it"
        ) from None
    for path in names:
        m = LOG_PATTERN.fullmatch(path.name)
        if m is not None:
            found.append((int(m.group(1)), path))
    return sorted(found)


def open_regular(path: Path) -> Any:
    """Open ``path`` for reading in binary mode, refusing anything but a regular file.

    Opened non-blocking (a FIFO cannot hang the reader) and checked with ``fstat`` after the
    open, so a symlink swapped between a check and the open cannot slip a device in.

    :raises ConfigError: missing, unreadable, or not a regular file (the message says which).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        hint = "; give the auditor read access to it" if exc.errno == errno.EACCES else ""
        raise ConfigError(
            f"cannot read {path}: {exc.strerror or type(exc).__name__}{hint}"
        ) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{path} is not a regular file (a device, FIFO or directory?)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def iter_lines(path: Path, chunk: int = 4 << 20) -> Iterator[bytes]:
    """The lines of a file (without newlines), streamed in bounded memory; a line longer than
    :data:`MAX_LINE` ends the stream (no record is that long)."""
    with open_regular(path) as f:
        carry = b""
        while data := f.read(chunk):
            parts = (carry + data).split(b"\n")
            carry = parts.pop()
            if len(carry) > MAX_LINE:
                return
            yield from parts
        if carry:
            yield carry


def record_at(paths: list[Path], seq: int) -> ParsedLine | None:
    """The well-formed record with sequence number ``seq`` in ``paths``, if any (a scan)."""
    for path in paths:
        for line in iter_lines(path):
            m = _HEADER.match(line)
            if m is not None and int(m.group(1)) == seq:
                return parse_line(line)
    return None


def read_bounded(path: Path, limit: int) -> bytes:
    """The whole content of a small regular file; refuses one larger than ``limit`` bytes.

    :raises ConfigError: see :func:`open_regular`, or the file is too large.
    """
    with open_regular(path) as f:
        data: bytes = f.read(limit + 1)
    if len(data) > limit:
        raise ConfigError(f"{path} is larger than {limit} bytes: not the file expected here")
    return data


def loads_bounded(text: bytes | str) -> Any:
    """``json.loads`` for input the plugin did not write: depth-limited first.

    :raises ValueError: not JSON, or nested deeper than :data:`MAX_JSON_DEPTH`.
    """
    if not json_depth_ok(text):
        raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except RecursionError:  # pragma: no cover - the depth check above comes first
        raise ValueError("JSON nested too deeply") from None


def canonical_json(value: Mapping[str, Any]) -> str:
    """Sorted keys, no whitespace, ASCII only (``\\uXXXX`` escapes)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def build_body(seq: int, epoch: int, prev: str, rtype: str, data: str) -> bytes:
    """The MACed body of a record; ``data`` is already canonical JSON of an object."""
    return (
        f'{{"seq":{seq},"epoch":{epoch},"prev":"{prev}","type":"{rtype}","data":{data}}}'
    ).encode("ascii")


def mac_context(key: bytes | bytearray) -> Any:
    """An HMAC-SHA256 context keyed with ``key``; ``.copy()`` it per message.

    Copying a keyed context skips the two key blocks a one-shot HMAC hashes every time (about
    40% faster on records this size). OpenSSL wipes the context when it is freed.
    """
    return _hmac_new(bytes(key), digestmod="sha256")


def build_line(body: bytes, key: bytes | bytearray) -> tuple[bytes, str]:
    """Seal ``body`` under ``key``: return the line (with newline) and the MAC in hex."""
    mac = hmac.digest(key, body, "sha256").hex()
    return body[:-1] + b',"mac":"' + mac.encode("ascii") + b'"}\n', mac


@attrs.frozen
class ParsedLine:
    """The header of one record line (the data object is left unparsed).

    :attr body: the exact MACed bytes.
    :attr mac: the MAC as written (64 lowercase hex digits).
    """

    seq: int
    epoch: int
    prev: str
    type: str
    body: bytes
    mac: bytes

    def data(self) -> dict[str, Any]:
        """Parse the data object (only call this on a record whose frame parsed)."""
        value = json.loads(self.body)["data"]
        if not isinstance(value, dict):
            raise ValueError("data is not an object")
        return value


def parse_line(line: bytes) -> ParsedLine | None:
    """Split a line (without its newline) into header, body and MAC; ``None`` if malformed."""
    if len(line) < 140 or line[-_MAC_SUFFIX_LEN:-66] != b'},"mac":"' or line[-2:] != b'"}':
        return None
    m = _HEADER.match(line)
    if m is None:
        return None
    mac = line[-66:-2]
    if mac.strip(b"0123456789abcdef"):
        return None
    return ParsedLine(
        int(m.group(1)),
        int(m.group(2)),
        m.group(3).decode("ascii"),
        m.group(4).decode("ascii"),
        line[:-74] + b"}",
        mac,
    )


def header_match(line: bytes) -> re.Match[bytes] | None:
    """Match the fixed record header at the start of ``line`` (cheap, no MAC check)."""
    return _HEADER.match(line)


def evolve_key(key: bytes | bytearray) -> bytearray:
    """The next epoch's key: ``HKDF-SHA256(K, info=EVOLVE_INFO)``; one-way."""
    derived = derive_key(key, EVOLVE_INFO)
    out = bytearray(derived.export())
    derived.wipe()
    return out


def initial_key(base: bytes | bytearray, nonce: bytes) -> bytearray:
    """The epoch-0 key: HKDF over the token-derived base key and the setup nonce."""
    derived = derive_key(bytes(base) + nonce, INITIAL_KEY_INFO)
    out = bytearray(derived.export())
    derived.wipe()
    return out


def key_id(key: bytes | bytearray) -> str:
    """A public identifier of an initial key (SHA-256 over a prefix and the key, 16 hex)."""
    return hashlib.sha256(KEY_ID_PREFIX + bytes(key)).hexdigest()[:16]


def checkpoint_message(fields: Mapping[str, Any]) -> bytes:
    """The bytes an Ed25519 checkpoint signature covers."""
    return CHECKPOINT_SIG_PREFIX + canonical_json(fields).encode("ascii")


SIGNED_CHECKPOINT_FIELDS = (
    "epoch", "head", "log_id", "mac", "reason", "records", "segment", "seq", "ts"
)  # fmt: skip


def checkpoint_mac_body(seq: int, epoch: int, prev: str, data: Mapping[str, Any]) -> bytes:
    """What a checkpoint's MAC covers: its body with ``sig`` left out of ``data``.

    The signature then covers the MAC (``checkpoint_message`` includes ``mac``), so a
    verifier holding only the public key authenticates every byte of a checkpoint line,
    the last one of the log included.
    """
    unsigned = {k: v for k, v in data.items() if k != "sig"}
    return build_body(seq, epoch, prev, CHECKPOINT, canonical_json(unsigned))


def build_checkpoint(
    seq: int,
    epoch: int,
    prev: str,
    data: Mapping[str, Any],
    key: bytes | bytearray,
    sign: Callable[[bytes], bytes],
) -> tuple[bytes, str]:
    """Seal a checkpoint: MAC over the unsigned body, then sign the fields and the MAC.

    :param data: the checkpoint's ``data`` members (:data:`CHECKPOINT_DATA_FIELDS`).
    :param sign: the Ed25519 signing function (``private_key.sign``).
    :return: the line (with newline) and the MAC in hex.
    """
    mac = hmac.digest(key, checkpoint_mac_body(seq, epoch, prev, data), "sha256").hex()
    fields = {**{k: data[k] for k in CHECKPOINT_DATA_FIELDS}, "epoch": epoch, "seq": seq}
    fields["mac"] = mac
    signed = {**data, "sig": sign(checkpoint_message(fields)).hex()}
    body = build_body(seq, epoch, prev, CHECKPOINT, canonical_json(signed))
    return body[:-1] + b',"mac":"' + mac.encode("ascii") + b'"}\n', mac


def checkpoint_data(body: bytes) -> dict[str, Any] | None:
    """A checkpoint's ``data``, only if it is exactly in the form the writer produces.

    Exactly the members :data:`CHECKPOINT_DATA_FIELDS` and ``sig``, each of its type, ``sig``
    128 lowercase hex digits, serialised canonically: so no byte of the line can change
    without changing what the signature or the MAC covers. ``None`` otherwise.
    """
    start = body.find(b',"data":{')
    if start < 0:
        return None
    raw = body[start + 8 : -1]
    if len(raw) > 4096:
        return None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or set(data) != {*CHECKPOINT_DATA_FIELDS, "sig"}:
        return None
    for name in ("head", "log_id", "reason", "segment", "sig", "ts"):
        if type(data[name]) is not str:
            return None
    if type(data["records"]) is not int:
        return None
    if not _is_lower_hex(data["sig"], 128) or canonical_json(data).encode("ascii") != raw:
        return None
    return data


def record_mac_body(rec: ParsedLine) -> bytes | None:
    """The bytes ``rec``'s MAC covers (``None``: a checkpoint whose data is malformed)."""
    if rec.type != CHECKPOINT:
        return rec.body
    data = checkpoint_data(rec.body)
    if data is None:
        return None
    return checkpoint_mac_body(rec.seq, rec.epoch, rec.prev, data)


def _is_lower_hex(text: str, length: int) -> bool:
    return len(text) == length and not text.strip("0123456789abcdef")


def utc_now_text() -> str:
    """The current UTC time as ``YYYY-MM-DDTHH:MM:SS.ffffffZ``."""
    t = time.time()
    sec = int(t)
    micros = int((t - sec) * 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{micros:06d}Z"
