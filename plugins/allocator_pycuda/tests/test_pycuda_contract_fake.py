"""The backend contract on the stand-in PyCUDA: every path of the backend but the driver."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import vramcore_allocator_pycuda
from vramcore_allocator_pycuda import DriverApi, PyCudaBackend

from vramcore.testing import BackendContract


@pytest.mark.vramcore_gpu_fake
class TestPyCudaOnFakeDriver(BackendContract):
    """The pycuda backend keeps the contract over a driver with PyCUDA's thread rules."""

    @pytest.fixture
    def backend(self, fake_api: DriverApi) -> Iterator[PyCudaBackend]:
        backend = PyCudaBackend(fake_api)
        yield backend
        backend.close()

    @pytest.fixture
    def digest_plugins(self) -> Sequence[object]:
        return [vramcore_allocator_pycuda]

    @pytest.fixture
    def fault_injector(self, fake_faults: Any) -> Any:
        return fake_faults
