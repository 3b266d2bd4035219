"""Fixtures for the cupy backend's CPU tests (the fake runtime of its ``testing`` module)."""

from __future__ import annotations

import ctypes
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from vramcore_allocator_cupy.testing import FakeCuda, host_kernels


@pytest.fixture(scope="session")
def host_lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """The host-built kernels (skipped without a C++ compiler)."""
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler to build the digest kernels for the host")
    return host_kernels(tmp_path_factory.mktemp("cupy-fake-kernels"))


@pytest.fixture
def fake_cuda(host_lib: ctypes.CDLL) -> FakeCuda:
    """A one-GPU fake CUDA runtime with 64 MiB of "VRAM"."""
    return FakeCuda(host_lib)


@pytest.fixture
def fake_backend(fake_cuda: FakeCuda) -> Iterator[Any]:
    """A :class:`CupyBackend` on :func:`fake_cuda` (NVML off), closed after the test."""
    from vramcore_allocator_cupy import CupyBackend

    backend = CupyBackend(fake_cuda, nvml=False)
    yield backend
    backend.close()
