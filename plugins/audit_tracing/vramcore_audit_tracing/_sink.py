"""The audit sink: each audit event becomes a span event and a standard log record.

The manager delivers events in the caller's thread, inside the operation's span, so a
verification failure appears in the trace of the request that caused it. The log record goes
to the ``vramcore.events`` logger with the event's severity mapped to a ``logging`` level and
the same allowlisted attributes as ``extra``: an OpenTelemetry ``LoggingHandler`` exports them
as log-record attributes, tied to the current trace. (The OpenTelemetry logs API is not part of
the stable ``opentelemetry-api``, so the plugin does not call it.)

Tracing is best effort: this sink never raises, so it can never fail the operation that
produced an event (a durable audit sink such as the audit chain is the record of truth).
"""

from __future__ import annotations

import logging

from opentelemetry import baggage, trace

from vramcore.audit import AuditSink, SinkContext
from vramcore.events import AuditEvent
from vramcore_audit_tracing._attributes import (
    CORRELATION_BAGGAGE_KEY,
    LOG_LEVELS,
    NAMESPACE,
    clean_str,
    event_attributes,
)
from vramcore_audit_tracing._narration import EVENTS_LOGGER

__all__ = ["TracingSink", "baggage_correlation_id"]

_log = logging.getLogger(__name__)
_MAX_CORRELATION_CHARS = 128


def baggage_correlation_id() -> str:
    """The correlation id in the current context's baggage, cleaned, or ``""``.

    Baggage arrives from remote callers, so the value is treated as untrusted text.
    """
    value = baggage.get_baggage(CORRELATION_BAGGAGE_KEY)
    if not isinstance(value, str) or not value:
        return ""
    return clean_str(value)[:_MAX_CORRELATION_CHARS]


def _timestamp_ns(event: AuditEvent) -> int:
    return int(event.timestamp.timestamp() * 1_000_000) * 1000


def _message(event: AuditEvent, attributes: dict[str, object]) -> str:
    skip = {NAMESPACE + "event_type", NAMESPACE + "severity_number"}
    fields = " ".join(
        f"{key.removeprefix(NAMESPACE)}={value}"
        for key, value in attributes.items()
        if key not in skip
    )
    return f"{event.event_type} {fields}"


class TracingSink(AuditSink):
    """Adds every audit event to the current span and logs it with its severity.

    :param context: the manager's sink context (its worker id and device).
    :param logger: where log records go (default: the ``vramcore.events`` logger).
    :param log_events: also write a log record per event.
    """

    name = "audit_tracing"
    #: Telemetry is best effort, not a durable audit trail (a manager that requires auditing
    #: should not count this sink as one).
    durable = False

    def __init__(
        self,
        context: SinkContext,
        *,
        logger: logging.Logger | None = None,
        log_events: bool = True,
    ) -> None:
        self.worker_id = context.worker_id
        self.device = context.device
        self._logger = logger if logger is not None else logging.getLogger(EVENTS_LOGGER)
        self._log_events = log_events
        self.emitted = 0

    def report(self) -> dict[str, int]:
        """How many events this sink was given."""
        return {"events": self.emitted}

    def emit(self, event: AuditEvent) -> None:
        """Record ``event`` on the current span and in the log; never raises."""
        try:
            self._emit(event)
        except Exception as exc:  # telemetry must never fail an audited operation
            _log.warning("tracing sink could not record %s: %s", event.event_type, type(exc))

    def _emit(self, event: AuditEvent) -> None:
        span = trace.get_current_span()
        level = LOG_LEVELS.get(str(event.severity), logging.INFO)
        log_it = self._log_events and self._logger.isEnabledFor(level)
        recording = span.is_recording()
        self.emitted += 1
        if not (recording or log_it):
            return
        attributes = event_attributes(
            event, "" if event.correlation_id else baggage_correlation_id()
        )
        if recording:
            span.add_event(event.event_type, attributes, timestamp=_timestamp_ns(event))
        if log_it:
            self._logger.log(level, "%s", _message(event, dict(attributes)), extra=attributes)
