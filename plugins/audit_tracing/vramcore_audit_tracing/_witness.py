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

import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from opentelemetry import trace

from vramcore.audit import AuditWitness

__all__ = ["HEAD_ATTRIBUTE", "HEAD_EVENT", "TracingWitness", "heads_in_export"]

#: The attribute that carries a head's JSON text (the audit chain reads the same name).
HEAD_ATTRIBUTE = "vramcore.audit.chain_head"
#: Name of the span event (and of the short span) that carries a head.
HEAD_EVENT = "vramcore.audit.chain_head"

_log = logging.getLogger(__name__)
#: The members a head has (anything else is not exported).
_HEAD_KEYS = frozenset(
    {"format", "log_id", "seq", "epoch", "mac", "ts", "reason", "public_key", "sig"}
)
_MAX_EXPORT_BYTES = 64 * 1024 * 1024
_MAX_LINE = 1 << 20
_MAX_NODES = 1_000_000


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
        """Put ``head`` on the current span (or a short one) and on a log record."""
        try:
            clean = {
                k: v
                for k, v in head.items()
                if k in _HEAD_KEYS and type(v) in (str, int) and len(str(v)) <= 256
            }
            text = json.dumps(clean, sort_keys=True, separators=(",", ":"))
            attributes: dict[str, str | int] = {HEAD_ATTRIBUTE: text}
            for key, name in (("log_id", "log_id"), ("seq", "seq"), ("reason", "head_reason")):
                value = head.get(key)
                if isinstance(value, str | int) and not isinstance(value, bool):
                    attributes["vramcore.audit." + name] = value
            span = trace.get_current_span()
            if span.is_recording():
                span.add_event(HEAD_EVENT, attributes)
            else:
                self._tracer.start_span(HEAD_EVENT, attributes=attributes).end()
            if self._logger.isEnabledFor(logging.INFO):
                self._logger.info(
                    "audit chain head: log %s seq %s (%s)",
                    attributes.get("vramcore.audit.log_id", "?"),
                    attributes.get("vramcore.audit.seq", "?"),
                    attributes.get("vramcore.audit.head_reason", "?"),
                    extra=attributes,
                )
            self.published += 1
        except Exception as exc:  # telemetry must never fail the audited operation
            _log.warning("tracing witness could not export a head: %s", type(exc).__name__)

    def latest(self, log_id: str) -> Mapping[str, Any] | None:
        """The head of ``log_id`` with the highest ``seq`` in the readback export, if any."""
        if self.readback is None:
            return None
        best: dict[str, Any] | None = None
        for head in heads_in_export(self.readback):
            if head.get("log_id") != log_id or type(head.get("seq")) is not int:
                continue
            if best is None or head["seq"] > best["seq"]:
                best = head
        return best


def heads_in_export(path: Path) -> Iterator[dict[str, Any]]:
    """Every head (as a dict) in exported telemetry: NDJSON or one JSON document, with the
    head attribute in plain (``{"vramcore.audit.chain_head": "..."}``) or OTLP/JSON form
    (``{"key": ..., "value": {"stringValue": ...}}``). Unreadable parts are skipped.

    :raises OSError: the file cannot be opened, or is not a regular file.
    """
    with _open_regular(path) as f:
        data = f.read(_MAX_EXPORT_BYTES + 1)
    if len(data) > _MAX_EXPORT_BYTES:
        raise OSError(f"{path} is larger than {_MAX_EXPORT_BYTES} bytes")
    document = _loads(data)
    if document is not None:
        yield from _walk(document)
        return
    for line in data.split(b"\n"):
        if len(line) <= _MAX_LINE:
            value = _loads(line)
            if value is not None:
                yield from _walk(value)


def _open_regular(path: Path) -> Any:
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _loads(data: bytes | str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def _walk(value: Any) -> Iterator[dict[str, Any]]:
    stack = [value]
    seen = 0
    while stack and seen < _MAX_NODES:
        node = stack.pop()
        seen += 1
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        text = node.get(HEAD_ATTRIBUTE)
        if text is None and node.get("key") == HEAD_ATTRIBUTE:
            inner = node.get("value")
            text = inner.get("stringValue") if isinstance(inner, dict) else None
        if isinstance(text, str):
            head = _loads(text) if len(text) <= 4096 else None
            if isinstance(head, dict):
                yield head
            continue
        stack.extend(node.values())


def readback_from_env(env: Mapping[str, str]) -> Path | None:
    """``VRAMCORE_TRACING_WITNESS_READBACK`` as a path, if set."""
    raw = env.get("VRAMCORE_TRACING_WITNESS_READBACK", "").strip()
    return Path(raw) if raw else None


def enabled_from_env(env: Mapping[str, str]) -> bool:
    """Whether ``VRAMCORE_TRACING_WITNESS`` leaves the witness on (default: on)."""
    return env.get("VRAMCORE_TRACING_WITNESS", "1").strip().lower() not in {"0", "false", "off"}
