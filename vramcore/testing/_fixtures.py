"""The fixtures of the ``vramcore.testing`` pytest plugin and the mock found by entry point."""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from vramcore.plugins import VramcorePluginManager, get_plugin_manager
from vramcore.testing._sinks import CapturePlugin, CapturingSink

__all__ = [
    "TEST_TOKEN",
    "audit_capture",
    "make_plugin_manager",
    "mock_backend",
    "mock_manager",
    "mock_plugin",
    "require_mock",
]

#: A worker token for tests; never use a fixed token in production.
TEST_TOKEN = "TG4Yzm8JpEirVrM0Go0HPsK_8bDf9JqirISehN7dWQc"  # noqa: S105 - a fixed test token (random, as tokens must be)


@functools.cache
def mock_plugin() -> Any:
    """The mock allocator plugin module, loaded from its ``vramcore`` entry point (``mock``).

    ``None`` when ``vramcore-allocator-mock`` is not installed (or fails to load).
    """
    for entry_point in importlib.metadata.entry_points(group="vramcore", name="mock"):
        try:
            return entry_point.load()
        except Exception:  # a broken install counts as not installed
            return None
    return None


def require_mock() -> Any:
    """The mock plugin module; skips the calling test, saying what to install, without it."""
    plugin = mock_plugin()
    if plugin is None:
        pytest.skip(
            "vramcore-allocator-mock is not installed (from a clone of the vramcore repository: "
            "pip install ./plugins/allocator_mock)"
        )
    return plugin


@pytest.fixture
def make_plugin_manager() -> Callable[..., VramcorePluginManager]:
    """Compose a plugin manager from plugin objects (see the module docstring)."""

    def make(
        *plugins: object, mock: bool = True, entrypoints: bool = False
    ) -> VramcorePluginManager:
        chosen = list(plugins)
        plugin = mock_plugin() if mock else None
        if plugin is not None and plugin not in chosen:
            chosen.insert(0, plugin)
        return get_plugin_manager(chosen, load_entrypoints=entrypoints, env={})

    return make


@pytest.fixture
def audit_capture() -> CapturingSink:
    """A capturing audit sink."""
    return CapturingSink()


@pytest.fixture
def mock_backend(request: pytest.FixtureRequest) -> Any:
    """A fresh mock backend: one device of 1 GiB (options from an indirect parameter)."""
    options = dict(getattr(request, "param", None) or {})
    options.setdefault("devices", 1)
    options.setdefault("capacity", 1 << 30)
    return require_mock().MockBackend(**options)


@pytest.fixture
def mock_manager(
    make_plugin_manager: Callable[..., VramcorePluginManager],
    audit_capture: CapturingSink,
    mock_backend: Any,
) -> Iterator[Any]:
    """A VramManager on ``mock_backend`` that delivers every event to ``audit_capture``."""
    from vramcore.manager import VramManager

    pm = make_plugin_manager(CapturePlugin(audit_capture))
    manager = VramManager(TEST_TOKEN, allocator=mock_backend, plugin_manager=pm, worker_id="test")
    try:
        yield manager
    finally:
        manager.close()
