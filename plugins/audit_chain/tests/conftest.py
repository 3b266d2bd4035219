"""Helpers for the audit chain tests: build small logs quickly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from vramcore_audit_chain import ChainConfig, ChainSink, load_key_file, verify_log

from vramcore.audit import SinkContext
from vramcore.seal import WorkerToken
from vramcore.testing import sample_events

TOKEN = "IJVcA61tsmUz68lHOFiu8zOYL-x4pK2R8Hq1zuWrGEQ"


def context(token: str = TOKEN) -> SinkContext:
    return SinkContext.from_token(
        WorkerToken(token), worker_id="w1", device=0, scope="vramcore-audit-chain:audit_chain"
    )


def write_log(directory: Path, n: int = 40, token: str = TOKEN, **settings: Any) -> ChainSink:
    settings.setdefault("durability", "batched")
    sink = ChainSink(ChainConfig(directory=directory, **settings), context(token))
    for event in sample_events(n):
        sink.emit(event)
    sink.close()
    return sink


def verify(directory: Path, **kwargs: Any) -> Any:
    key = load_key_file(directory / "auditor-initial.key")
    return verify_log([directory], initial_key=key.initial_key, **kwargs)


@pytest.fixture
def chain_dir(tmp_path: Path) -> Path:
    return tmp_path / "log"


@pytest.fixture
def make_log(tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(1000))

    def make(n: int = 40, **settings: Any) -> Path:
        directory = tmp_path / f"log{next(counter)}"
        write_log(directory, n, **settings)
        return directory

    return make


@pytest.fixture
def chain() -> Any:
    """The helpers above, for tests (conftest cannot be imported under importlib mode)."""
    import types

    return types.SimpleNamespace(
        TOKEN=TOKEN,
        context=context,
        sample_events=sample_events,
        write_log=write_log,
        verify=verify,
    )
