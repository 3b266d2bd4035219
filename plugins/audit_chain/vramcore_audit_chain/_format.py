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
import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from vramcore.seal import derive_key

__all__ = [
    "CHAIN_KEY_PURPOSE",
    "CHECKPOINT_SIGNING_PURPOSE",
    "EVOLVE_INFO",
    "FORMAT",
    "GENESIS_PREV",
    "INITIAL_KEY_INFO",
    "STATE_KEY_PURPOSE",
    "ParsedLine",
    "build_line",
    "canonical_json",
    "checkpoint_message",
    "evolve_key",
    "key_id",
    "log_files",
    "mac_context",
    "parse_line",
    "utc_now_text",
]

#: Format tag written into the genesis record.
FORMAT = "vramcore-audit-chain/1"
#: HKDF info of the token-derived base of the chain key (never the seal key's info).
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
CHECKPOINT_SIG_PREFIX = b"vramcore-audit-checkpoint/1\n"
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
    """The log files of ``directory`` as ``(index, path)``, in index order."""
    found: list[tuple[int, Path]] = []
    for path in directory.iterdir():
        m = LOG_PATTERN.fullmatch(path.name)
        if m is not None and path.is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


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


SIGNED_CHECKPOINT_FIELDS = ("epoch", "head", "log_id", "reason", "records", "segment", "seq", "ts")


def utc_now_text() -> str:
    """The current UTC time as ``YYYY-MM-DDTHH:MM:SS.ffffffZ``."""
    t = time.time()
    sec = int(t)
    micros = int((t - sec) * 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{micros:06d}Z"
