"""OpenTelemetry traces, metrics and log narration for vramcore.

Installed, this plugin (entry point ``audit_tracing``) wraps every manager operation in a
span, turns audit events into span events and log records, records metrics, and writes one
narration line per operation to the ``vramcore.narration`` logger. It is also an audit
witness: the audit chain's signed heads ride on the exported telemetry, so an auditor can
prove the log was not cut back (``vramcore audit verify DIR --anchor EXPORT``). It uses the global
OpenTelemetry providers: configure the SDK (or nothing, and it costs next to nothing).

To use providers of your own, register a :class:`TracingPlugin` instead::

    pm = vramcore.plugins.get_plugin_manager(
        [TracingPlugin(tracer_provider=tp, meter_provider=mp)], load_entrypoints=False
    )

``opentelemetry`` is imported on first use, not when the plugin is discovered.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING, Any

from vramcore import Setting
from vramcore.hookspecs import hookimpl
from vramcore_audit_tracing._attributes import CORRELATION_BAGGAGE_KEY
from vramcore_audit_tracing._narration import EVENTS_LOGGER, NARRATION_LOGGER

if TYPE_CHECKING:
    from vramcore.audit import AuditSink, AuditWitness, SinkContext
    from vramcore.events import AuditEvent
    from vramcore.narration import Operation
    from vramcore_audit_tracing._plugin import TracingPlugin
    from vramcore_audit_tracing._sink import TracingSink
    from vramcore_audit_tracing._witness import TracingWitness

__all__ = [
    "CORRELATION_BAGGAGE_KEY",
    "EVENTS_LOGGER",
    "NARRATION_LOGGER",
    "TracingPlugin",
    "TracingSink",
    "TracingWitness",
    "default_plugin",
]

#: Its sink keeps no lasting record (``vramcore doctor`` reads this without building it).
SINKS_DURABLE = False

_lock = threading.Lock()
_default: TracingPlugin | None = None


def default_plugin() -> TracingPlugin:
    """The :class:`TracingPlugin` behind this module's hooks (global OpenTelemetry providers)."""
    global _default
    plugin = _default
    if plugin is None:
        with _lock:
            if _default is None:
                from vramcore_audit_tracing._plugin import TracingPlugin

                _default = TracingPlugin()
            plugin = _default
    return plugin


def __getattr__(name: str) -> Any:
    """Import the OpenTelemetry-backed classes on first access."""
    if name == "TracingPlugin":
        from vramcore_audit_tracing._plugin import TracingPlugin

        return TracingPlugin
    if name == "TracingSink":
        from vramcore_audit_tracing._sink import TracingSink

        return TracingSink
    if name == "TracingWitness":
        from vramcore_audit_tracing._witness import TracingWitness

        return TracingWitness
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hookimpl(wrapper=True)
def vramcore_operation(op: Operation) -> Generator[None, Any, Any]:
    """Trace, measure and narrate ``op`` (see :meth:`TracingPlugin.vramcore_operation`)."""
    return (yield from default_plugin().vramcore_operation(op))


@hookimpl
def vramcore_audit_sinks(context: SinkContext) -> Sequence[AuditSink]:
    """A tracing sink for each manager (see :meth:`TracingPlugin.vramcore_audit_sinks`)."""
    return default_plugin().vramcore_audit_sinks(context)


@hookimpl
def vramcore_audit_witnesses(context: SinkContext) -> Sequence[AuditWitness]:
    """The telemetry witness (see :meth:`TracingPlugin.vramcore_audit_witnesses`)."""
    return default_plugin().vramcore_audit_witnesses(context)


@hookimpl
def vramcore_audit_failure(sink_name: str, event: AuditEvent, error: BaseException) -> None:
    """Count an audit sink failure (see :meth:`TracingPlugin.vramcore_audit_failure`)."""
    default_plugin().vramcore_audit_failure(sink_name, event, error)


@hookimpl
def vramcore_settings() -> Sequence[Setting]:
    """``VRAMCORE_TRACING_WITNESS`` and ``VRAMCORE_TRACING_WITNESS_READBACK``."""
    return [
        Setting(
            key="tracing_witness",
            help="publish the audit chain's heads on the telemetry",
            kind="bool",
            activates="witness",
            default="true",
        ),
        Setting(
            key="tracing_witness_readback",
            help="an export the witness reads heads back from",
            kind="path",
            default="unset",
        ),
    ]
