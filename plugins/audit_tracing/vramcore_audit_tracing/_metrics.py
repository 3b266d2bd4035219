"""The plugin's OpenTelemetry instruments and the per-device VRAM state its gauges observe.

Metric attributes are low-cardinality on purpose (device, backend, outcome, error type): a
shard id or correlation id would make one time series per shard or request.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from vramcore_audit_tracing._attributes import NAMESPACE, clean_str, error_type

__all__ = ["DURATION_BUCKETS", "DeviceMemory", "Instruments"]

#: Histogram boundaries for operation durations, in seconds (1 ms .. 2 min).
DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)

_DEVICE = NAMESPACE + "device"
_DEVICE_NAME = NAMESPACE + "device_name"


class DeviceMemory:
    """Last known VRAM use and size per device, for the observable gauges.

    ``used`` comes from an operation's ``vram_used`` attribute when the manager reports it;
    otherwise it is kept from the sizes of successful allocations and deallocations. ``total``
    comes from ``vram_total``. Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._used: dict[int, int] = {}
        self._total: dict[int, int] = {}
        self._names: dict[int, str] = {}

    def update(self, name: str, attributes: Mapping[str, object], outcome: str) -> None:
        """Take what a finished operation says about its device's memory."""
        device = attributes.get("device")
        if not isinstance(device, int) or isinstance(device, bool):
            return
        used = attributes.get("vram_used")
        total = attributes.get("vram_total")
        nbytes = attributes.get("nbytes")
        device_name = attributes.get("device_name")
        with self._lock:
            if isinstance(device_name, str) and device_name:
                self._names[device] = clean_str(device_name)[:256]
            if isinstance(total, int) and not isinstance(total, bool):
                self._total[device] = total
            if isinstance(used, int) and not isinstance(used, bool):
                self._used[device] = used
            elif outcome == "ok" and isinstance(nbytes, int) and name in ("allocate", "deallocate"):
                delta = nbytes if name == "allocate" else -nbytes
                self._used[device] = max(0, self._used.get(device, 0) + delta)

    def _attributes(self, device: int) -> dict[str, str | int]:
        attrs: dict[str, str | int] = {_DEVICE: device}
        name = self._names.get(device)
        if name:
            attrs[_DEVICE_NAME] = name
        return attrs

    def observe_used(self, _options: CallbackOptions) -> Iterable[Observation]:
        """Gauge callback: bytes in use per device."""
        with self._lock:
            return [Observation(v, self._attributes(d)) for d, v in sorted(self._used.items())]

    def observe_total(self, _options: CallbackOptions) -> Iterable[Observation]:
        """Gauge callback: device memory size per device."""
        with self._lock:
            return [Observation(v, self._attributes(d)) for d, v in sorted(self._total.items())]


class Instruments:
    """Every instrument the plugin records, created on one meter.

    :param meter: the meter to create them on.
    """

    def __init__(self, meter: Meter) -> None:
        self.memory = DeviceMemory()
        self.seal_duration = meter.create_histogram(
            "vramcore.seal.duration",
            unit="s",
            description="Time to seal a shard: allocate, copy into VRAM, digest and sign.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.verify_duration = meter.create_histogram(
            "vramcore.verify.duration",
            unit="s",
            description="Time to verify a seal: check the signature, recompute the digest.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.sealed_bytes = meter.create_counter(
            "vramcore.seal.bytes", unit="By", description="Bytes sealed into VRAM."
        )
        self.verified_bytes = meter.create_counter(
            "vramcore.verify.bytes", unit="By", description="Bytes whose seal verified."
        )
        self.verify_failures = meter.create_counter(
            "vramcore.verify.failures",
            unit="{failure}",
            description="Verifications that did not succeed (digest mismatch or error).",
        )
        self.sink_failures = meter.create_counter(
            "vramcore.audit.sink_failures",
            unit="{failure}",
            description="Audit events an audit sink failed to record.",
        )
        meter.create_observable_gauge(
            "vramcore.vram.used",
            callbacks=[self.memory.observe_used],
            unit="By",
            description="Device memory in use, per device.",
        )
        meter.create_observable_gauge(
            "vramcore.vram.total",
            callbacks=[self.memory.observe_total],
            unit="By",
            description="Device memory size, per device.",
        )

    def record_operation(
        self,
        name: str,
        attributes: Mapping[str, object],
        outcome: str,
        seconds: float,
        error: BaseException | None,
    ) -> None:
        """Record what one finished operation contributes to the metrics."""
        if name in ("allocate", "deallocate") or "vram_total" in attributes:
            self.memory.update(name, attributes, outcome)
        if name not in ("seal", "verify"):
            return
        labels: dict[str, str | int] = {NAMESPACE + "outcome": outcome}
        device = attributes.get("device")
        if isinstance(device, int) and not isinstance(device, bool):
            labels[_DEVICE] = device
        backend = attributes.get("backend")
        if isinstance(backend, str) and backend:
            labels[NAMESPACE + "backend"] = clean_str(backend)[:64]
        if error is not None:
            labels["error.type"] = error_type(error)
        nbytes = attributes.get("nbytes")
        ok = outcome == "ok" and error is None
        if name == "seal":
            self.seal_duration.record(seconds, labels)
            if ok and isinstance(nbytes, int):
                self.sealed_bytes.add(nbytes, labels)
        else:
            self.verify_duration.record(seconds, labels)
            if ok:
                if isinstance(nbytes, int):
                    self.verified_bytes.add(nbytes, labels)
            else:
                self.verify_failures.add(1, labels)

    def record_sink_failure(self, sink_name: str, event_type: str, error: BaseException) -> None:
        """Count one audit sink failure."""
        self.sink_failures.add(
            1,
            {
                NAMESPACE + "sink": sink_name[:64],
                NAMESPACE + "event_type": event_type[:64],
                "error.type": error_type(error),
            },
        )
