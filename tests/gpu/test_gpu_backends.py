"""Each GPU backend on a real device: round trips up to 8 GiB, bit flips, leaks, policy, views.

Run by ``scripts/gpu-check`` on a lent GPU machine; skipped with the reason anywhere else.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from vramcore import VramManager, VramPolicy
from vramcore.backend import AllocatorBackend, DeviceBuffer, MemoryKind
from vramcore.digest import DEFAULT_LEAF_SIZE, hash_leaves, merkle_root
from vramcore.errors import (
    InsufficientVram,
    IntegrityViolation,
    InvalidInput,
    SealVerificationFailed,
)
from vramcore.safetensors import write_safetensors

np = pytest.importorskip("numpy")

pytestmark = pytest.mark.vramcore_gpu

LEAF = DEFAULT_LEAF_SIZE
MiB, GiB = 1 << 20, 1 << 30


def pattern(nbytes: int, seed: int = 0) -> Any:
    """``nbytes`` of position-dependent bytes (a numpy uint8 array), fast for GiBs."""
    words = (np.arange(nbytes // 8 + 1, dtype=np.uint64) + np.uint64(seed)) * np.uint64(
        0x9E3779B97F4A7C15
    )
    return words.view(np.uint8)[:nbytes]


def read_back_equals(backend: AllocatorBackend, buf: DeviceBuffer, data: Any) -> bool:
    """Compare the device bytes with ``data`` in 256 MiB pieces."""
    step = 256 * MiB
    out = np.empty(min(step, buf.nbytes), dtype=np.uint8)
    for off in range(0, buf.nbytes, step):
        n = min(step, buf.nbytes - off)
        backend.read_into(buf, off, memoryview(out[:n]))
        if not np.array_equal(out[:n], data[off : off + n]):
            return False
    return True


def flip_bit(backend: AllocatorBackend, buf: DeviceBuffer, pos: int, bit: int = 4) -> None:
    """Flip one bit of the device bytes through the backend itself."""
    one = bytearray(1)
    backend.read_into(buf, pos, memoryview(one))
    one[0] ^= 1 << bit
    handle = backend.copy_in(buf, pos, memoryview(one))
    if handle is not None:
        handle.wait()


ROUND_TRIPS = {
    "1B": 1,
    "4095B": 4095,
    "leaf-1": LEAF - 1,
    "leaf": LEAF,
    "leaf+1": LEAF + 1,
    "1MiB+3": MiB + 3,
    "64MiB+1": 64 * MiB + 1,
    "1GiB": GiB,
    "8GiB+1": 8 * GiB + 1,
}


@pytest.mark.parametrize("nbytes", list(ROUND_TRIPS.values()), ids=list(ROUND_TRIPS))
def test_round_trip_seal_and_verify(
    gpu_manager: VramManager, gpu_backend: AllocatorBackend, nbytes: int
) -> None:
    """Seal from host memory, compare the device digest with the host's, read back, verify."""
    if nbytes > GiB and os.environ.get("VRAMCORE_GPU_QUICK") == "1":
        pytest.skip("quick mode: multi-GiB round trips left out")
    if nbytes >= GiB and os.environ.get("VRAMCORE_GPU_FAKE") == "1":
        pytest.skip("fake runtime: GiB sizes left out (its host-built kernels are slow)")
    data = pattern(nbytes, seed=nbytes)
    shard = gpu_manager.seal_model(memoryview(data), shard_id=f"rt-{nbytes}")
    assert shard.digest == merkle_root(hash_leaves(memoryview(data), LEAF)).hex()
    with gpu_manager.verified(shard) as buf:
        assert buf.nbytes == nbytes
        assert read_back_equals(gpu_backend, buf, data)
    gpu_manager.deallocate(shard)


@pytest.mark.parametrize("nbytes", [1, 55, 56, 64, LEAF, LEAF + 1, 3 * LEAF, 5 * MiB + 7])
def test_device_digest_equals_host_digest(
    gpu_backend: AllocatorBackend, gpu_plugin: Any, nbytes: int
) -> None:
    """Root and packed leaves, whole buffer and ranges, bit for bit."""
    data = bytes(pattern(nbytes, seed=7))
    buf = gpu_backend.allocate(0, nbytes)
    try:
        handle = gpu_backend.copy_in(buf, 0, memoryview(data))
        if handle is not None:
            handle.wait()
        leaves = hash_leaves(data, LEAF)
        got = gpu_plugin.vramcore_device_digest(gpu_backend, buf, LEAF, None, None)
        assert got is not None, "the plugin does not digest its own buffers on the device"
        assert got.root == merkle_root(leaves)
        assert bytes(got.leaves) == b"".join(leaves)
        n = len(leaves)
        for first, stop in {(0, 1), (n - 1, n), (n // 2, n)}:
            part = gpu_plugin.vramcore_device_digest(gpu_backend, buf, LEAF, (first, stop), None)
            assert part.root is None and part.first_leaf == first
            assert bytes(part.leaves) == b"".join(leaves[first:stop])
        if nbytes == 1:
            assert got.root == hashlib.sha256(b"\x00" + data).digest()
    finally:
        gpu_backend.free(buf)


def _model(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    tensors = {
        "embed.weight": ("F32", [512, 256], bytes(pattern(512 * 256 * 4, 1))),
        "layer.0.weight": ("F16", [1024, 1024], bytes(pattern(1024 * 1024 * 2, 2))),
        "head.bias": ("I8", [3, 100003], bytes(pattern(3 * 100003, 3))),
    }
    with path.open("wb") as fh:
        write_safetensors(fh, tensors)
    return tensors


@pytest.mark.parametrize("where", ["shard-first", "tensor-first", "tensor-middle", "shard-last"])
def test_bit_flips_are_detected_and_localised_to_the_tensor(
    gpu_manager: VramManager, gpu_backend: AllocatorBackend, tmp_path: Path, where: str
) -> None:
    path = tmp_path / "model.safetensors"
    _model(path)
    shard = gpu_manager.seal_file(path)
    ranges = list(shard.tensors)
    pos = {
        "shard-first": 0,
        "tensor-first": ranges[0].start,
        "tensor-middle": (ranges[1].start + ranges[1].end) // 2,
        "shard-last": shard.vram_bytes - 1,
    }[where]
    with gpu_manager.verified(shard) as buf:
        pass
    flip_bit(gpu_backend, buf, pos)
    with pytest.raises(SealVerificationFailed) as info:
        gpu_manager.verify_sealed(shard)
    err = info.value
    assert any(start <= pos < end for start, end in err.corrupted_ranges), err.corrupted_ranges
    leaf = (pos // LEAF * LEAF, min(pos // LEAF * LEAF + LEAF, shard.vram_bytes))
    assert leaf in err.corrupted_ranges
    owner = [t.name for t in ranges if t.start <= pos < t.end]
    for name in owner:  # the header (byte 0) belongs to no tensor
        assert name in err.tensors
    flip_bit(gpu_backend, buf, pos)  # restore: verifies again
    gpu_manager.verify_sealed(shard)


def test_no_vram_leaked_after_forced_failures(
    gpu_manager: VramManager, gpu_backend: AllocatorBackend, gpu_plugin: Any
) -> None:
    # Warm up: contexts, the kernel module and streams exist before the start value is read.
    warm = gpu_manager.seal_model(bytes(3 * LEAF), shard_id="warm")
    gpu_manager.verify_sealed(warm)
    gpu_manager.deallocate(warm)
    start, total = gpu_backend.mem_info(0)

    with pytest.raises(InsufficientVram):
        gpu_backend.allocate(0, total + 1)
    with pytest.raises(InsufficientVram):
        gpu_backend.allocate(0, start + 64 * MiB)
    with pytest.raises(IntegrityViolation):
        gpu_manager.seal_model(bytes(5 * MiB), shard_id="bad-sha", expected_sha256="00" * 32)
    buf = gpu_backend.allocate(0, 2 * LEAF)
    with pytest.raises(InvalidInput):
        gpu_plugin.vramcore_device_digest(gpu_backend, buf, LEAF, (1, 5), None)
    with pytest.raises(InvalidInput):
        gpu_backend.copy_in(buf, 2 * LEAF - 1, memoryview(b"xx"))
    gpu_backend.free(buf)
    shard = gpu_manager.seal_model(bytes(pattern(7 * MiB)), shard_id="kept")
    gpu_manager.deallocate(shard)
    # Within a few pages: CUDA reports free memory in pages and may keep a freed one.
    assert abs(gpu_backend.mem_info(0)[0] - start) <= 16 * MiB, "free VRAM did not come back"


def test_policy_flags_from_the_real_device(
    gpu_backend: AllocatorBackend, backend_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    infos = list(gpu_backend.devices())
    assert infos
    for info in infos:
        assert info.name and not info.name.startswith("CUDA device")
        assert not info.integrated, "a discrete H100/H200 reports integrated"
        assert info.compute_capability is not None and info.compute_capability >= (8, 0)
        assert 0 < info.free_bytes <= info.total_bytes
        assert info.managed_memory
        assert info.uuid is None or info.uuid.startswith("GPU-")
        if not info.pageable_memory_access:
            assert not info.host_page_tables
        print(json.dumps({"backend": backend_name, **info.to_dict()}))
    buf = gpu_backend.allocate(0, 4096)
    try:
        assert gpu_backend.memory_kind(buf) is MemoryKind.DEVICE
    finally:
        gpu_backend.free(buf)
    if os.environ.get("VRAMCORE_GPU_FAKE") == "1":
        return  # the CLI builds the real backend, which the fake cannot stand in for
    from vramcore._cli.cli import main

    capsys.readouterr()
    code = main(["devices", "--json", "--allocator", backend_name])
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert data["backend"] == backend_name
    assert len(data["devices"]) == len(infos)
    assert code in (0, 1), err
    assert "Traceback" not in out + err


def test_default_policy_on_this_device_follows_the_design(gpu_backend: AllocatorBackend) -> None:
    """DESIGN: pageable host access (HMM/ATS) is reported, refused only under strict isolation."""
    for info in gpu_backend.devices():
        findings = VramPolicy().check_device(info)
        assert not info.integrated
        assert [f for f in findings if f.refused] == [], "a discrete GPU must not be refused"
        if info.pageable_memory_access:
            (reported,) = findings
            assert reported.rule == ("ats" if info.host_page_tables else "hmm")
            strict = VramPolicy(strict_host_isolation=True).check_device(info)
            assert [f.rule for f in strict if f.refused] == [reported.rule]
        else:
            assert findings == []


def test_verified_views_are_zero_copy(
    gpu_manager: VramManager, backend_name: str, tmp_path: Path
) -> None:
    if backend_name != "cupy":
        pytest.skip("CuPy array views are the cupy backend's (pycuda has its own native)")
    if os.environ.get("VRAMCORE_GPU_FAKE") == "1":
        pytest.skip("CuPy arrays need a real device (the fake runtime has none)")
    import cupy  # type: ignore[import-untyped]

    path = tmp_path / "model.safetensors"
    tensors = _model(path)
    shard = gpu_manager.seal_file(path)
    with gpu_manager.verified(shard) as buf:
        whole = buf.native.array()  # type: ignore[attr-defined]
        assert whole.nbytes == shard.vram_bytes
        assert cupy.asnumpy(whole).tobytes() == path.read_bytes()
        via_cai = cupy.asarray(buf.native)
        assert via_cai.data.ptr == whole.data.ptr  # the same memory, not a copy
        views = buf.native.tensors(shard)  # type: ignore[attr-defined]
        for name, (_dtype, shape, raw) in tensors.items():
            view = views[name]
            assert list(view.shape) == shape
            assert cupy.asnumpy(view).tobytes() == raw
        assert views["embed.weight"].dtype == np.float32
        assert views["layer.0.weight"].dtype == np.float16
        try:
            import torch
        except ImportError:
            return
        t = torch.from_dlpack(views["embed.weight"])
        assert t.is_cuda and t.data_ptr() == views["embed.weight"].data.ptr
        assert tuple(t.shape) == (512, 256)
