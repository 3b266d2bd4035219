"""Fixtures: a TracingPlugin on SDK providers with in-memory exporters, fresh per test."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from vramcore_audit_tracing import TracingPlugin

from vramcore.plugins import VramcorePluginManager, get_plugin_manager


class Telemetry:
    """SDK providers, their in-memory readers and the plugin wired to them."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.plugin = TracingPlugin(
            tracer_provider=self.tracer_provider, meter_provider=self.meter_provider
        )
        self.tracer = self.tracer_provider.get_tracer("test")

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def span(self, name: str, index: int = 0) -> ReadableSpan:
        found = [s for s in self.spans() if s.name == name]
        assert len(found) > index, f"no span {name}[{index}] in {[s.name for s in self.spans()]}"
        return found[index]

    def metrics(self) -> dict[str, list[Any]]:
        """Metric name -> its data points (empty dict when nothing was recorded)."""
        data = self.reader.get_metrics_data()
        out: dict[str, list[Any]] = {}
        if data is None:
            return out
        for resource_metrics in data.resource_metrics:
            for scope in resource_metrics.scope_metrics:
                for metric in scope.metrics:
                    out.setdefault(metric.name, []).extend(metric.data.data_points)
        return out

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    t = Telemetry()
    yield t
    t.shutdown()


@pytest.fixture
def traced_pm(telemetry: Telemetry) -> VramcorePluginManager:
    return get_plugin_manager([telemetry.plugin], load_entrypoints=False)
