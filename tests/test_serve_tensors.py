"""buffer.tensors(): zero-copy views with dtype and shape, exported by DLPack, on the mock.

PyTorch runs for real here (its CPU build): every dtype safetensors and PyTorch share crosses
over with its own DLPack code, BF16 and the 8-bit floats included, and equals what the
``safetensors`` package loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import vramcore_allocator_mock as mock_plugin
from safetensors.torch import load_file, save_file

from vramcore import SealedShard, TensorMap, TensorRange, TensorView, VramManager
from vramcore._dlpack import live_exports
from vramcore.errors import InvalidInput, NotSealed, SealVerificationFailed
from vramcore.safetensors import write_safetensors
from vramcore.testing import TEST_TOKEN

#: One tensor of every dtype safetensors and PyTorch share.
SHARED = {
    "bool": torch.tensor([[True, False, True]]),
    "u8": torch.tensor([0, 7, 255], dtype=torch.uint8),
    "i8": torch.tensor([-128, 3, 127], dtype=torch.int8),
    "i16": torch.tensor([-30000, 1], dtype=torch.int16),
    "u16": torch.tensor([1, 65535], dtype=torch.uint16),
    "f16": torch.randn(2, 3).to(torch.float16),
    "bf16": torch.randn(4, 5).to(torch.bfloat16),
    "i32": torch.tensor([-(2**31), 2**31 - 1], dtype=torch.int32),
    "u32": torch.tensor([1, 2**32 - 1], dtype=torch.uint32),
    "f32": torch.randn(3, 2, 2),
    "i64": torch.tensor([-(2**63), 2**63 - 1], dtype=torch.int64),
    "u64": torch.tensor([1, 2**64 - 1], dtype=torch.uint64),
    "f64": torch.randn(2, dtype=torch.float64),
    "c64": torch.randn(3, dtype=torch.complex64),
    "f8_e4m3": torch.randn(6).to(torch.float8_e4m3fn),
    "f8_e5m2": torch.randn(6).to(torch.float8_e5m2),
    "f8_e8m0": torch.rand(4).to(torch.float8_e8m0fnu),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 4),
}


@pytest.fixture
def backend() -> mock_plugin.MockBackend:
    return mock_plugin.MockBackend()


@pytest.fixture
def manager(backend: mock_plugin.MockBackend) -> Any:
    with VramManager(TEST_TOKEN, allocator=backend, audit="disabled") as m:
        yield m


@pytest.fixture
def every_dtype(tmp_path: Path) -> Path:
    path = tmp_path / "every.safetensors"
    save_file(SHARED, str(path))
    return path


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes, for exact comparison (NaN-safe, any dtype)."""
    return t.contiguous().view(-1).view(torch.uint8) if t.numel() else torch.zeros(0)


def _allocation(backend: mock_plugin.MockBackend, buf: Any) -> tuple[int, int]:
    base = np.frombuffer(backend.host_view(buf), dtype=np.uint8)
    return int(base.ctypes.data), int(base.ctypes.data) + buf.nbytes


def test_every_shared_dtype_round_trips_through_dlpack_zero_copy(
    manager: VramManager, backend: mock_plugin.MockBackend, every_dtype: Path
) -> None:
    reference = load_file(str(every_dtype))
    shard = manager.seal_file(every_dtype)
    with manager.verified(shard) as buf:
        views = buf.tensors()
        start, end = _allocation(backend, buf)
    assert set(views) == set(SHARED)
    for name, view in views.items():
        assert isinstance(view, TensorView)
        got = torch.from_dlpack(view)
        assert got.dtype == reference[name].dtype, name
        assert tuple(got.shape) == tuple(reference[name].shape) == view.shape, name
        assert torch.equal(_bits(got), _bits(reference[name])), name
        if got.numel():
            assert start <= got.data_ptr() and got.data_ptr() + view.nbytes <= end, name


def test_views_are_the_sealed_bytes_a_flip_in_vram_shows_in_every_view(
    manager: VramManager, backend: mock_plugin.MockBackend, every_dtype: Path
) -> None:
    shard = manager.seal_file(every_dtype)
    with manager.verified(shard) as buf:
        f32 = torch.from_dlpack(buf.tensors(["f32"])["f32"])
        before = f32.clone()
        (offset,) = [t.start for t in shard.tensors if t.name == "f32"]
        backend.flip_bit(buf, offset + 3, 7)  # the sign bit of the first float
    assert f32.view(-1)[0] == -before.view(-1)[0]
    assert torch.equal(f32.view(-1)[1:], before.view(-1)[1:])
    with pytest.raises(SealVerificationFailed) as caught:
        manager.verify_sealed(shard)
    assert "f32" in caught.value.tensors  # one leaf holds the whole small file


def test_numpy_views_on_the_mock(manager: VramManager, every_dtype: Path) -> None:
    shard = manager.seal_file(every_dtype)
    with manager.verified(shard) as buf:
        views = buf.tensors()
    f16 = views["f16"]
    assert isinstance(f16.array, np.ndarray) and f16.array.dtype == np.float16
    assert np.array_equal(np.asarray(f16), SHARED["f16"].numpy())
    assert not np.asarray(f16).flags.owndata  # a view, not a copy
    # NumPy has no BF16: its bits are offered as uint16, and __array__ refuses to guess.
    assert views["bf16"].array.dtype == np.uint16
    assert np.array_equal(views["bf16"].array, SHARED["bf16"].view(torch.uint16).numpy())
    with pytest.raises(TypeError, match="NumPy has no BF16"):
        np.asarray(views["bf16"])
    assert views["c64"].__dlpack_device__() == (1, 0)
    assert "0x" not in repr(views["f32"]) and "F32[3, 2, 2]" in repr(views["f32"])


def test_tensors_by_name_and_unknown_names(manager: VramManager, every_dtype: Path) -> None:
    shard = manager.seal_file(every_dtype)
    with manager.verified(shard) as buf:
        assert list(buf.tensors(["f64", "u8"])) == [
            t.name for t in shard.tensors if t.name in {"f64", "u8"}
        ]
        with pytest.raises(InvalidInput, match="no tensor named 'nope'"):
            buf.tensors(["nope"])


def test_views_are_refused_after_the_shard_is_deallocated(
    manager: VramManager, every_dtype: Path
) -> None:
    shard = manager.seal_file(every_dtype)
    with manager.verified(shard) as buf:
        view = buf.tensors()["bf16"]
    manager.deallocate(shard)
    with pytest.raises(NotSealed):
        buf.tensors()
    with pytest.raises(NotSealed):
        view.__dlpack__()
    with pytest.raises(NotSealed):
        _ = view.array
    assert "deallocated" in repr(view)


def test_raw_bytes_and_sub_byte_dtypes_have_no_views(manager: VramManager, tmp_path: Path) -> None:
    raw = manager.seal_model(b"\x01" * 64)
    with manager.verified(raw) as buf, pytest.raises(InvalidInput, match="no sealed safetensors"):
        buf.tensors()
    path = tmp_path / "f4.safetensors"
    with path.open("wb") as fh:
        write_safetensors(fh, {"packed": ("F4", [2], b"\x12"), "u8": ("U8", [1], b"\x05")})
    shard = manager.seal_file(path)
    with manager.verified(shard) as buf:
        assert np.asarray(buf.tensors(["u8"])["u8"]).tolist() == [5]
        with pytest.raises(InvalidInput, match="F4: a sub-byte"):
            buf.tensors()


def test_an_unconsumed_export_is_released(manager: VramManager, every_dtype: Path) -> None:
    shard = manager.seal_file(every_dtype)
    with manager.verified(shard) as buf:
        view = buf.tensors(["f32"])["f32"]
    before = live_exports()
    capsule = view.__dlpack__()
    assert live_exports() == before + 1
    del capsule
    assert live_exports() == before
    with pytest.raises(BufferError):
        view.__dlpack__(copy=True)
    with pytest.raises(BufferError):
        view.__dlpack__(dl_device=(2, 0))


# -- the tensor map and the attestation --------------------------------------------------


def test_the_attestation_records_dtype_and_shape_and_round_trips(
    manager: VramManager, every_dtype: Path
) -> None:
    shard = manager.seal_file(every_dtype)
    data = json.loads(shard.to_json())
    assert data["attestation_version"] == 2
    items = {item[0]: item for item in data["tensors"]}
    assert items["bf16"][3:] == ["BF16", [4, 5]]
    assert items["scalar"][3:] == ["F32", []]
    again = SealedShard.from_json(shard.to_json())
    assert again == shard and again.tensors.has_layout
    manager.verify_sealed(again)


def test_dtype_and_shape_are_signed(manager: VramManager, every_dtype: Path) -> None:
    shard = manager.seal_file(every_dtype)
    data = json.loads(shard.to_json())
    for item in data["tensors"]:
        if item[0] == "f16":
            item[4] = [3, 2]  # same bytes, another shape
    forged = SealedShard.from_json(json.dumps(data, sort_keys=True, separators=(",", ":")))
    with pytest.raises(SealVerificationFailed):
        manager.verify_sealed(forged)


def test_a_version_1_attestation_is_still_read_and_has_no_layout() -> None:
    v1 = {
        "attestation_version": 1,
        "shard_id": "old",
        "gpu_device": 0,
        "vram_bytes": 16,
        "digest": "a" * 64,
        "digest_alg": "rfc6962-sha256",
        "leaf_size": 65536,
        "sealed_at": "2026-01-01T00:00:00.000000Z",
        "tensors": [["w", 8, 16]],
        "file_sha256": None,
        "signature": "b" * 64,
    }
    text = json.dumps(v1, sort_keys=True, separators=(",", ":"))
    shard = SealedShard.from_json(text)
    assert shard.tensors == [TensorRange("w", 8, 16)] and not shard.tensors.has_layout
    assert shard.to_json() == text  # re-written as it was read: version 1
    # The signed map digest of a map without layout is the one vramcore signed before.
    assert shard.tensors.digest != TensorMap.from_ranges([("w", 8, 16, "U8", [8])]).digest
    with pytest.raises(InvalidInput, match=r"\[name, start, end, dtype, shape\]"):
        SealedShard.from_json(text.replace('"attestation_version":1', '"attestation_version":2'))


def test_a_tensor_map_records_layout_for_all_or_none() -> None:
    with pytest.raises(InvalidInput, match="every tensor or for none"):
        TensorMap.from_ranges([("a", 0, 1, "U8", [1]), ("b", 1, 2)])
    with pytest.raises(InvalidInput, match="malformed dtype"):
        TensorMap.from_ranges([("a", 0, 1, "u8\n", [1])])
    with pytest.raises(InvalidInput, match="malformed shape"):
        TensorMap.from_ranges([("a", 0, 1, "U8", [-1])])


_OUTLIVES = """
import sys
import torch
import vramcore_allocator_mock as mock_plugin
from vramcore import VramManager
from vramcore.safetensors import write_safetensors
from vramcore.testing import TEST_TOKEN

with open(sys.argv[1], "wb") as fh:
    write_safetensors(fh, {"w": ("F32", [4], bytes(range(16)))})
manager = VramManager(TEST_TOKEN, allocator=mock_plugin.MockBackend(), audit="disabled")
shard = manager.seal_file(sys.argv[1])
with manager.verified(shard) as buffer:
    KEPT = [torch.from_dlpack(v) for v in buffer.tensors().values()]  # consumed exports
    SPARE = [v.__dlpack__() for v in buffer.tensors().values()]  # unconsumed capsules
CYCLE: list[object] = [KEPT, SPARE]
CYCLE.append(CYCLE)  # freed only by the collector's last pass, after the modules' globals
del KEPT[1:], SPARE[1:]
print(float(CYCLE[0][0].sum() * 0) + 1)
"""


def test_exports_that_outlive_the_interpreter_shut_down_cleanly(tmp_path: Path) -> None:
    """A torch tensor or capsule still alive at exit is freed after this module's globals:
    the interpreter must exit 0 (it crashed in the deleter before)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", _OUTLIVES, str(tmp_path / "m.safetensors")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "1.0"
