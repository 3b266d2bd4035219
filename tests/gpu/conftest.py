"""Fixtures of the GPU tests: every test runs once per GPU backend (``cupy``, ``pycuda``).

A backend whose plugin is not installed, or that cannot run here (no CuPy/PyCUDA, no driver,
no GPU), is skipped with its own reason; without any GPU the ``vramcore_gpu`` marker skips
everything first. ``VRAMCORE_GPU_QUICK=1`` (``scripts/gpu-check --quick``) skips the
multi-GiB sizes.

``VRAMCORE_GPU_FAKE=1`` (with ``VRAMCORE_FORCE_GPU_TESTS=1``; ``scripts/gpu-check --dry-run``)
runs the ``cupy`` backend on the fake CUDA runtime of ``vramcore_allocator_cupy.testing``
instead, so these tests' own logic is checked on machines without a GPU.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from vramcore import VramManager, VramPolicy
from vramcore.backend import AllocatorBackend
from vramcore.plugins import VramcorePluginManager
from vramcore.testing import TEST_TOKEN, CapturePlugin, CapturingSink

#: Backend name -> the plugin module that registers it.
GPU_PLUGINS = {"cupy": "vramcore_allocator_cupy", "pycuda": "vramcore_allocator_pycuda"}


@pytest.fixture(params=sorted(GPU_PLUGINS), scope="module")
def backend_name(request: pytest.FixtureRequest) -> str:
    """Each GPU backend in turn."""
    return str(request.param)


@pytest.fixture(scope="module")
def gpu_plugin(backend_name: str) -> Any:
    """The backend's plugin module (skipped when its distribution is not installed)."""
    module = GPU_PLUGINS[backend_name]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.skip(f"{module} is not installed ({exc})")


def _spec(plugin: Any, name: str) -> Any:
    (spec,) = [s for s in plugin.vramcore_allocator_backends() if s.name == name]
    return spec


def _fake_backend(backend_name: str, tmp: pytest.TempPathFactory) -> AllocatorBackend:
    if backend_name != "cupy":
        pytest.skip("VRAMCORE_GPU_FAKE runs the cupy backend only")
    from vramcore_allocator_cupy import CupyBackend
    from vramcore_allocator_cupy.testing import FakeCuda, host_kernels

    lib = host_kernels(tmp.mktemp("fake-kernels"))
    return CupyBackend(FakeCuda(lib, capacity=1 << 30), nvml=False)


@pytest.fixture
def gpu_backend(
    backend_name: str, gpu_plugin: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AllocatorBackend]:
    """A fresh backend, closed after the test (skipped, with why, when it cannot run)."""
    if os.environ.get("VRAMCORE_GPU_FAKE") == "1":
        backend = _fake_backend(backend_name, tmp_path_factory)
    else:
        spec = _spec(gpu_plugin, backend_name)
        reason = spec.why_not()
        if reason is not None:
            pytest.skip(f"{backend_name} backend not viable: {reason}")
        backend = spec.factory()
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture
def gpu_manager(
    gpu_backend: AllocatorBackend,
    gpu_plugin: Any,
    make_plugin_manager: Callable[..., VramcorePluginManager],
) -> Iterator[VramManager]:
    """A manager on the GPU backend with its device-digest plugin and a capturing sink.

    The policy accepts host access (HMM/ATS) so that these tests exercise the backend on any
    host; the policy's decision on the real device is tested on its own.
    """
    sink = CapturingSink()
    pm = make_plugin_manager(gpu_plugin, CapturePlugin(sink), mock=False)
    manager = VramManager(
        TEST_TOKEN,
        allocator=gpu_backend,
        plugin_manager=pm,
        policy=VramPolicy(),
    )
    manager.sink = sink  # type: ignore[attr-defined]
    try:
        yield manager
    finally:
        manager.close()
