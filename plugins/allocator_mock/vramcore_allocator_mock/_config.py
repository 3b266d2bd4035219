"""Reading the mock's configuration: sizes, switches and fault schedules from the environment."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from vramcore.errors import ConfigError

#: Operations a failure can be injected into (``fail_next(op)``, ``fail_at={op: n}``).
FAULT_OPS = ("allocate", "copy", "wait", "read", "free", "digest")

_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_UNITS |= {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE = re.compile(r"\s*(?:(\d+)\s*x\s*)?(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}

#: Boolean switches: environment variable -> ``MockBackend`` keyword.
SWITCHES = {
    "VRAMCORE_MOCK_ASYNC": "async_copies",
    "VRAMCORE_MOCK_UNINITIALISED": "uninitialised",
    "VRAMCORE_MOCK_STRICT_CLOSE": "strict_close",
    "VRAMCORE_MOCK_STICKY_ERRORS": "sticky_errors",
    "VRAMCORE_MOCK_DEVICE_DIGEST": "device_digest",
    "VRAMCORE_MOCK_OPAQUE_NATIVE": "opaque_native",
}
#: What ``VRAMCORE_MOCK_FAITHFUL=1`` (and :meth:`MockBackend.faithful`) switch on.
FAITHFUL = ("async_copies", "uninitialised", "strict_close", "opaque_native")


def parse_vram(text: str) -> tuple[int | None, int]:
    """Parse ``"24GiB"`` or ``"2x24GiB"`` into ``(device count or None, bytes per device)``."""
    m = _SIZE.fullmatch(text)
    unit = m.group(3).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ConfigError(
            f"VRAMCORE_MOCK_VRAM={text[:40]!r} is not a size; write e.g. 24GiB, 512MiB or 2x24GiB"
        )
    count = int(m.group(1)) if m.group(1) else None
    size = int(float(m.group(2)) * _UNITS[unit])
    if size <= 0 or count == 0:
        raise ConfigError(f"VRAMCORE_MOCK_VRAM={text[:40]!r} must describe at least one byte")
    return count, size


def _flag(env: Mapping[str, str], name: str) -> bool | None:
    text = env.get(name)
    if text is None:
        return None
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}={text[:20]!r} must be 1 or 0 (true/false, yes/no, on/off)")


def parse_fail_at(text: str) -> dict[str, int]:
    """Parse ``"read:3,free:1"`` (the 3rd read and the 1st free fail) into a mapping."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        op, _, count = part.partition(":")
        op = op.strip().lower()
        if op not in FAULT_OPS or not count.strip().isdigit() or int(count) < 1:
            raise ConfigError(
                f"VRAMCORE_MOCK_FAIL={text[:60]!r}: write OP:N[,OP:N...] with N >= 1 and OP one "
                f"of {', '.join(FAULT_OPS)} (e.g. read:3,free:1)"
            )
        out[op] = int(count)
    return out


def options_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """``MockBackend`` keyword arguments from the ``VRAMCORE_MOCK_*`` variables in ``env``."""
    count, size = parse_vram(env.get("VRAMCORE_MOCK_VRAM", "24GiB"))
    devices_text = env.get("VRAMCORE_MOCK_DEVICES")
    if devices_text is not None:
        if not devices_text.strip().isdigit() or int(devices_text) < 1:
            raise ConfigError(
                f"VRAMCORE_MOCK_DEVICES={devices_text[:20]!r} must be a positive integer"
            )
        count = int(devices_text)
    options: dict[str, Any] = {"devices": count or 1, "capacity": size}
    if _flag(env, "VRAMCORE_MOCK_FAITHFUL"):
        options.update(dict.fromkeys(FAITHFUL, True))
    for name, keyword in SWITCHES.items():
        value = _flag(env, name)
        if value is not None:
            options[keyword] = value
    delay = env.get("VRAMCORE_MOCK_COPY_DELAY")
    if delay is not None:
        try:
            seconds = float(delay)
        except ValueError:
            seconds = -1.0
        if not 0 <= seconds <= 60:
            raise ConfigError(
                f"VRAMCORE_MOCK_COPY_DELAY={delay[:20]!r} must be seconds between 0 and 60"
            )
        options["copy_delay"] = seconds
    fail = env.get("VRAMCORE_MOCK_FAIL")
    if fail is not None:
        options["fail_at"] = parse_fail_at(fail)
    return options
