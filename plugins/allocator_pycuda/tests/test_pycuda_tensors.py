"""DeviceBuffer.tensors() on the PyCUDA backend (fake driver): per-tensor DLPack exports of
device memory with each tensor's own dtype code, GPUArray views, refusal after a free."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
import vramcore_allocator_pycuda
from vramcore_allocator_pycuda import DriverApi, PyCudaBackend

from vramcore import VramManager
from vramcore._dlpack import capsule_tensor
from vramcore.errors import NotSealed
from vramcore.safetensors import write_safetensors
from vramcore.testing import TEST_TOKEN, CapturePlugin, CapturingSink

TENSORS = {
    "w": ("F32", [2, 3], bytes(range(24))),
    "b": ("BF16", [4], bytes(range(8))),
    "q": ("F8_E4M3", [5], bytes(range(5))),
}
DLPACK = {"w": (2, 32), "b": (4, 16), "q": (10, 8)}  # kDLFloat, kDLBfloat, kDLFloat8_e4m3fn


class FakeGpuArrayModule:
    """Stands in for ``pycuda.gpuarray``: records how each view was made."""

    @attrs.frozen
    class GPUArray:
        shape: tuple[int, ...]
        dtype: Any
        gpudata: int
        base: Any


def test_tensors_export_device_memory_with_their_dtypes(
    fake_api: DriverApi, make_plugin_manager: Any, tmp_path: Path
) -> None:
    path = tmp_path / "m.safetensors"
    with path.open("wb") as fh:
        write_safetensors(fh, TENSORS)
    fake_api.gpuarray = FakeGpuArrayModule
    backend = PyCudaBackend(fake_api)
    pm = make_plugin_manager(vramcore_allocator_pycuda, CapturePlugin(CapturingSink()))
    with VramManager(TEST_TOKEN, allocator=backend, plugin_manager=pm, worker_id="t") as vram:
        shard = vram.seal_file(path)
        with vram.verified(shard) as buf:
            views = buf.tensors()
            base = buf.native.allocation.ptr
        starts = {t.name: t.start for t in shard.tensors}
        for name, view in views.items():
            assert view.__dlpack_device__() == (2, 0)
            capsule = view.__dlpack__(stream=None, max_version=(1, 0))
            t = capsule_tensor(capsule)
            assert t.data == base + starts[name], name
            assert (t.dtype.code, t.dtype.bits, t.dtype.lanes) == (*DLPACK[name], 1), name
            assert [t.shape[i] for i in range(t.ndim)] == TENSORS[name][1], name
            del t, capsule
        array = views["b"].array
        assert (array.shape, str(array.dtype), array.gpudata) == (
            (4,),
            "uint16",
            base + starts["b"],
        )
        vram.deallocate(shard)
        with pytest.raises(NotSealed):
            views["w"].__dlpack__()
        with pytest.raises(NotSealed):
            buf.tensors()
