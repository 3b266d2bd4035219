"""The telemetry witness: the audit chain's heads on the spans and log records that already
leave the host through OpenTelemetry.

A head (see the audit chain's FORMAT.md, *Heads*) is exported as the attribute
``vramcore.audit.chain_head`` (its canonical JSON text, signed by the log's checkpoint key) with
``vramcore.audit.log_id`` / ``.seq`` / ``.head_reason`` beside it for queries:

* a span event ``vramcore.audit.chain_head`` on the current span (the request that made a
  critical event durable), or a short span of that name when no span is recording (heads
  published by the chain's background thread: periodic checkpoints);
* a log record on the ``vramcore.events`` logger (an OpenTelemetry ``LoggingHandler`` exports
  it with the attributes).

An auditor keeps what the Collector exported (a file exporter's OTLP/JSON, a query result) and
hands it to ``vramcore audit verify DIR --anchor FILE``, which finds the heads in it. A worker
that can read that export back (``VRAMCORE_TRACING_WITNESS_READBACK``) also lets the chain
writer refuse to continue a log the export shows was cut back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from opentelemetry import trace

from vramcore._heads import HEAD_ATTRIBUTE, Head, HeadScan, newest_head
from vramcore.audit import AuditWitness

__all__ = ["HEAD_ATTRIBUTE", "HEAD_EVENT", "TracingWitness", "heads_in_export"]

#: Name of the span event (and of the short span) that carries a head.
HEAD_EVENT = HEAD_ATTRIBUTE

_log = logging.getLogger(__name__)


class TracingWitness(AuditWitness):
    """Exports each head it is given as telemetry; never fails an operation.

    :param tracer: the tracer for the short span used when no span is recording.
    :param logger: where the head's log record goes (``vramcore.events`` by default).
    :param readback: exported telemetry the worker can read (a Collector file exporter's
        output, mounted read-only): :meth:`latest` finds the newest head of a log in it.
    """

    name = "audit_tracing.witness"
    #: Telemetry is best effort: it never fails closed.
    required = False

    def __init__(
        self,
        tracer: trace.Tracer,
        *,
        logger: logging.Logger | None = None,
        readback: Path | None = None,
    ) -> None:
        self._tracer = tracer
        self._logger = logger if logger is not None else logging.getLogger("vramcore.events")
        self.readback = readback
        self.published = 0

    def publish(self, head: Mapping[str, Any]) -> None:
        """Put ``head`` on the current span (or a short one) and on a log record.

        Only a well-formed head (:class:`vramcore._heads.Head`) is exported, as its canonical
        JSON text; anything else is dropped with a warning.
        """
        try:
            parsed = Head.parse(head)
            if parsed is None:
                _log.warning("tracing witness was given something that is not a chain head")
                return
            attributes: dict[str, str | int] = {
                HEAD_ATTRIBUTE: parsed.to_json(),
                "vramcore.audit.log_id": parsed.log_id,
                "vramcore.audit.seq": parsed.seq,
                "vramcore.audit.head_reason": parsed.reason,
            }
            span = trace.get_current_span()
            if span.is_recording():
                span.add_event(HEAD_EVENT, attributes)
            else:
                self._tracer.start_span(HEAD_EVENT, attributes=attributes).end()
            if self._logger.isEnabledFor(logging.INFO):
                self._logger.info(
                    "audit chain head: log %s seq %s (%s)",
                    parsed.log_id,
                    parsed.seq,
                    parsed.reason,
                    extra=attributes,
                )
            self.published += 1
        except Exception as exc:  # telemetry must never fail the audited operation
            _log.warning("tracing witness could not export a head: %s", type(exc).__name__)

    def latest(self, log_id: str) -> Mapping[str, Any] | None:
        """The newest head of ``log_id`` in the readback export that its own key signed.

        Streamed, whatever the export's size; replayed, unsigned or foreign heads appended to
        the export cannot hide the newest authentic one (:func:`vramcore._heads.newest_head`).

        :raises OSError: the export cannot be read (the writer reports it).
        """
        if self.readback is None:
            return None
        head = newest_head(self.readback, log_id)
        return None if head is None else head.to_dict()


def heads_in_export(path: Path) -> Iterator[dict[str, Any]]:
    """Every well-formed head (as a dict, signature not checked) in exported telemetry: NDJSON
    or one JSON document, the head attribute in plain or OTLP/JSON form (the core's
    :class:`vramcore._heads.HeadScan`, streamed).

    :raises OSError: the file cannot be opened, or is not a regular file.
    """
    for found in HeadScan(path):
        if found.head is not None:
            yield found.head.to_dict()


def readback_from_env(env: Mapping[str, str]) -> Path | None:
    """``VRAMCORE_TRACING_WITNESS_READBACK`` as a path, if set."""
    raw = env.get("VRAMCORE_TRACING_WITNESS_READBACK", "").strip()
    return Path(raw) if raw else None


def enabled_from_env(env: Mapping[str, str]) -> bool:
    """Whether ``VRAMCORE_TRACING_WITNESS`` leaves the witness on (default: on)."""
    return env.get("VRAMCORE_TRACING_WITNESS", "1").strip().lower() not in {"0", "false", "off"}
