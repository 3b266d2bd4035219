"""Audit sinks: where events go, and how the manager fans them out.

A plugin returns sinks from :func:`~vramcore.hookspecs.vramcore_audit_sinks`. The manager
builds its sinks once when it starts and delivers every event to every sink in the caller's
thread (so a tracing sink sees the caller's current span). A sink that raises on a
:attr:`critical <vramcore.events.AuditEvent.critical>` event fails the operation with
:class:`~vramcore.errors.AuditError` (fail closed); on other events the failure is logged,
reported through :func:`~vramcore.hookspecs.vramcore_audit_failure` and delivery goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from vramcore.errors import AuditError
from vramcore.events import AuditEvent
from vramcore.seal import WorkerToken

__all__ = ["AuditSink", "AuditTrail", "SinkContext", "deliver"]

log = logging.getLogger("vramcore.audit")


@attrs.frozen(kw_only=True)
class SinkContext:
    """What a sink factory may know about the manager it serves.

    :attr worker_id: the worker's public id.
    :attr device: the device index the manager runs on.
    :attr token: the worker token; call ``token.derive(info)`` for a key of the sink's own
        (use an ``info`` string of your own, never the seal key's). Its repr is a fingerprint.
    """

    worker_id: str
    device: int
    token: WorkerToken = attrs.field(repr=False)


class AuditSink:
    """Base class of an audit sink. Subclasses override :meth:`emit` at least.

    :attr name: shown in errors and in ``vramcore plugins``.
    :attr durable: whether the sink keeps a lasting record (a log file, a remote store).
        ``audit="required"`` needs at least one durable sink; narration-only sinks (traces,
        logs) set this to ``False``.
    """

    name: str = "sink"
    durable: bool = True

    def emit(self, event: AuditEvent) -> None:
        """Record ``event``; return only when it is as durable as the sink promises."""
        raise NotImplementedError

    def flush(self) -> None:
        """Make everything emitted so far durable."""

    def close(self) -> None:
        """Flush and release resources; called once, when the manager closes."""

    def report(self) -> Mapping[str, Any] | None:
        """After :meth:`close`: a short summary for the CLI (records written, verified...)."""
        return None


def deliver(
    sinks: Sequence[AuditSink], event: AuditEvent, on_failure: Any = None
) -> list[tuple[AuditSink, BaseException]]:
    """Give ``event`` to every sink; return the failures.

    Every sink is tried even when an earlier one fails. For a critical event any failure
    raises :class:`AuditError` after all sinks were tried. ``on_failure(sink, event, exc)``
    is called for each failure (the manager reports it through a hook).
    """
    failures: list[tuple[AuditSink, BaseException]] = []
    for sink in sinks:
        try:
            sink.emit(event)
        except Exception as exc:
            failures.append((sink, exc))
            log.error(
                "audit sink %s failed on %s: %s", sink.name, event.event_type, type(exc).__name__
            )
            if on_failure is not None:
                on_failure(sink, event, exc)
    if failures and event.critical:
        names = ", ".join(sorted({s.name for s, _ in failures}))
        raise AuditError(
            f"audit sink(s) {names} could not record critical event {event.event_type}; "
            "the operation was refused (fail closed). Check the sink's storage and restart."
        ) from failures[0][1]
    return failures


class AuditTrail:
    """The audit sinks of one manager: collected from plugins, fed every event, closed once.

    :param hook: the plugin manager's hook relay (``pm.hook``).
    """

    def __init__(self, hook: Any) -> None:
        self._hook = hook
        self._sinks: list[AuditSink] = []

    @property
    def sinks(self) -> tuple[AuditSink, ...]:
        """The sinks events go to."""
        return tuple(self._sinks)

    def collect(self, context: SinkContext) -> None:
        """Ask every plugin for its sinks (``vramcore_audit_sinks``)."""
        for sinks in self._hook.vramcore_audit_sinks(context=context):
            self._sinks.extend(sinks)

    def require_durable(self) -> None:
        """Raise unless at least one sink keeps a lasting record.

        :raises AuditError: (``configuration=True``) no durable sink was collected.
        """
        if any(sink.durable for sink in self._sinks):
            return
        names = ", ".join(sink.name for sink in self._sinks) or "none"
        raise AuditError(
            f"no durable audit sink is configured (sinks: {names}) and audit='required': "
            "install vramcore-audit-chain and set VRAMCORE_AUDIT_LOG=/path/to/dir, or pass "
            "audit='disabled' to run without an audit trail on purpose",
            configuration=True,
        )

    def emit(self, event: AuditEvent) -> None:
        """Deliver ``event`` to every sink (see :func:`deliver`); failures are reported."""
        deliver(self._sinks, event, on_failure=self._report_failure)

    def _report_failure(self, sink: AuditSink, event: AuditEvent, exc: BaseException) -> None:
        try:
            self._hook.vramcore_audit_failure(sink_name=sink.name, event=event, error=exc)
        except Exception:  # a reporting plugin must not mask the original failure
            log.exception("vramcore_audit_failure hook raised")

    def close(self) -> list[BaseException]:
        """Close every sink (each flushes first); return what failed instead of raising."""
        errors: list[BaseException] = []
        for sink in self._sinks:
            try:
                sink.close()
            except Exception as exc:
                log.error("audit sink %s failed to close: %s", sink.name, type(exc).__name__)
                errors.append(exc)
        return errors
