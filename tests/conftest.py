"""Shared fixtures of the cross-package core tests, and the hook-coverage recorder.

Every plugin manager built while a test of this directory runs reports which hooks it called
with at least one implementation other than the core's defaults. The meta-test in
``test_core_zz_hook_coverage.py`` (moved to the end of the run) checks that every hook of
:mod:`vramcore.hookspecs` was exercised that way by some test.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import vramcore_allocator_mock as mock_plugin

from vramcore import VramManager
from vramcore.plugins import VramcorePluginManager
from vramcore.safetensors import write_safetensors
from vramcore.testing import TEST_TOKEN, CapturePlugin, CapturingSink

#: Hook names called with a non-default implementation while a test in tests/ ran.
EXERCISED_HOOKS: set[str] = set()
_EXERCISED_LOCK = threading.Lock()
_BUILTIN = "vramcore.builtin"
META_TEST = "test_core_zz_hook_coverage.py"


@pytest.fixture(autouse=True)
def _record_hook_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    original = VramcorePluginManager.__init__

    def init(self: VramcorePluginManager) -> None:
        original(self)

        def before(hook_name: str, impls: list[Any], kwargs: dict[str, Any]) -> None:
            if any(impl.plugin_name != _BUILTIN for impl in impls):
                with _EXERCISED_LOCK:
                    EXERCISED_HOOKS.add(hook_name)

        def after(*_args: Any) -> None:
            pass

        self.add_hookcall_monitoring(before, after)

    monkeypatch.setattr(VramcorePluginManager, "__init__", init)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the hook-coverage meta-test after every other test."""
    meta = [item for item in items if item.path.name == META_TEST]
    rest = [item for item in items if item.path.name != META_TEST]
    items[:] = rest + meta


# -- helpers ------------------------------------------------------------------------------


class Snapshot:
    """Capacity accounting of a manager and its mock backend at one moment."""

    def __init__(self, manager: VramManager, backend: mock_plugin.MockBackend) -> None:
        self.used = manager.used_vram()
        self.backend_used = backend.used_bytes()
        self.live = backend.live_allocations

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Snapshot) and vars(self) == vars(other)

    def __repr__(self) -> str:
        return f"Snapshot({vars(self)})"


@pytest.fixture
def snapshot(mock_manager: VramManager, mock_backend: Any) -> Callable[[], Snapshot]:
    """``snapshot()`` records used VRAM and live allocations of ``mock_manager``."""
    return lambda: Snapshot(mock_manager, mock_backend)


@pytest.fixture
def new_manager(
    make_plugin_manager: Callable[..., VramcorePluginManager],
) -> Iterator[Callable[..., VramManager]]:
    """``new_manager(backend, *plugins, sink=..., **kwargs)``: managers closed after the test."""
    made: list[VramManager] = []

    def make(
        backend: Any,
        *plugins: object,
        sink: CapturingSink | None = None,
        token: Any = TEST_TOKEN,
        **kwargs: Any,
    ) -> VramManager:
        extra = list(plugins)
        if sink is not None:
            extra.append(CapturePlugin(sink))
        kwargs.setdefault("worker_id", "test")
        pm = make_plugin_manager(*extra)
        manager = VramManager(token, allocator=backend, plugin_manager=pm, **kwargs)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.close()


def _pattern(nbytes: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-looking bytes (so leaves differ from one another)."""
    import hashlib

    out = bytearray()
    counter = 0
    while len(out) < nbytes:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 64
        counter += 1
    return bytes(out[:nbytes])


#: Tensors of the safetensors model the tests write: name -> (dtype, shape, bytes).
_MODEL_TENSORS: dict[str, tuple[str, list[int], bytes]] = {
    "embed.weight": ("F32", [64, 1024], _pattern(64 * 1024 * 4, 1)),
    "layer0.weight": ("F32", [32, 1024], _pattern(32 * 1024 * 4, 2)),
    "layer0.bias": ("F32", [1024], _pattern(1024 * 4, 3)),
    "head.weight": ("F16", [100, 1000], _pattern(100 * 1000 * 2, 4)),
}


@pytest.fixture
def safetensors_file(tmp_path: Path) -> Path:
    """A safetensors file of several tensors (about 600 KiB, ten leaves)."""
    path = tmp_path / "model.safetensors"
    with path.open("wb") as fh:
        write_safetensors(fh, _MODEL_TENSORS)
    return path


@pytest.fixture
def pattern() -> Callable[..., bytes]:
    """``pattern(nbytes, seed=0)``: deterministic bytes whose leaves all differ."""
    return _pattern


@pytest.fixture
def model_tensors() -> dict[str, tuple[str, list[int], bytes]]:
    """The tensors :func:`safetensors_file` holds: name -> (dtype, shape, raw bytes)."""
    return dict(_MODEL_TENSORS)


@pytest.fixture
def exercised_hooks() -> set[str]:
    """The hooks exercised so far by the tests of this directory (see the module docstring)."""
    return EXERCISED_HOOKS


class MockCli:
    """``vramcore ARGV --allocator mock`` run in this process under a worker token, with an
    audit log under the test's directory: ``cli(*argv) -> (exit code, stdout, stderr)``.

    Every run checks that no string of :attr:`secrets` (the token, and whatever a test adds)
    reaches either stream.
    """

    #: The worker token of the runs (a throwaway, random-looking one).
    TOKEN = "Zq3x9Lr0pT7vK2mN8bW4yC6uH1sA5dFgJ7eQ"

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        self.capsys = capsys
        self.secrets = [self.TOKEN]
        monkeypatch.setenv("VRAMCORE_WORKER_TOKEN", self.TOKEN)
        monkeypatch.setenv("VRAMCORE_AUDIT_LOG", str(tmp_path / "audit"))
        monkeypatch.setenv("VRAMCORE_MOCK_VRAM", "1GiB")

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        from vramcore._cli.cli import main

        code = main([*argv, "--allocator", "mock"])
        out, err = self.capsys.readouterr()
        leaked = [i for i, secret in enumerate(self.secrets) if secret in out + err]
        assert not leaked, f"secret(s) {leaked} of cli.secrets in the output"
        return code, out, err


@pytest.fixture
def cli(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> MockCli:
    """The CLI on the mock backend (:class:`MockCli`)."""
    return MockCli(monkeypatch, tmp_path, capsys)
