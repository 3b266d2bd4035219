"""Audit sinks and a sink-giving plugin for tests: capture every event, or fail on some."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from vramcore.audit import AuditSink, SinkContext
from vramcore.events import AuditEvent
from vramcore.hookspecs import hookimpl

__all__ = ["CapturePlugin", "CapturingSink", "FailingSink"]


class CapturingSink(AuditSink):
    """Keeps every event in :attr:`events`, in order (thread-safe).

    Counts as durable, so a manager with only this sink satisfies ``audit="required"`` in
    tests; it stands in for a real sink such as the audit chain.
    """

    name = "capture"

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []
        self.closed = False
        self.flushed = 0
        self._lock = threading.Lock()

    def emit(self, event: AuditEvent) -> None:
        """Record the event."""
        with self._lock:
            self.events.append(event)

    def flush(self) -> None:
        """Count flushes."""
        self.flushed += 1

    def close(self) -> None:
        """Mark closed."""
        self.closed = True

    def of_type(self, event_type: str) -> list[AuditEvent]:
        """The captured events whose ``event_type`` is ``event_type``."""
        with self._lock:
            return [e for e in self.events if e.event_type == event_type]

    def types(self) -> list[str]:
        """The ``event_type`` of every captured event, in order."""
        with self._lock:
            return [e.event_type for e in self.events]


class FailingSink(AuditSink):
    """A sink that raises ``OSError`` on every event (or only on ``event_types``)."""

    name = "failing"

    def __init__(self, event_types: Sequence[str] | None = None) -> None:
        self.event_types = set(event_types) if event_types is not None else None

    def emit(self, event: AuditEvent) -> None:
        """Fail (for the selected event types)."""
        if self.event_types is None or event.event_type in self.event_types:
            raise OSError("disk full (injected)")


class CapturePlugin:
    """A plugin object that gives each starting manager the given sinks."""

    def __init__(self, *sinks: AuditSink) -> None:
        self.sinks = list(sinks)
        self.contexts: list[SinkContext] = []

    @hookimpl
    def vramcore_audit_sinks(self, context: SinkContext) -> Sequence[AuditSink]:
        """Hand out the sinks."""
        self.contexts.append(context)
        return self.sinks
