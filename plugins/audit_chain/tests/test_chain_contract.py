"""The audit chain keeps the contracts of its kinds: :class:`ChainSink` passes
:class:`vramcore.testing.AuditSinkContract` and :class:`FileWitness` passes
:class:`vramcore.testing.WitnessContract`.

The sink is checked in every durability mode: each acknowledges a critical event only once it
is on disk (``batched`` and ``mixed`` queue only the other events), so the contract's "a
durable sink has a critical event stored when ``emit`` returns" holds in all three.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from vramcore_audit_chain import ChainConfig, ChainSink, FileWitness
from vramcore_audit_chain import _format as fmt

from vramcore import AuditSink, AuditWitness, SinkContext
from vramcore.testing import AuditSinkContract, WitnessContract


def _stored_events(directory: Path) -> list[Mapping[str, Any]]:
    """The ``data`` of every event record in the log's files, oldest first."""
    events: list[Mapping[str, Any]] = []
    for _, path in fmt.log_files(directory):
        for line in path.read_bytes().splitlines():
            record = json.loads(line)
            if record["type"] == "event":
                events.append(record["data"])
    return events


class TestChainSinkContract(AuditSinkContract):
    """The chain sink, in each durability mode."""

    @pytest.fixture(params=["mixed", "immediate", "batched"])
    def make_sink(
        self, request: pytest.FixtureRequest, tmp_path: Path
    ) -> Callable[[SinkContext], AuditSink]:
        def make(context: SinkContext) -> AuditSink:
            config = ChainConfig(directory=tmp_path / "log", durability=request.param)
            return ChainSink(config, context, witnesses=None)

        return make

    @pytest.fixture
    def read_back(self) -> Callable[[AuditSink], Sequence[Mapping[str, Any]]]:
        def read(sink: AuditSink) -> Sequence[Mapping[str, Any]]:
            assert isinstance(sink, ChainSink)
            return _stored_events(sink.config.directory)

        return read


class TestFileWitnessContract(WitnessContract):
    """The file witness, optional and required, keeps the witness contract."""

    @pytest.fixture(params=[False, True], ids=["optional", "required"])
    def make_witness(
        self, request: pytest.FixtureRequest, tmp_path: Path
    ) -> Callable[[], AuditWitness]:
        return lambda: FileWitness(tmp_path / "heads.ndjson", required=request.param)

    @pytest.fixture
    def corrupt_storage(self, tmp_path: Path) -> Callable[[], None]:
        def corrupt() -> None:
            path = tmp_path / "heads.ndjson"
            lines = path.read_bytes().splitlines(keepends=True)
            torn = lines[-1][: len(lines[-1]) // 2]  # a torn last write
            noise = b"\x00\xff" + secrets.token_bytes(64).replace(b"\n", b"") + b"\n"
            path.write_bytes(b"".join(lines[:-1]) + noise + b'{"log_id": 7}\n' + torn)

        return corrupt
