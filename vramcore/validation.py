"""Input checks shared by the manager, the events and the CLI.

Each check raises :class:`vramcore.errors.InvalidInput` with a message that names the bad
argument and says what would be accepted. Messages quote a bad value only through
:func:`safe_repr`, so a hostile value (terminal escapes, bidi overrides) cannot reach a log.
"""

from __future__ import annotations

import errno
import math
import os
import re
import stat
import unicodedata
from pathlib import Path

from vramcore.errors import InvalidInput

__all__ = [
    "MAX_FIELD_CHARS",
    "MAX_JSON_DEPTH",
    "MAX_LEAF_SIZE",
    "MAX_NAME_BYTES",
    "MAX_SHARD_ID_CHARS",
    "check_device_index",
    "check_flag",
    "check_leaf_size",
    "check_path",
    "check_seconds",
    "check_sha256_hex",
    "check_shard_id",
    "check_size",
    "check_workers",
    "clean_text",
    "escape_text",
    "json_depth_ok",
    "safe_repr",
    "scrub_text",
]

#: Longest file name (one path component) POSIX file systems store, in bytes.
MAX_NAME_BYTES = 255
#: Largest Merkle leaf accepted (1 GiB): a bigger leaf only makes localisation useless.
MAX_LEAF_SIZE = 1 << 30

MAX_SHARD_ID_CHARS = 256
#: Longest string an audit event field may carry; longer values are cut with a marker.
MAX_FIELD_CHARS = 1024
#: Nesting limit of JSON read from a file vramcore (or a plugin) did not write itself.
MAX_JSON_DEPTH = 32

_SHARD_ID = re.compile(r"[A-Za-z0-9._:-]{1,256}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Characters that can rewrite what a terminal or log viewer shows: bidi controls and marks,
# zero-width joiners, the BOM. Categories Cc (controls, NUL, ESC) are caught separately.
_INVISIBLE = frozenset(
    "\u061c\u200b\u200c\u200d\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
    "\u2066\u2067\u2068\u2069\ufeff"
)


_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def safe_repr(value: object, limit: int = 64) -> str:
    """A printable, bounded rendering of ``value`` for error messages."""
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_unsafe_char(ch: str) -> bool:
    # Cf: every format character (bidi, zero-width, tag characters U+E0000...); Zl/Zp: the
    # Unicode line and paragraph separators, which split a log line like a newline does.
    return ch in _INVISIBLE or unicodedata.category(ch) in _UNSAFE_CATEGORIES


def escape_text(value: str) -> str:
    """``value`` with every character :func:`clean_text` would reject written as an escape.

    For untrusted text on its way to a terminal (file names, plugin messages, tensor names):
    an ESC character becomes the four characters ``\\x1b``, a bidi override ``\\u202e``;
    printable text, non-ASCII letters included, is unchanged. The result is one line.
    """
    if value.isprintable() and not any(ch in _INVISIBLE for ch in value):
        return value
    out = []
    for ch in value:
        if _is_unsafe_char(ch) or (not ch.isprintable() and ch != " "):
            code = ord(ch)
            out.append(
                f"\\x{code:02x}"
                if code < 0x100
                else f"\\u{code:04x}"
                if code < 0x10000
                else f"\\U{code:08x}"
            )
        else:
            out.append(ch)
    return "".join(out)


def scrub_text(value: str) -> str:
    """Replace every character :func:`clean_text` would reject with ``?``.

    For text vramcore did not write (a driver's error message) that must still be recorded.
    """
    return "".join("?" if _is_unsafe_char(ch) else ch for ch in value)


def clean_text(value: str, *, field: str, limit: int = MAX_FIELD_CHARS) -> str:
    """Return ``value`` if it is safe to put in an audit event, else raise.

    Rejects control characters (NUL, ESC, newlines included), bidi controls, zero-width and
    other format characters, the BOM, line/paragraph separators, surrogates and unassigned
    code points. Values longer than ``limit``
    characters are cut and marked with ``"...[truncated]"`` rather than rejected, so a long
    error text from a driver still reaches the audit log.
    """
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be a string, got {type(value).__name__}")
    # Printable ASCII (U+0020..U+007E), the common case, holds nothing to reject: checked at
    # C speed; anything else is checked character by character.
    if not (value.isascii() and value.isprintable()):
        for ch in value:
            if _is_unsafe_char(ch):
                raise InvalidInput(
                    f"{field} contains a control or invisible character "
                    f"(U+{ord(ch):04X}); refusing to write it to an audit sink"
                )
    if len(value) > limit:
        marker = "...[truncated]"
        return value[: limit - len(marker)] + marker
    return value


def check_shard_id(shard_id: object, *, field: str = "shard_id") -> str:
    """Check a shard id: 1-256 characters of ``[A-Za-z0-9._:-]``, no ``..``.

    :param field: what the caller called it (``"--shard-id"`` in the CLI), for the message.
    """
    if not isinstance(shard_id, str):
        raise InvalidInput(f"{field} must be a string, got {type(shard_id).__name__}")
    if not _SHARD_ID.fullmatch(shard_id):
        if not shard_id:
            problem = "is empty"
        elif len(shard_id) > MAX_SHARD_ID_CHARS:
            problem = f"is {len(shard_id)} characters long (at most {MAX_SHARD_ID_CHARS})"
        else:
            problem = "contains characters outside [A-Za-z0-9._:-]"
        raise InvalidInput(f"{field} {safe_repr(shard_id)} {problem}")
    if ".." in shard_id:
        raise InvalidInput(f"{field} {safe_repr(shard_id)} must not contain '..'")
    return shard_id


def check_size(nbytes: object, *, field: str = "size") -> int:
    """Check that a byte count is a positive integer."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise InvalidInput(f"{field} must be an integer number of bytes")
    if nbytes <= 0:
        raise InvalidInput(f"{field} must be greater than 0 bytes, got {nbytes}")
    return nbytes


def check_device_index(device: object, device_count: int) -> int:
    """Check that ``device`` indexes one of ``device_count`` devices."""
    if isinstance(device, bool) or not isinstance(device, int):
        raise InvalidInput(f"device must be an integer index, got {type(device).__name__}")
    if not 0 <= device < device_count:
        if device_count == 0:
            raise InvalidInput(f"device {device} does not exist: the backend reports no device")
        raise InvalidInput(
            f"device {device} does not exist: the backend reports {device_count} "
            f"device(s), indexes 0..{device_count - 1}"
        )
    return device


def check_sha256_hex(value: object, *, field: str = "expected_sha256") -> str:
    """Check and normalise a SHA-256 hex digest (64 hex digits, any case)."""
    if not isinstance(value, str) or not _SHA256_HEX.fullmatch(value.lower()):
        raise InvalidInput(f"{field} must be 64 hexadecimal digits, got {safe_repr(value)}")
    return value.lower()


def check_flag(value: object, *, field: str) -> bool:
    """Check a yes/no option is a real ``bool``: ``"false"`` is a truthy string, not a no."""
    if not isinstance(value, bool):
        raise InvalidInput(f"{field} must be True or False, got {safe_repr(value)}")
    return value


def check_seconds(value: object, *, field: str) -> float:
    """A positive, finite number of seconds (a timeout)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise InvalidInput(f"{field} must be a positive number of seconds, got {safe_repr(value)}")
    return float(value)


def check_workers(value: object, *, field: str = "hash_workers") -> int:
    """A thread count from 1 to 1024."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1024:
        raise InvalidInput(f"{field} must be an integer from 1 to 1024, got {safe_repr(value)}")
    return value


def check_leaf_size(leaf_size: object, *, field: str = "leaf_size") -> int:
    """Check a Merkle leaf size: an integer, a positive multiple of 4096, at most 1 GiB."""
    if isinstance(leaf_size, bool) or not isinstance(leaf_size, int):
        raise InvalidInput(
            f"{field} must be an integer number of bytes (a multiple of 4096, e.g. 65536), "
            f"got {type(leaf_size).__name__} {safe_repr(leaf_size)}"
        )
    if leaf_size <= 0 or leaf_size % 4096 or leaf_size > MAX_LEAF_SIZE:
        raise InvalidInput(
            f"{field} must be a positive multiple of 4096 of at most {MAX_LEAF_SIZE} bytes, "
            f"got {leaf_size}"
        )
    return leaf_size


def _shown(path: str) -> str:
    return escape_text(path if len(path) <= 200 else path[:100] + "..." + path[-60:])


def check_path(path: object, *, field: str = "path", allow_empty: bool = False) -> Path:
    """Check that ``path`` names a regular file this process can read; return it as a Path.

    Every refusal is an :class:`InvalidInput` that says which: a wrong type, a NUL byte, a
    file name over :data:`MAX_NAME_BYTES` bytes, no such file, a directory, a device, FIFO or
    socket (``/dev/null`` included), no permission to read, or an empty file. Paths in
    messages are escaped (:func:`escape_text`).

    :param field: what the caller called it (``"PATH"`` in the CLI), for the message.
    :param allow_empty: accept a file of 0 bytes.
    """
    if isinstance(path, bytes) or not isinstance(path, str | os.PathLike):
        raise InvalidInput(
            f"{field} must be a path (str or os.PathLike), got {type(path).__name__}"
        )
    text = os.fspath(path)
    if not isinstance(text, str):
        raise InvalidInput(f"{field} must be a text path, got {type(text).__name__}")
    if "\x00" in text:
        raise InvalidInput(f"{field} {_shown(text)} contains a NUL character")
    for part in Path(text).parts:
        size = len(os.fsencode(part))
        if size > MAX_NAME_BYTES:
            raise InvalidInput(
                f"{field} has a name of {size} bytes ({_shown(part[:40])}...); file names are "
                f"at most {MAX_NAME_BYTES} bytes"
            )
    p = Path(text)
    try:
        st = p.stat()
    except OSError as exc:
        raise InvalidInput(f"{field} {_shown(text)}: {_os_problem(exc)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InvalidInput(f"{field} {_shown(text)} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInput(
            f"{field} {_shown(text)} is not a regular file (a device, FIFO or socket)"
        )
    try:
        os.close(os.open(p, os.O_RDONLY))
    except OSError as exc:
        raise InvalidInput(f"{field} {_shown(text)}: {_os_problem(exc)}") from None
    if not allow_empty and st.st_size == 0:
        raise InvalidInput(f"{field} {_shown(text)} is empty (0 bytes): nothing to seal")
    return p


def _os_problem(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "no such file"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied (cannot read it)"
    if exc.errno == errno.ENOTDIR:
        return "a parent is not a directory"
    if exc.errno == errno.ENAMETOOLONG:
        return "the path is too long"
    if exc.errno == errno.ELOOP:
        return "too many symbolic links"
    return f"cannot read it ({escape_text(exc.strerror or type(exc).__name__)})"


def json_depth_ok(text: bytes | str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``text`` nests brackets at most ``limit`` deep (a cheap pre-check that keeps
    hostile input from reaching ``json.loads``'s recursion limit)."""
    raw = text.encode("utf-8", "replace") if isinstance(text, str) else text
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return True
    depth = 0
    in_string = False
    escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return False
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return True
