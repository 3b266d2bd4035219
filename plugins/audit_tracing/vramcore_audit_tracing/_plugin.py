"""The tracing plugin object: spans, metrics and narration around every manager step."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import time
import traceback
from collections.abc import Generator, Mapping, Sequence
from contextvars import Token
from pathlib import Path
from typing import Any

from opentelemetry import context, metrics, trace
from opentelemetry.context import Context
from opentelemetry.environment_variables import OTEL_PYTHON_TRACER_PROVIDER
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode

from vramcore.audit import AuditSink, AuditWitness, SinkContext
from vramcore.errors import VramError
from vramcore.events import AuditEvent
from vramcore.hookspecs import hookimpl
from vramcore.narration import Operation
from vramcore_audit_tracing._attributes import (
    CORRELATION_ATTRIBUTE,
    FAILED_OUTCOMES,
    NAMESPACE,
    clean_str,
    error_type,
    operation_attributes,
)
from vramcore_audit_tracing._metrics import Instruments
from vramcore_audit_tracing._narration import NARRATION_LOGGER, narration_level, narration_line
from vramcore_audit_tracing._sink import TracingSink, baggage_correlation_id
from vramcore_audit_tracing._witness import TracingWitness, enabled_from_env, readback_from_env

__all__ = ["INSTRUMENTATION_NAME", "SPAN_PREFIX", "TracingPlugin"]

#: Instrumentation scope name of the tracer and meter.
INSTRUMENTATION_NAME = "vramcore_audit_tracing"
#: Span names are ``vramcore.<operation>`` (``vramcore.seal``, ``vramcore.verify``...).
SPAN_PREFIX = "vramcore."

_log = logging.getLogger(__name__)
#: What the API's global tracer provider is while no SDK is configured.
_NO_SDK_PROVIDERS = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)


def _version() -> str:
    try:
        return importlib.metadata.version("vramcore-audit-tracing")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _record_error(span: Span, error: BaseException) -> None:
    # Only a vramcore error's message is exported: the core guarantees it holds no secret and
    # no pointer. Other exceptions (a driver's, a bug's) keep their type and frames only.
    message = clean_str(str(error)) if isinstance(error, VramError) else ""
    # Frames without their source lines: a source line can quote a literal or an expression.
    frames = "".join(
        f'  File "{frame.filename}", line {frame.lineno}, in {frame.name}\n'
        for frame in traceback.extract_tb(error.__traceback__)
    )
    span.record_exception(
        error,
        attributes={
            "exception.type": error_type(error),
            "exception.message": message,
            "exception.stacktrace": frames,
        },
    )
    span.set_attribute("error.type", error_type(error))
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {message}"[:256]))


class TracingPlugin:
    """vramcore plugin that traces, measures and narrates the manager's operations.

    Register an instance with :func:`vramcore.plugins.get_plugin_manager` to use providers of
    your own (tests pass SDK providers with in-memory exporters). The ``audit_tracing`` entry
    point registers a module-level instance that uses the global OpenTelemetry providers.

    :param tracer_provider: where spans go (default: the global provider).
    :param meter_provider: where metrics go (default: the global provider).
    :param narration_logger: where narration lines go (default: ``vramcore.narration``).
    :param events_logger: where audit events are logged (default: ``vramcore.events``).
    :param log_events: write a log record for each audit event, besides the span event.
    :param witness: offer a :class:`TracingWitness` (the audit chain's heads on the exported
        telemetry); default from ``VRAMCORE_TRACING_WITNESS`` (on unless ``0``).
    :param witness_readback: exported telemetry the witness can read back (default from
        ``VRAMCORE_TRACING_WITNESS_READBACK``).
    """

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        *,
        narration_logger: logging.Logger | None = None,
        events_logger: logging.Logger | None = None,
        log_events: bool = True,
        witness: bool | None = None,
        witness_readback: os.PathLike[str] | str | None = None,
    ) -> None:
        version = _version()
        self._witness = enabled_from_env(os.environ) if witness is None else witness
        self._witness_readback = (
            readback_from_env(os.environ) if witness_readback is None else Path(witness_readback)
        )
        self._tracer_provider = tracer_provider
        self._provider_from_env = OTEL_PYTHON_TRACER_PROVIDER in os.environ
        self.tracer = trace.get_tracer(
            INSTRUMENTATION_NAME, version, tracer_provider=tracer_provider
        )
        self.meter = metrics.get_meter(INSTRUMENTATION_NAME, version, meter_provider=meter_provider)
        self.instruments = Instruments(self.meter)
        self._narration = (
            narration_logger
            if narration_logger is not None
            else logging.getLogger(NARRATION_LOGGER)
        )
        self._events_logger = events_logger
        self._log_events = log_events

    # -- hooks -----------------------------------------------------------------------------

    @hookimpl(wrapper=True)
    def vramcore_operation(self, op: Operation) -> Generator[None, Any, Any]:
        """Run the step inside a ``vramcore.<name>`` span; record, measure and narrate it."""
        started = time.perf_counter()
        span, token = self._start_span(op)
        try:
            result = yield
        except BaseException as error:
            self._finish(op, span, time.perf_counter() - started, error)
            raise
        else:
            self._finish(op, span, time.perf_counter() - started, None)
            return result
        finally:
            if token is not None:
                context.detach(token)
            if span is not INVALID_SPAN:
                span.end()

    @hookimpl
    def vramcore_audit_sinks(self, context: SinkContext) -> Sequence[AuditSink]:
        """One :class:`TracingSink` per manager."""
        return [TracingSink(context, logger=self._events_logger, log_events=self._log_events)]

    @hookimpl
    def vramcore_audit_witnesses(self, context: SinkContext) -> Sequence[AuditWitness]:
        """A :class:`TracingWitness`: the audit chain's heads go out with the telemetry."""
        if not self._witness:
            return []
        return [
            TracingWitness(self.tracer, logger=self._events_logger, readback=self._witness_readback)
        ]

    @hookimpl
    def vramcore_audit_failure(
        self, sink_name: str, event: AuditEvent, error: BaseException
    ) -> None:
        """Count the failure and mark it on the current span."""
        try:
            self.instruments.record_sink_failure(sink_name, event.event_type, error)
            span = trace.get_current_span()
            if span.is_recording():
                span.add_event(
                    "vramcore.audit.sink_failure",
                    {
                        NAMESPACE + "sink": clean_str(sink_name)[:64],
                        NAMESPACE + "event_type": event.event_type,
                        "error.type": error_type(error),
                    },
                )
        except Exception as exc:  # this hook must not raise
            _log.warning("could not record an audit sink failure: %s", type(exc).__name__)

    # -- internals ---------------------------------------------------------------------------

    def _tracing_off(self) -> bool:
        # No SDK configured: the global provider is still the API's proxy (or a no-op), so a
        # span would record nothing. Checked on every call: an application may configure the
        # SDK after the plugin was loaded, and the next operation is then traced.
        provider = self._tracer_provider
        if provider is None:
            # While no provider is set, trace.get_tracer_provider() looks the environment up
            # on every call (about a microsecond, per operation). The API keeps the provider
            # in a module global that is None until set; read it when it exists, else ask.
            if not self._provider_from_env and getattr(trace, "_TRACER_PROVIDER", self) is None:
                return True
            provider = trace.get_tracer_provider()
        return isinstance(provider, _NO_SDK_PROVIDERS)

    def _start_span(self, op: Operation) -> tuple[Span, Token[Context] | None]:
        if self._tracing_off():
            return INVALID_SPAN, None
        try:
            parent = trace.get_current_span()
            span = self.tracer.start_span(SPAN_PREFIX + op.name, kind=SpanKind.INTERNAL)
            # A non-recording span that only repeats its parent's context (what the API's
            # no-op tracer returns) would change nothing as the current span: skip the attach.
            if span.is_recording() or span.get_span_context() != parent.get_span_context():
                return span, context.attach(trace.set_span_in_context(span))
            return span, None
        except Exception as exc:  # a broken SDK must not stop the step from running
            _log.warning("tracing could not start a span for %s: %s", op.name, type(exc).__name__)
            return INVALID_SPAN, None

    def _finish(
        self, op: Operation, span: Span, seconds: float, error: BaseException | None
    ) -> None:
        # Instrumentation must never change what the step returned or raised.
        try:
            attributes: Mapping[str, object] = op.attributes
            outcome = attributes.get("outcome")
            if not isinstance(outcome, str) or not outcome:
                outcome = "ok"
            if error is not None and outcome == "ok":
                outcome = "error"
            self.instruments.record_operation(op.name, attributes, outcome, seconds, error)
            recording = span.is_recording()
            level = narration_level(op.name, outcome, error)
            narrating = self._narration.isEnabledFor(level)
            if not (recording or narrating):
                return  # the common case without an SDK: nothing else would be seen
            correlation_id = op.correlation_id or baggage_correlation_id()
            exported = operation_attributes(attributes)
            exported[NAMESPACE + "outcome"] = outcome
            if correlation_id:
                exported[CORRELATION_ATTRIBUTE] = correlation_id
            if recording:
                span.set_attributes(exported)
                if error is not None:
                    _record_error(span, error)
                elif outcome in FAILED_OUTCOMES:
                    span.set_status(Status(StatusCode.ERROR, f"{op.name} {outcome}"))
            if narrating:
                line = narration_line(
                    op.name,
                    exported,
                    outcome=outcome,
                    seconds=seconds,
                    error=error,
                    correlation_id=correlation_id,
                )
                self._narration.log(level, "%s", line)
        except Exception as exc:
            _log.warning("tracing could not record %s: %s", op.name, type(exc).__name__)
