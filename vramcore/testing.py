"""Test helpers and a pytest plugin (entry point ``pytest11``) for vramcore and its plugins.

Fixtures:

``make_plugin_manager``
    ``make_plugin_manager(*plugins, entrypoints=False)`` composes a fresh plugin manager from
    the given plugin objects (modules or instances), nothing installed needed. The mock
    allocator plugin is added when importable, unless ``mock=False``.
``audit_capture``
    A :class:`CapturingSink` that records every event.
``mock_backend``
    A fresh ``MockBackend`` (1 device, 1 GiB) for fault injection.
``mock_manager``
    A :class:`~vramcore.VramManager` on ``mock_backend`` delivering to ``audit_capture``;
    closed after the test.

Outside pytest, :class:`CapturingSink` and :class:`CapturePlugin` work on their own.
"""

from __future__ import annotations

import importlib
import inspect
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from vramcore.audit import AuditSink, SinkContext
from vramcore.events import AuditEvent
from vramcore.hookspecs import hookimpl
from vramcore.plugins import VramcorePluginManager, get_plugin_manager

__all__ = [
    "TEST_TOKEN",
    "CapturePlugin",
    "CapturingSink",
    "FailingSink",
    "audit_capture",
    "make_plugin_manager",
    "mock_backend",
    "mock_manager",
    "undocumented_public_names",
]

#: A worker token for tests; never use a fixed token in production.
TEST_TOKEN = "vramcore-test-token-0123456789abcdef"  # noqa: S105 - a fixed test token


class CapturingSink(AuditSink):
    """Keeps every event in :attr:`events`, in order (thread-safe).

    Counts as durable, so a manager with only this sink satisfies ``audit="required"`` in
    tests; it stands in for a real sink such as the audit chain.
    """

    name = "capture"

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []
        self.closed = False
        self.flushed = 0
        self._lock = threading.Lock()

    def emit(self, event: AuditEvent) -> None:
        """Record the event."""
        with self._lock:
            self.events.append(event)

    def flush(self) -> None:
        """Count flushes."""
        self.flushed += 1

    def close(self) -> None:
        """Mark closed."""
        self.closed = True

    def of_type(self, event_type: str) -> list[AuditEvent]:
        """The captured events whose ``event_type`` is ``event_type``."""
        with self._lock:
            return [e for e in self.events if e.event_type == event_type]

    def types(self) -> list[str]:
        """The ``event_type`` of every captured event, in order."""
        with self._lock:
            return [e.event_type for e in self.events]


class FailingSink(AuditSink):
    """A sink that raises ``OSError`` on every event (or only on ``event_types``)."""

    name = "failing"

    def __init__(self, event_types: Sequence[str] | None = None) -> None:
        self.event_types = set(event_types) if event_types is not None else None

    def emit(self, event: AuditEvent) -> None:
        """Fail (for the selected event types)."""
        if self.event_types is None or event.event_type in self.event_types:
            raise OSError("disk full (injected)")


class CapturePlugin:
    """A plugin object that gives each starting manager the given sinks."""

    def __init__(self, *sinks: AuditSink) -> None:
        self.sinks = list(sinks)
        self.contexts: list[SinkContext] = []

    @hookimpl
    def vramcore_audit_sinks(self, context: SinkContext) -> Sequence[AuditSink]:
        """Hand out the sinks."""
        self.contexts.append(context)
        return self.sinks


def undocumented_public_names(module_name: str) -> list[str]:
    """Names in ``module_name``'s ``__all__`` (and their public methods) without a docstring.

    Also lists ``"<module>"`` when the module itself has none. Plugin authors use it in a
    one-line test; ``AttributeError`` means ``__all__`` names something that does not exist.
    """
    module = importlib.import_module(module_name)
    missing = [] if inspect.getdoc(module) else ["<module>"]
    for attr in getattr(module, "__all__", ()):
        obj = getattr(module, attr)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if not inspect.getdoc(obj):
            missing.append(attr)
        if inspect.isclass(obj):
            for name, member in vars(obj).items():
                target = member.fget if isinstance(member, property) else member
                if name.startswith("_") or not (callable(target) or isinstance(member, property)):
                    continue
                if not inspect.getdoc(target):
                    missing.append(f"{attr}.{name}")
    return missing


def _mock_plugin() -> Any:
    try:
        import vramcore_allocator_mock
    except ImportError:  # the mock is a separate distribution
        return None
    return vramcore_allocator_mock


@pytest.fixture
def make_plugin_manager() -> Callable[..., VramcorePluginManager]:
    """Compose a plugin manager from plugin objects (see the module docstring)."""

    def make(
        *plugins: object, mock: bool = True, entrypoints: bool = False
    ) -> VramcorePluginManager:
        chosen = list(plugins)
        mock_plugin = _mock_plugin() if mock else None
        if mock_plugin is not None and mock_plugin not in chosen:
            chosen.insert(0, mock_plugin)
        return get_plugin_manager(chosen, load_entrypoints=entrypoints, env={})

    return make


@pytest.fixture
def audit_capture() -> CapturingSink:
    """A capturing audit sink."""
    return CapturingSink()


@pytest.fixture
def mock_backend() -> Any:
    """A fresh mock backend: one device of 1 GiB."""
    mock = _mock_plugin()
    if mock is None:
        pytest.skip("vramcore-allocator-mock is not installed")
    return mock.MockBackend(devices=1, capacity=1 << 30)


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


def _gpu_available() -> str | None:
    """``None`` when a CUDA GPU is visible, else why not (for the ``gpu`` marker's skip)."""
    import shutil
    import subprocess

    if os.environ.get("VRAMCORE_FORCE_GPU_TESTS") == "1":
        return None
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "no NVIDIA driver (nvidia-smi not found); run scripts/gpu-check on a GPU machine"
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"nvidia-smi failed: {exc}"
    if out.returncode != 0 or "GPU" not in out.stdout:
        return "nvidia-smi lists no GPU"
    return None


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``gpu`` marker for any project using this plugin."""
    config.addinivalue_line("markers", "gpu: needs a real CUDA GPU (skipped with a reason)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu``-marked tests, saying why, when no GPU is visible."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    reason = _gpu_available()
    if reason is not None:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=f"gpu test: {reason}"))
