"""The tracing plugin keeps the contracts of its kinds: :class:`TracingSink` passes
:class:`vramcore.testing.AuditSinkContract` (it says it is not durable, so the durability
and fail-closed parts do not apply) and :class:`TracingWitness` passes
:class:`vramcore.testing.WitnessContract`.

The contract emits events outside any span, so the sink's record of each is its log record:
the attributes an OpenTelemetry ``LoggingHandler`` exports. They are read back from a handler
on a logger of the test's own.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from vramcore_audit_tracing import TracingSink, TracingWitness

from vramcore import AuditSink, AuditWitness, SinkContext
from vramcore.testing import AuditSinkContract, WitnessContract

_PREFIX = "vramcore."
_loggers = itertools.count()


class _Records(logging.Handler):
    """A logger of the test's own for the sink, and every record it writes there."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.logger = logging.getLogger(f"vramcore.events.contract{next(_loggers)}")
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def detach(self) -> None:
        self.logger.removeHandler(self)

    def make_sink(self, context: SinkContext) -> AuditSink:
        return TracingSink(context, logger=self.logger)

    def events(self, _sink: AuditSink) -> list[Mapping[str, Any]]:
        """Each record's scalar ``vramcore.*`` attributes, as event fields."""
        return [
            {
                key.removeprefix(_PREFIX): value
                for key, value in vars(record).items()
                if key.startswith(_PREFIX) and isinstance(value, str | int)
            }
            for record in self.records
        ]


class TestTracingSinkContract(AuditSinkContract):
    """The tracing sink keeps the audit sink contract."""

    @pytest.fixture
    def records(self) -> Iterator[_Records]:
        handler = _Records()
        yield handler
        handler.detach()

    @pytest.fixture
    def make_sink(self, records: _Records) -> Callable[[SinkContext], AuditSink]:
        return records.make_sink

    @pytest.fixture
    def read_back(self, records: _Records) -> Callable[[AuditSink], Sequence[Mapping[str, Any]]]:
        return records.events


class _FileExporter(SpanExporter):
    """What a Collector's file exporter keeps: one JSON line of attributes per span."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [json.dumps(dict(span.attributes or {})) + "\n" for span in spans]
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.writelines(lines)
        return SpanExportResult.SUCCESS


class _Telemetry:
    """A tracer exporting to a file, and witnesses that read that file back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(_FileExporter(path)))

    def witness(self) -> AuditWitness:
        return TracingWitness(self.provider.get_tracer("contract"), readback=self.path)

    def corrupt(self) -> None:
        with self.path.open("ab") as f:
            f.write(b'\x00\xff{"vramcore.audit.chain_head": "{\\"log_id\\": 7"}\n{"trunc')


class TestTracingWitnessContract(WitnessContract):
    """The telemetry witness, read back from exported telemetry, keeps the witness contract."""

    @pytest.fixture
    def telemetry(self, tmp_path: Path) -> Iterator[_Telemetry]:
        telemetry = _Telemetry(tmp_path / "export.ndjson")
        yield telemetry
        telemetry.provider.shutdown()

    @pytest.fixture
    def make_witness(self, telemetry: _Telemetry) -> Callable[[], AuditWitness]:
        return telemetry.witness

    @pytest.fixture
    def corrupt_storage(self, telemetry: _Telemetry) -> Callable[[], None]:
        return telemetry.corrupt
