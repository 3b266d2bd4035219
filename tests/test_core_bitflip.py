"""Bit flips in VRAM: detected, located to the leaf, and named by tensor for safetensors."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from vramcore.errors import SealVerificationFailed
from vramcore.testing import CapturingSink

LEAF = 65536


def _leaf_range(offset: int, nbytes: int) -> tuple[int, int]:
    start = offset // LEAF * LEAF
    return start, min(start + LEAF, nbytes)


def _flip(manager: Any, backend: Any, shard: Any, offset: int, bit: int) -> Any:
    """Flip a bit of a verified shard; return its buffer (to flip the bit back later)."""
    with manager.verified(shard) as buf:
        backend.flip_bit(buf, offset, bit)
    return buf


def _expect_failure(manager: Any, shard: Any) -> SealVerificationFailed:
    with pytest.raises(SealVerificationFailed) as info:
        manager.verify_sealed(shard)
    return info.value


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_bit_flip_in_a_model_is_detected_with_its_byte_range(
    mock_manager: Any, mock_backend: Any, audit_capture: CapturingSink, pattern: Any, where: str
) -> None:
    nbytes = 5 * LEAF + 3
    shard = mock_manager.seal_model(pattern(nbytes), shard_id="m")
    offset = {"first": 0, "middle": nbytes // 2, "last": nbytes - 1}[where]
    buf = _flip(mock_manager, mock_backend, shard, offset, 7)
    error = _expect_failure(mock_manager, shard)
    expected = _leaf_range(offset, nbytes)
    assert error.reason == "digest"
    assert error.shard_id == "m"
    assert error.byte_range == expected
    assert error.corrupted_ranges == (expected,)
    assert error.tensors == ()
    assert f"bytes {expected[0]}-{expected[1] - 1}" in str(error)
    (event,) = audit_capture.of_type("seal.verification_failed")
    assert event.byte_ranges == (expected,)  # type: ignore[attr-defined]
    assert event.reason == "digest"  # type: ignore[attr-defined]
    assert event.severity == "critical"
    # Flipping the bit back restores the bytes, and the seal verifies again.
    mock_backend.flip_bit(buf, offset, 7)
    mock_manager.verify_sealed(shard)
    assert audit_capture.types().count("seal.verified") == 2


def test_flips_in_several_leaves_report_merged_ranges(
    mock_manager: Any, mock_backend: Any, pattern: Any
) -> None:
    nbytes = 8 * LEAF
    shard = mock_manager.seal_model(pattern(nbytes), shard_id="m")
    with mock_manager.verified(shard) as buf:
        for offset in (LEAF + 5, 2 * LEAF + 9, 6 * LEAF):  # leaves 1, 2 (adjacent) and 6
            mock_backend.flip_bit(buf, offset, 0)
    error = _expect_failure(mock_manager, shard)
    assert error.corrupted_ranges == ((LEAF, 3 * LEAF), (6 * LEAF, 7 * LEAF))
    assert error.byte_range == (LEAF, 3 * LEAF)
    assert "and 1 more range(s)" in str(error)


def test_every_bit_position_is_detected(mock_manager: Any, mock_backend: Any) -> None:
    shard = mock_manager.seal_model(bytes(4096), shard_id="zeros")
    with mock_manager.verified(shard) as buf:  # the buffer stays valid while the shard is resident
        pass
    for bit in range(8):
        mock_backend.flip_bit(buf, 100, bit)
        assert _expect_failure(mock_manager, shard).byte_range == (0, 4096)
        mock_backend.flip_bit(buf, 100, bit)
        mock_manager.verify_sealed(shard)


def _tensor_ranges(path: Path, model_tensors: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Each tensor's byte range in the file, computed here from the header."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, (_dtype, _shape, data) in model_tensors.items():
        begin, end = header[name]["data_offsets"]
        assert raw[8 + n + begin : 8 + n + end] == data
        out[name] = (8 + n + begin, 8 + n + end)
    return out


@pytest.mark.parametrize("where", ["first", "layer0.weight", "head.weight-last"])
def test_bit_flip_in_a_safetensors_file_names_the_tensor(
    mock_manager: Any,
    mock_backend: Any,
    audit_capture: CapturingSink,
    safetensors_file: Path,
    model_tensors: dict[str, Any],
    where: str,
) -> None:
    size = safetensors_file.stat().st_size
    ranges = _tensor_ranges(safetensors_file, model_tensors)
    shard = mock_manager.seal_file(safetensors_file)
    assert shard.shard_id == "model.safetensors"
    assert {t.name: (t.start, t.end) for t in shard.tensors} == ranges
    assert [t.start for t in shard.tensors] == sorted(t.start for t in shard.tensors)
    # a leaf that lies wholly inside layer0.weight
    inner = (ranges["layer0.weight"][0] // LEAF + 1) * LEAF + 123
    assert _leaf_range(inner, size)[1] <= ranges["layer0.weight"][1]
    offset = {"first": 0, "layer0.weight": inner, "head.weight-last": size - 1}[where]
    _flip(mock_manager, mock_backend, shard, offset, 3)
    error = _expect_failure(mock_manager, shard)
    leaf = _leaf_range(offset, size)
    expected = tuple(
        n
        for n, (a, b) in sorted(ranges.items(), key=lambda kv: kv[1])
        if a < leaf[1] and leaf[0] < b
    )
    assert error.byte_range == leaf
    assert error.tensors == expected
    if where == "first":  # the header's leaf also holds the start of embed.weight
        assert expected == ("embed.weight",)
    elif where == "layer0.weight":
        assert expected == ("layer0.weight",)
    else:
        assert expected == ("head.weight",)
    assert f"tensor {', '.join(expected)}" in str(error)
    (event,) = audit_capture.of_type("seal.verification_failed")
    assert event.tensors == expected  # type: ignore[attr-defined]
    assert event.byte_ranges == (leaf,)  # type: ignore[attr-defined]
