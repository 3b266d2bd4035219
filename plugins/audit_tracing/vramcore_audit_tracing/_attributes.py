"""What may leave the process as a telemetry attribute, and under which name.

Everything the plugin exports (span attributes, span-event attributes, log-record extras,
metric attributes) goes through the allowlists here, which are the core's own definitions of
what an operation and an audit event carry (one list each, in :mod:`vramcore.narration` and
:mod:`vramcore.events`): a key that is not listed there, or a value of the wrong type, is
dropped, so a mistake that put a pointer in an attribute never leaks. No OpenTelemetry import:
these are plain mappings.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Final

from vramcore.events import EVENT_FIELDS as CORE_EVENT_FIELDS
from vramcore.events import AuditEvent
from vramcore.narration import OPERATION_ATTRIBUTES as CORE_OPERATION_ATTRIBUTES

__all__ = [
    "CORRELATION_ATTRIBUTE",
    "CORRELATION_BAGGAGE_KEY",
    "EVENT_FIELDS",
    "FAILED_OUTCOMES",
    "LOG_LEVELS",
    "NAMESPACE",
    "OPERATION_ATTRIBUTES",
    "SEVERITY_NUMBERS",
    "clean_str",
    "error_type",
    "event_attributes",
    "operation_attributes",
]

#: Prefix of every attribute this plugin sets (OpenTelemetry semantic-convention style).
NAMESPACE: Final = "vramcore."
#: Baggage key a caller may set to correlate vramcore work with its request.
CORRELATION_BAGGAGE_KEY: Final = "vramcore.correlation_id"
#: Attribute carrying the correlation id on spans, span events and log records.
CORRELATION_ATTRIBUTE: Final = "vramcore.correlation_id"
#: Outcomes that mark a span as failed.
FAILED_OUTCOMES: Final = frozenset({"error", "mismatch"})

#: Operation attribute key -> the only type accepted for it, as the core defines them
#: (:data:`vramcore.narration.OPERATION_ATTRIBUTES`). Exported as ``vramcore.<key>``.
OPERATION_ATTRIBUTES: Final[Mapping[str, type]] = CORE_OPERATION_ATTRIBUTES

#: Audit event field -> the only type accepted for it, as the core defines them
#: (:data:`vramcore.events.EVENT_FIELDS`). Exported as ``vramcore.<field>``; tuples are
#: exported as lists of strings (``byte_ranges`` as ``"start-end"``).
EVENT_FIELDS: Final[Mapping[str, type]] = CORE_EVENT_FIELDS

#: vramcore severity -> OpenTelemetry log ``SeverityNumber`` (INFO, WARN, ERROR, FATAL).
SEVERITY_NUMBERS: Final[Mapping[str, int]] = {
    "info": 9,
    "warning": 13,
    "error": 17,
    "critical": 21,
}
#: vramcore severity -> standard ``logging`` level.
LOG_LEVELS: Final[Mapping[str, int]] = {
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

_MAX_STRING = 1024
_MAX_ITEMS = 64

AttributeValue = str | int | float | bool | list[str]


def clean_str(value: str) -> str:
    """``value`` with non-printable characters replaced by ``?``, cut to 1024 characters."""
    # The core validates what it puts in events and operations; this is the last line of
    # defence for exporters and terminals: no control or format characters, bounded length.
    if not value.isprintable():
        value = "".join(ch if ch.isprintable() else "?" for ch in value)
    return value[:_MAX_STRING]


def _checked(value: object, kind: type) -> str | int | None:
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
        return None
    if isinstance(value, str) and value:
        return clean_str(str(value))
    return None


def operation_attributes(attributes: Mapping[str, object]) -> dict[str, AttributeValue]:
    """Map an operation's public facts to ``vramcore.<key>`` span attributes (allowlisted)."""
    out: dict[str, AttributeValue] = {}
    for key, value in attributes.items():
        kind = OPERATION_ATTRIBUTES.get(key)
        if kind is None:
            continue
        checked = _checked(value, kind)
        if checked is not None:
            out[NAMESPACE + key] = checked
    return out


def _ranges(value: tuple[object, ...]) -> list[str]:
    out: list[str] = []
    for item in value[:_MAX_ITEMS]:
        if (
            isinstance(item, tuple | list)
            and len(item) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in item)
        ):
            out.append(f"{item[0]}-{item[1]}")
    return out


def _strings(value: tuple[object, ...]) -> list[str]:
    return [clean_str(v) for v in value[:_MAX_ITEMS] if isinstance(v, str) and v]


def event_attributes(event: AuditEvent, correlation_id: str = "") -> dict[str, AttributeValue]:
    """The allowlisted attributes of an audit event, with its severity and correlation id.

    :param event: the audit event.
    :param correlation_id: used when the event carries none (e.g. taken from baggage).
    """
    severity = str(event.severity)
    out: dict[str, AttributeValue] = {
        NAMESPACE + "event_type": event.event_type,
        NAMESPACE + "severity": severity,
        NAMESPACE + "severity_number": SEVERITY_NUMBERS.get(severity, 0),
    }
    for field, kind in EVENT_FIELDS.items():
        value = getattr(event, field, None)
        if value is None:
            continue
        if kind is tuple:
            if isinstance(value, tuple) and value:
                items = _ranges(value) if field == "byte_ranges" else _strings(value)
                if items:
                    out[NAMESPACE + field] = items
            continue
        checked = _checked(value, kind)
        if checked is not None:
            out[NAMESPACE + field] = checked
    corr = event.correlation_id or correlation_id
    if corr:
        out[CORRELATION_ATTRIBUTE] = clean_str(corr)
    return out


def error_type(error: BaseException) -> str:
    """The ``error.type`` value for ``error``: its fully qualified class name."""
    cls = type(error)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"
