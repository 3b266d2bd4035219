"""One human-readable log line per operation, for people without a tracing backend.

``sealed 1.0 GiB shard 'llama-00001' on GPU 0 (NVIDIA H100) in 410.2 ms`` goes to the
``vramcore.narration`` logger: top-level steps (seal, verify, deallocate) at INFO, the nested
steps (allocate, copy, digest) at DEBUG, failures at WARNING and verification failures at
ERROR. The line is built only when the logger would emit it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Final

from vramcore.errors import VramError
from vramcore_audit_tracing._attributes import clean_str

__all__ = ["EVENTS_LOGGER", "NARRATION_LOGGER", "format_bytes", "narration_level", "narration_line"]

#: Name of the logger narration lines go to.
NARRATION_LOGGER: Final = "vramcore.narration"
#: Name of the logger audit events are written to (by the tracing sink).
EVENTS_LOGGER: Final = "vramcore.events"

_PAST_TENSE: Final[Mapping[str, str]] = {
    "seal": "sealed",
    "verify": "verified",
    "allocate": "allocated",
    "copy": "copied",
    "digest": "digested",
    "deallocate": "deallocated",
}
_TOP_LEVEL: Final = frozenset({"seal", "verify", "deallocate"})
_UNITS: Final = ("KiB", "MiB", "GiB", "TiB")


def format_bytes(nbytes: int) -> str:
    """``1288490188`` -> ``"1.2 GiB"``; below 1 KiB, ``"512 B"``."""
    if nbytes < 1024:
        return f"{nbytes} B"
    value = float(nbytes) / 1024.0
    index = 0
    while value >= 1024.0 and index < len(_UNITS) - 1:
        value /= 1024.0
        index += 1
    unit = _UNITS[index]
    return f"{value:.1f} {unit}"


def _duration(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    return f"{seconds * 1000.0:.1f} ms"


def narration_level(name: str, outcome: str, error: BaseException | None) -> int:
    """The ``logging`` level of an operation's narration line."""
    if outcome == "mismatch":
        return logging.ERROR
    if error is not None or outcome == "error":
        return logging.WARNING
    return logging.INFO if name in _TOP_LEVEL else logging.DEBUG


def narration_line(
    name: str,
    attributes: Mapping[str, object],
    *,
    outcome: str,
    seconds: float,
    error: BaseException | None = None,
    correlation_id: str = "",
) -> str:
    """Render the narration line of one finished operation.

    :param name: the operation name.
    :param attributes: the operation's allowlisted ``vramcore.*`` attributes.
    :param outcome: ``"ok"``, ``"error"`` or ``"mismatch"``.
    :param seconds: how long the step took.
    :param error: what it raised, if anything (only a vramcore error's message is shown:
        those are guaranteed free of secrets and pointers).
    :param correlation_id: appended in brackets when set.
    """
    shard = attributes.get("vramcore.shard_id")
    nbytes = attributes.get("vramcore.nbytes")
    device = attributes.get("vramcore.device")
    device_name = attributes.get("vramcore.device_name")
    what = f"shard {shard!r}" if isinstance(shard, str) else "shard"
    where = f" on GPU {device}" if isinstance(device, int) else ""
    if where and isinstance(device_name, str):
        where += f" ({device_name})"
    size = f"{format_bytes(nbytes)} " if isinstance(nbytes, int) else ""
    if outcome == "ok" and error is None:
        line = f"{_PAST_TENSE.get(name, name)} {size}{what}{where} in {_duration(seconds)}"
    else:
        failed = "FAILED" if outcome == "mismatch" else "failed"
        line = f"{name} of {size}{what}{where} {failed} after {_duration(seconds)}"
        if error is not None:
            line += f": {type(error).__name__}"
            if isinstance(error, VramError):
                line += f": {clean_str(str(error))[:300]}"
        elif outcome == "mismatch":
            line += ": digest mismatch"
    if correlation_id:
        line += f" [correlation_id={correlation_id}]"
    return line
