"""Test helpers and a pytest plugin (entry point ``pytest11``) for vramcore and its plugins.

Fixtures:

``make_plugin_manager``
    ``make_plugin_manager(*plugins, entrypoints=False)`` composes a fresh plugin manager from
    the given plugin objects (modules or instances), nothing installed needed. The mock
    allocator plugin is added when installed, unless ``mock=False``.
``audit_capture``
    A :class:`CapturingSink` that records every event.
``mock_backend``
    A fresh ``MockBackend`` (1 device, 1 GiB) for fault injection. Parametrize it indirectly
    with the mock's options to get a stricter one:
    ``@pytest.mark.parametrize("mock_backend", [{"async_copies": True}], indirect=True)``.
    Skipped, with the reason, when ``vramcore-allocator-mock`` is not installed.
``mock_manager``
    A :class:`~vramcore.VramManager` on ``mock_backend`` delivering to ``audit_capture``;
    closed after the test.

The mock is reached through its ``vramcore`` entry point (``mock``), never imported by name.

Conformance suites, one per plugin kind, that a plugin's test module subclasses (like keyring's
backend tests), supplying the fixtures each docstring names: :class:`BackendContract` (an
allocator backend: a ``backend`` fixture), :class:`AuditSinkContract` (an audit sink:
``make_sink`` and ``read_back``) and :class:`WitnessContract` (an audit witness:
``make_witness``).

Marker: ``@pytest.mark.vramcore_gpu`` marks a test that needs a real CUDA GPU; without one it
is skipped with the reason. The plugin only acts on tests carrying that namespaced marker, so
installing vramcore changes nothing for other projects' tests.

Events: :func:`sample_events` gives one event of every kind, or a stream of ``n`` events, for
tests of sinks, witnesses and encoders.

Model directories: :func:`write_model_dir` writes a small two-shard model with its index,
:func:`publisher_keypair` a fresh EC key pair as PEM files, and :func:`sign_model_dir` signs a
directory with ``model_signing`` as a publisher does (or, with ``using="cryptography"``, writes
a bundle of the same form without model_signing installed); :func:`write_synthetic_model_dir`
writes a model of a given size for benchmarks.

Outside pytest, :class:`CapturingSink`, :class:`CapturePlugin` and :func:`sample_events` work
on their own.
"""

from __future__ import annotations

from vramcore.testing._backend_contract import BackendContract, FaultInjector
from vramcore.testing._docs import undocumented_public_names
from vramcore.testing._events import sample_events
from vramcore.testing._fixtures import (
    TEST_TOKEN,
    audit_capture,
    make_plugin_manager,
    mock_backend,
    mock_manager,
    mock_plugin,
)
from vramcore.testing._gpu import GPU_MARKER
from vramcore.testing._gpu import (  # the plugin's hooks, found by pytest on this module
    pytest_collection_modifyitems as pytest_collection_modifyitems,
)
from vramcore.testing._gpu import pytest_configure as pytest_configure
from vramcore.testing._model_dirs import (
    publisher_keypair,
    sign_model_dir,
    write_model_dir,
    write_synthetic_model_dir,
)
from vramcore.testing._sink_contract import AuditSinkContract, SinkPlugin
from vramcore.testing._sinks import CapturePlugin, CapturingSink, FailingSink
from vramcore.testing._witness_contract import HeadSigner, WitnessContract

__all__ = [
    "GPU_MARKER",
    "TEST_TOKEN",
    "AuditSinkContract",
    "BackendContract",
    "CapturePlugin",
    "CapturingSink",
    "FailingSink",
    "FaultInjector",
    "HeadSigner",
    "SinkPlugin",
    "WitnessContract",
    "audit_capture",
    "make_plugin_manager",
    "mock_backend",
    "mock_manager",
    "mock_plugin",
    "publisher_keypair",
    "sample_events",
    "sign_model_dir",
    "undocumented_public_names",
    "write_model_dir",
    "write_synthetic_model_dir",
]
