"""Key material: the auditor's initial key file, the checkpoint key pair, the writer state.

* The **initial key** (epoch 0) is made once, at setup, from the worker token and a random
  nonce that is then forgotten; it is written once to a 0600 file for the auditor and never
  again exists on the host once the operator moves that file away.
* The **checkpoint signing key** (Ed25519) is derived from the worker token, so its public
  half can be recomputed at any time (``vramcore audit public-key``).
* The **state file** holds the current epoch key, sealed with AES-256-GCM under a key derived
  from the worker token; it is rewritten (atomically) at every epoch change, which is what
  makes old epoch keys unrecoverable.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from vramcore.audit import SinkContext
from vramcore.errors import ConfigError
from vramcore_audit_chain._format import (
    CHECKPOINT_SIGNING_PURPOSE,
    STATE_KEY_PURPOSE,
    canonical_json,
    key_id,
    loads_bounded,
    read_bounded,
)

__all__ = [
    "AuditorKey",
    "ChainState",
    "load_key_file",
    "load_public_key",
    "public_key_hex",
    "read_state",
    "signing_key",
    "state_cipher",
    "write_key_file",
    "write_private_file",
    "write_state",
]

KEY_FILE_FORMAT = "vramcore-audit-chain-key/1"
#: Key files, public key files and the state are small: anything larger is not one.
_MAX_KEY_FILE = 64 * 1024
STATE_FORMAT = "vramcore-audit-chain-state/1"


def fsync_dir(directory: Path) -> None:
    """Make a directory entry change (create, rename) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private_file(path: Path, data: bytes, *, replace: bool) -> None:
    """Write ``data`` to a new 0600 file and fsync it.

    :param replace: atomically replace ``path`` (temp file + rename); otherwise refuse to
        overwrite an existing file.
    """
    target = path.with_name(path.name + ".tmp") if replace else path
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    if replace:
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
    fd = os.open(target, flags, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    if replace:
        os.replace(target, path)
    fsync_dir(path.parent)


def signing_key(keys: SinkContext) -> Ed25519PrivateKey:
    """The checkpoint signing key, derived from the worker token."""
    seed = keys.derive_key(CHECKPOINT_SIGNING_PURPOSE)
    try:
        return Ed25519PrivateKey.from_private_bytes(seed.export())
    finally:
        seed.wipe()


def public_key_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The raw 32-byte Ed25519 public key in hex."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def load_public_key(text: str) -> Ed25519PublicKey:
    """Read a public key given as 64 hex digits, or a file holding them.

    :raises ConfigError: not a key and not a readable file holding one.
    """
    candidate = text.strip()
    if not _is_hex(candidate, 64):
        try:
            candidate = read_bounded(Path(text), _MAX_KEY_FILE).decode("ascii").strip()
        except (OSError, ValueError, ConfigError) as exc:
            raise ConfigError(
                f"--public-key must be 64 hex digits or a file holding them "
                f"(such as checkpoint.pub next to the log): {str(exc)[:200]}"
            ) from None
    if not _is_hex(candidate, 64):
        raise ConfigError("the public key must be 64 lowercase hex digits (checkpoint.pub)")
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(candidate))


def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and not text.strip("0123456789abcdef")


@attrs.frozen
class AuditorKey:
    """What the auditor holds: the initial key of one log, and that log's public key.

    :attr initial_key: the epoch-0 MAC key (never shown: excluded from repr).
    """

    log_id: str
    key_id: str
    public_key: str
    initial_key: bytes = attrs.field(repr=False)


def write_key_file(path: Path, *, log_id: str, key: bytes | bytearray, public_key: str) -> None:
    """Write the auditor's initial key file once (0600, refuses to overwrite)."""
    doc = {
        "format": KEY_FILE_FORMAT,
        "log_id": log_id,
        "key_id": key_id(key),
        "public_key": public_key,
        "initial_key": bytes(key).hex(),
        "note": "vramcore audit chain initial key: give this file to the auditor and delete "
        "it from the worker host; whoever holds it can forge the whole log.",
    }
    try:
        write_private_file(path, (json.dumps(doc, indent=2) + "\n").encode("ascii"), replace=False)
    except FileExistsError:
        raise ConfigError(
            f"{path} already exists; it belongs to another audit log. Move it away (to the "
            "auditor) before starting a new log here, or set VRAMCORE_AUDIT_INITIAL_KEY_FILE"
        ) from None


def load_key_file(path: Path) -> AuditorKey:
    """Read an auditor key file.

    :raises ConfigError: unreadable or not a key file (the message never quotes the key).
    """
    try:
        doc = loads_bounded(read_bounded(path, _MAX_KEY_FILE).decode("ascii"))
        if not isinstance(doc, dict) or doc.get("format") != KEY_FILE_FORMAT:
            raise ValueError("not a vramcore audit chain key file")
        for name in ("initial_key", "key_id", "log_id", "public_key"):
            if not isinstance(doc.get(name), str) or len(doc[name]) > 128:
                raise ValueError(f"not a vramcore audit chain key file ({name} is missing)")
        key = bytes.fromhex(doc["initial_key"])
        if len(key) != 32 or key_id(key) != doc["key_id"]:
            raise ValueError("the key does not match its key_id (damaged file?)")
        return AuditorKey(doc["log_id"], doc["key_id"], doc["public_key"], key)
    except ConfigError as exc:
        raise ConfigError(f"cannot read audit key file: {exc}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else type(exc).__name__
        if isinstance(exc, ValueError) and ("key" in str(exc) or "JSON" in str(exc)):
            reason = str(exc)
        raise ConfigError(f"cannot read audit key file {path}: {reason}") from None


@attrs.define
class ChainState:
    """The writer's persistent state (decrypted).

    :attr seq: sequence number of the last checkpoint known durable (-1 before genesis).
    :attr head: that checkpoint's MAC (hex).
    :attr key: the key of ``epoch`` (wiped by :meth:`wipe`).
    """

    log_id: str
    epoch: int
    seq: int
    head: str
    key: bytearray = attrs.field(repr=False)

    def wipe(self) -> None:
        """Overwrite the key."""
        self.key[:] = bytes(len(self.key))


def state_cipher(keys: SinkContext) -> AESGCM:
    """The AES-256-GCM cipher that seals the state file (key derived from the token)."""
    k = keys.derive_key(STATE_KEY_PURPOSE)
    try:
        return AESGCM(k.export())
    finally:
        k.wipe()


def write_state(path: Path, cipher: AESGCM, state: ChainState) -> None:
    """Seal ``state`` under the token-derived state key and replace the state file."""
    plain: dict[str, Any] = {
        "epoch": state.epoch,
        "seq": state.seq,
        "head": state.head,
        "key": state.key.hex(),
    }
    nonce = secrets.token_bytes(12)
    aad = f"{STATE_FORMAT}\n{state.log_id}".encode("ascii")
    sealed = cipher.encrypt(nonce, canonical_json(plain).encode("ascii"), aad)
    doc = {
        "format": STATE_FORMAT,
        "log_id": state.log_id,
        "nonce": nonce.hex(),
        "sealed": sealed.hex(),
    }
    write_private_file(path, (json.dumps(doc) + "\n").encode("ascii"), replace=True)


def read_state(path: Path, cipher: AESGCM) -> ChainState | None:
    """Read the state file; ``None`` when there is none.

    :raises ConfigError: unreadable, or sealed under another worker token.
    """
    if not path.exists() and not path.is_symlink():
        return None
    try:
        raw = read_bounded(path, _MAX_KEY_FILE).decode("ascii")
    except (ConfigError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read audit chain state {path}: {str(exc)[:200]}") from None
    try:
        doc = loads_bounded(raw)
        if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
            raise ValueError
        log_id = str(doc["log_id"])
        aad = f"{STATE_FORMAT}\n{log_id}".encode("ascii")
        plain = cipher.decrypt(bytes.fromhex(doc["nonce"]), bytes.fromhex(doc["sealed"]), aad)
        body = json.loads(plain)
        return ChainState(
            log_id,
            int(body["epoch"]),
            int(body["seq"]),
            str(body["head"]),
            bytearray.fromhex(body["key"]),
        )
    except InvalidTag:
        raise ConfigError(
            f"audit chain state {path} was written with another worker token (or altered); "
            "start this worker with the token that created the log, or point "
            "VRAMCORE_AUDIT_LOG at a new directory"
        ) from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"audit chain state {path} is damaged; restore it from backup") from None
