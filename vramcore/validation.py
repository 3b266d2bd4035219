"""Input checks shared by the manager, the events and the CLI.

Each check raises :class:`vramcore.errors.InvalidInput` with a message that names the bad
argument and says what would be accepted. Messages quote a bad value only through
:func:`safe_repr`, so a hostile value (terminal escapes, bidi overrides) cannot reach a log.
"""

from __future__ import annotations

import re
import unicodedata

from vramcore.errors import InvalidInput

__all__ = [
    "MAX_FIELD_CHARS",
    "MAX_SHARD_ID_CHARS",
    "check_device_index",
    "check_sha256_hex",
    "check_shard_id",
    "check_size",
    "clean_text",
    "safe_repr",
    "scrub_text",
]

MAX_SHARD_ID_CHARS = 256
#: Longest string an audit event field may carry; longer values are cut with a marker.
MAX_FIELD_CHARS = 1024

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


def check_shard_id(shard_id: object) -> str:
    """Check a shard id: 1-256 characters of ``[A-Za-z0-9._:-]``, no ``..``."""
    if not isinstance(shard_id, str):
        raise InvalidInput(f"shard_id must be a string, got {type(shard_id).__name__}")
    if not _SHARD_ID.fullmatch(shard_id):
        if not shard_id:
            problem = "is empty"
        elif len(shard_id) > MAX_SHARD_ID_CHARS:
            problem = f"is {len(shard_id)} characters long (at most {MAX_SHARD_ID_CHARS})"
        else:
            problem = "contains characters outside [A-Za-z0-9._:-]"
        raise InvalidInput(f"shard_id {safe_repr(shard_id)} {problem}")
    if ".." in shard_id:
        raise InvalidInput(f"shard_id {safe_repr(shard_id)} must not contain '..'")
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
