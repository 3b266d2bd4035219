"""DeviceBuffer.tensors() on the cupy backend (fake CUDA runtime): per-tensor DLPack exports of
device memory with each tensor's own dtype code (BF16 and F8, which CuPy cannot export), and
refusal after a free."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vramcore import VramManager
from vramcore._dlpack import capsule_tensor
from vramcore.errors import NotSealed
from vramcore.safetensors import write_safetensors
from vramcore.testing import TEST_TOKEN

TENSORS = {
    "w": ("F32", [2, 3], bytes(range(24))),
    "b": ("BF16", [4], bytes(range(8))),
    "q": ("F8_E5M2", [5], bytes(range(5))),
}
DLPACK = {"w": (2, 32), "b": (4, 16), "q": (12, 8)}  # kDLFloat, kDLBfloat, kDLFloat8_e5m2


def test_tensors_export_device_memory_with_their_dtypes(fake_backend: Any, tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    with path.open("wb") as fh:
        write_safetensors(fh, TENSORS)
    vram = VramManager(TEST_TOKEN, allocator=fake_backend, audit="disabled")
    shard = vram.seal_file(path)
    with vram.verified(shard) as buf:
        views = buf.tensors()
        base = fake_backend._record(buf).ptr
    starts = {t.name: t.start for t in shard.tensors}
    for name, view in views.items():
        assert view.__dlpack_device__() == (2, 0)
        capsule = view.__dlpack__(stream=None, max_version=(1, 0))
        t = capsule_tensor(capsule)
        assert t.data == base + starts[name], name
        assert (t.device.device_type, t.device.device_id) == (2, 0)
        assert (t.dtype.code, t.dtype.bits, t.dtype.lanes) == (*DLPACK[name], 1), name
        assert [t.shape[i] for i in range(t.ndim)] == TENSORS[name][1], name
        del t, capsule
    assert "0x" not in repr(views["w"]) and str(base) not in repr(views["w"])
    vram.deallocate(shard)
    with pytest.raises(NotSealed):
        views["w"].__dlpack__()
    with pytest.raises(NotSealed):
        _ = views["b"].array
    vram.close()
