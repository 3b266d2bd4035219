"""The example sink passes :class:`vramcore.testing.AuditSinkContract`, the suite every audit
sink passes: a plugin author's contract module is this short."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import vramcore_example_jsonl as example

from vramcore import AuditSink, SinkContext
from vramcore.testing import AuditSinkContract


class _Log:
    """One JSONL file: the sink the contract gets, and its events read back (MACs checked)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.key = b""

    def make_sink(self, context: SinkContext) -> AuditSink:
        self.key = context.derive_key(example.KEY_PURPOSE).export()
        return example.JsonlSink(self.path, self.key)

    def read_back(self, _sink: AuditSink) -> Sequence[Mapping[str, Any]]:
        if not self.path.exists():
            return []
        return list(example.read_events(self.path, self.key))


class TestJsonlSinkContract(AuditSinkContract):
    """The JSONL sink keeps the audit sink contract."""

    @pytest.fixture
    def log(self, tmp_path: Path) -> _Log:
        return _Log(tmp_path / "events.jsonl")

    @pytest.fixture
    def make_sink(self, log: _Log) -> Callable[[SinkContext], AuditSink]:
        return log.make_sink

    @pytest.fixture
    def read_back(self, log: _Log) -> Callable[[AuditSink], Sequence[Mapping[str, Any]]]:
        return log.read_back
