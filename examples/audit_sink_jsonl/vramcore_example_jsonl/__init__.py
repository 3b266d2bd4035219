"""An example vramcore audit sink: one JSON line per event, each line MACed.

Configured by ``VRAMCORE_EXAMPLE_JSONL`` (the file to append to); unset, the plugin provides
no sink, so installing it changes nothing. Each line is ``{"event": {...}, "mac": "hex"}``
where ``mac`` is HMAC-SHA256 of the event's canonical JSON under a key derived for this sink
only (``SinkContext.derive_key("example_jsonl/mac")``): the sink never sees the worker token.

Read the file back with :func:`read_events`, which checks every MAC.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from vramcore import AuditSink, Setting, SinkContext, hookimpl
from vramcore.errors import ConfigError, IntegrityViolation
from vramcore.events import AuditEvent

__all__ = ["ENV_VAR", "KEY_PURPOSE", "JsonlSink", "read_events", "vramcore_audit_sinks"]

#: The variable naming the file to append to.
ENV_VAR = "VRAMCORE_EXAMPLE_JSONL"
#: The purpose the MAC key is derived for (scoped to this plugin).
KEY_PURPOSE = "example_jsonl/mac"


class JsonlSink(AuditSink):
    """Append each event as one MACed JSON line; ``fsync`` after critical events.

    :param path: the file to append to (created with mode 0600).
    :param key: the MAC key (from :meth:`vramcore.SinkContext.derive_key`).
    """

    name = "example_jsonl"
    durable = True  # a file on disk: audit="required" may rely on it

    def __init__(self, path: Path, key: bytes) -> None:
        self.path = path
        self._key = key
        self._written = 0
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(f"{ENV_VAR}={path}: cannot open it ({exc.strerror})") from None
        self._file = os.fdopen(fd, "a", encoding="utf-8")

    def emit(self, event: AuditEvent) -> None:
        """Write one line. Called from this sink's own delivery thread, one event at a time."""
        body = event.to_json()
        mac = hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()
        self._file.write(f'{{"event":{body},"mac":"{mac}"}}\n')
        self._file.flush()
        if event.critical:  # sealed, verification failed, policy violation: make it last
            os.fsync(self._file.fileno())
        self._written += 1

    def flush(self) -> None:
        """Push buffered lines to disk."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Flush and close the file (called once, when the manager closes)."""
        if not self._file.closed:
            self.flush()
            self._file.close()

    def report(self) -> Mapping[str, Any]:
        """What ``vramcore seal`` and ``vramcore demo`` print for this sink."""
        return {"path": str(self.path), "written": self._written}


@hookimpl
def vramcore_audit_sinks(context: SinkContext) -> Sequence[AuditSink]:
    """The sink, when ``VRAMCORE_EXAMPLE_JSONL`` names a file; none otherwise."""
    target = os.environ.get(ENV_VAR)
    if not target:
        return []
    key = context.derive_key(KEY_PURPOSE).export()
    return [JsonlSink(Path(target), key)]


def read_events(path: Path, key: bytes) -> Iterator[dict[str, Any]]:
    """Yield each event dict of ``path``, checking its MAC.

    :raises IntegrityViolation: a line is not valid JSON or its MAC does not match.
    """
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            try:
                record = json.loads(line)
                body = json.dumps(record["event"], sort_keys=True, separators=(",", ":"))
                mac = record["mac"]
            except (ValueError, KeyError, TypeError):
                raise IntegrityViolation(f"{path}:{number}: not an event line") from None
            expected = hmac.new(key, body.encode(), hashlib.sha256).hexdigest()
            if not isinstance(mac, str) or not hmac.compare_digest(mac, expected):
                raise IntegrityViolation(f"{path}:{number}: MAC mismatch (line changed)")
            yield record["event"]


@hookimpl
def vramcore_settings() -> Sequence[Setting]:
    """``VRAMCORE_EXAMPLE_JSONL``, which turns the sink on."""
    return [
        Setting(
            key="example_jsonl",
            help="file the example sink appends events to",
            kind="path",
            activates="sink",
            default="unset: no sink",
        ),
    ]
