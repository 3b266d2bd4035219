"""The backend conformance suite on a real GPU, for each GPU backend."""

from __future__ import annotations

from typing import Any

import pytest

from vramcore.backend import AllocatorBackend
from vramcore.testing import BackendContract

pytestmark = pytest.mark.vramcore_gpu


class TestGpuBackendContract(BackendContract):
    """``BackendContract`` against ``cupy`` and ``pycuda`` on the real device."""

    #: CUDA reports free memory in pages, and the driver may keep a freed one.
    free_memory_tolerance = 16 << 20

    @pytest.fixture
    def backend(self, gpu_backend: AllocatorBackend) -> AllocatorBackend:
        return gpu_backend

    @pytest.fixture
    def digest_plugins(self, gpu_plugin: Any) -> list[Any]:
        return [gpu_plugin]
