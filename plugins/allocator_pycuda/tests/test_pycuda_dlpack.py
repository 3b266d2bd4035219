"""The DLPack export: struct layout and lifetime, checked with NumPy on host memory (the same
code path exports device memory with ``kDLCUDA``)."""

from __future__ import annotations

import ctypes
import gc
from typing import Any

import numpy as np
import pytest
from vramcore_allocator_pycuda import DriverApi, PyCudaBackend
from vramcore_allocator_pycuda import _dlpack as dl

from vramcore._dlpack import capsule_tensor
from vramcore.errors import InvalidInput


class HostExport:
    """Host bytes exported through the same ``export`` function, for NumPy to consume."""

    def __init__(self, memory: Any) -> None:
        self.memory = memory

    def __dlpack__(self, **kwargs: Any) -> Any:
        return dl.export(ctypes.addressof(self.memory), len(self.memory), dl.KDL_CPU, 0, self)

    def __dlpack_device__(self) -> tuple[int, int]:
        return (dl.KDL_CPU, 0)


def test_numpy_sees_the_exported_bytes_without_a_copy() -> None:
    before = dl.live_exports()
    memory = ctypes.create_string_buffer(b"weights!", 8)
    array = np.from_dlpack(HostExport(memory))
    assert array.dtype == np.uint8
    assert array.shape == (8,)
    assert array.tobytes() == b"weights!"
    memory[0] = b"W"
    assert array[0] == ord("W"), "a copy, not a view"
    assert dl.live_exports() == before + 1
    del array
    gc.collect()
    assert dl.live_exports() == before, "the consumer's deleter did not release the export"


def test_an_unconsumed_capsule_releases_its_export() -> None:
    before = dl.live_exports()
    memory = ctypes.create_string_buffer(4)
    capsule = HostExport(memory).__dlpack__()
    assert dl.live_exports() == before + 1
    del capsule
    gc.collect()
    assert dl.live_exports() == before


def _tensor(capsule: Any) -> Any:
    return capsule_tensor(capsule)


def test_a_shard_exports_cuda_memory(fake_api: DriverApi) -> None:
    backend = PyCudaBackend(fake_api)
    buf = backend.allocate(0, 1000)
    shard = buf.native
    assert shard.__dlpack_device__() == (dl.KDL_CUDA, 0)
    capsule = shard.__dlpack__(stream=None, max_version=(1, 0))
    t = _tensor(capsule)
    assert t.data == shard.allocation.ptr
    assert (t.device.device_type, t.device.device_id) == (dl.KDL_CUDA, 0)
    assert (t.ndim, t.shape[0], bool(t.strides), t.byte_offset) == (1, 1000, False, 0)
    assert (t.dtype.code, t.dtype.bits, t.dtype.lanes) == (1, 8, 1)
    del capsule, t
    gc.collect()
    with pytest.raises(BufferError):
        shard.__dlpack__(copy=True)
    with pytest.raises(BufferError):
        shard.__dlpack__(dl_device=(dl.KDL_CUDA, 1))
    backend.free(buf)
    with pytest.raises(InvalidInput):
        shard.__dlpack__()
    backend.close()
