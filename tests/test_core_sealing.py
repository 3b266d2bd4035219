"""Sealing: sizes, files, input validation and the host-memory bound of seal_file."""

from __future__ import annotations

import array
import json
import struct
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from vramcore_allocator_mock import MockBackend

from vramcore import VramManager
from vramcore.digest import hash_leaves, merkle_root
from vramcore.errors import IntegrityViolation, InvalidInput, NotSealed
from vramcore.safetensors import read_tensor_map, write_safetensors
from vramcore.testing import TEST_TOKEN, CapturingSink

MIB = 1 << 20


def _read(backend: Any, buf: Any, n: int | None = None) -> bytes:
    """The buffer's first ``n`` bytes through the backend's own read path (never ``native``)."""
    out = bytearray(buf.nbytes if n is None else min(n, buf.nbytes))
    backend.read_into(buf, 0, memoryview(out))
    return bytes(out)


@pytest.mark.parametrize(
    ("nbytes", "leaves"),
    [(1, 1), (65536, 1), (65537, 2), (5 * MIB + 3, 81)],
    ids=["1B", "one-leaf", "leaf+1", "5MiB+3"],
)
def test_seal_sizes(
    mock_manager: VramManager,
    mock_backend: Any,
    audit_capture: CapturingSink,
    pattern: Any,
    nbytes: int,
    leaves: int,
) -> None:
    data = pattern(nbytes)
    before = datetime.now(UTC)
    shard = mock_manager.seal_model(data, shard_id="s")
    assert shard.vram_bytes == nbytes
    assert shard.gpu_device == 0
    assert shard.leaf_size == 65536
    assert shard.digest_alg == "rfc6962-sha256"
    assert len(hash_leaves(data)) == leaves
    assert shard.digest == merkle_root(hash_leaves(data)).hex()
    assert before - timedelta(seconds=1) <= shard.sealed_at <= datetime.now(UTC)
    assert shard.sealed_at.tzinfo is not None
    assert mock_manager.used_vram() == nbytes
    with mock_manager.verified(shard) as buf:
        assert buf.nbytes == nbytes
        assert _read(mock_backend, buf) == data
    sealed = audit_capture.of_type("vram.sealed")[0]
    assert sealed.digest == shard.digest  # type: ignore[attr-defined]
    assert sealed.nbytes == nbytes  # type: ignore[attr-defined]
    assert audit_capture.types() == ["vram.allocated", "vram.sealed", "seal.verified"]


def test_seal_accepts_any_contiguous_buffer(mock_manager: VramManager) -> None:
    ints = array.array("I", range(1000))
    shard = mock_manager.seal_model(ints, shard_id="ints")
    assert shard.vram_bytes == 4000
    assert shard.digest == merkle_root(hash_leaves(ints.tobytes())).hex()
    mv = mock_manager.seal_model(memoryview(bytearray(b"abc")), shard_id="mv")
    assert mv.vram_bytes == 3


def test_custom_leaf_size(new_manager: Any, mock_backend: Any, pattern: Any) -> None:
    manager = new_manager(mock_backend, audit="disabled", leaf_size=4096)
    data = pattern(10 * 4096 + 1)
    shard = manager.seal_model(data)
    assert shard.leaf_size == 4096
    assert shard.digest == merkle_root(hash_leaves(data, 4096)).hex()
    assert shard.shard_id.startswith("shard-")
    with manager.verified(shard) as buf:
        mock_backend.flip_bit(buf, 5000)
    with pytest.raises(Exception, match="bytes 4096-8191"):
        manager.verify_sealed(shard)


@pytest.mark.parametrize(
    "kwargs",
    [{"leaf_size": 1000}, {"leaf_size": 0}, {"chunk_bytes": 0}, {"chunk_bytes": -1}],
    ids=repr,
)
def test_bad_manager_sizes(make_plugin_manager: Any, mock_backend: Any, kwargs: Any) -> None:
    with pytest.raises(InvalidInput):
        VramManager(
            TEST_TOKEN,
            allocator=mock_backend,
            plugin_manager=make_plugin_manager(),
            audit="disabled",
            **kwargs,
        )


# -- seal_file ------------------------------------------------------------------------------


def test_seal_file_seals_the_bytes_as_they_are(
    mock_manager: VramManager, mock_backend: Any, safetensors_file: Path
) -> None:
    raw = safetensors_file.read_bytes()
    shard = mock_manager.seal_file(str(safetensors_file))
    assert shard.vram_bytes == len(raw)
    assert shard.digest == merkle_root(hash_leaves(raw)).hex()
    with mock_manager.verified(shard) as buf:
        assert _read(mock_backend, buf) == raw
    assert shard.shard_id == "model.safetensors"
    with pytest.raises(InvalidInput, match="already sealed"):
        mock_manager.seal_file(safetensors_file)


def test_seal_file_with_a_name_that_is_no_shard_id(
    mock_manager: VramManager, tmp_path: Path
) -> None:
    path = tmp_path / "my model (v2).bin"
    path.write_bytes(b"w" * 10)
    assert mock_manager.seal_file(path).shard_id.startswith("shard-")
    assert mock_manager.seal_file(path, shard_id="named").shard_id == "named"


def test_seal_file_input_errors(
    mock_manager: VramManager, mock_backend: Any, tmp_path: Path
) -> None:
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(InvalidInput, match="no such file"):
        mock_manager.seal_file(tmp_path / "missing.bin")
    with pytest.raises(InvalidInput, match="is a directory"):
        mock_manager.seal_file(tmp_path)
    with pytest.raises(InvalidInput, match="empty"):
        mock_manager.seal_file(empty)
    with pytest.raises(InvalidInput, match="64 hexadecimal"):
        mock_manager.seal_file(_write(tmp_path / "ok.bin", b"x"), expected_sha256="xyz")
    assert mock_backend.allocations == 0


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _header(header: object, data: bytes = b"\0" * 16, length: int | None = None) -> bytes:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(blob) if length is None else length
    return struct.pack("<Q", n) + blob + data


@pytest.mark.parametrize(
    "content",
    [
        b"short",
        struct.pack("<Q", 1 << 40) + b"{}",
        _header({}, length=100),
        _header(b"{not json"),
        _header(b"\xff\xfe{}"),
        _header([1, 2]),
        _header({"t": {"dtype": "F32", "shape": [4]}}),
        _header({"t": {"data_offsets": [0, 17]}}),
        _header({"t": {"data_offsets": [8, 4]}}),
        _header({"t": {"data_offsets": [-1, 4]}}),
        _header({"t": {"data_offsets": [0, 4, 8]}}),
        _header({"t": {"data_offsets": [0, True]}}),
        _header({"t": {"data_offsets": ["0", "4"]}}),
        _header({"t": "offsets"}),
        _header({"bad\x1b[2Jname": {"data_offsets": [0, 4]}}),
        _header({"evil\u202eexe.txt": {"data_offsets": [0, 4]}}),
    ],
    ids=lambda c: repr(c[:40]),
)
def test_malformed_safetensors_header(
    mock_manager: VramManager, mock_backend: Any, tmp_path: Path, content: bytes
) -> None:
    path = _write(tmp_path / "bad.safetensors", content)
    with pytest.raises(IntegrityViolation) as info:
        mock_manager.seal_file(path)
    assert "\x1b" not in str(info.value) and "\u202e" not in str(info.value)
    assert mock_backend.allocations == 0
    assert mock_manager.shards() == []


def test_safetensors_metadata_is_not_a_tensor(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "m.safetensors",
        _header(
            {
                "__metadata__": {"format": "pt"},
                "b": {"dtype": "F32", "shape": [3], "data_offsets": [4, 16]},
                "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
            }
        ),
    )
    with path.open("rb") as fh:
        tensors = read_tensor_map(fh, path.stat().st_size)
    base = path.stat().st_size - 16
    assert [(t.name, t.start, t.end) for t in tensors] == [
        ("a", base, base + 4),
        ("b", base + 4, base + 16),
    ]


def test_write_safetensors_round_trips(tmp_path: Path, model_tensors: dict[str, Any]) -> None:
    path = tmp_path / "w.safetensors"
    with path.open("wb") as fh:
        write_safetensors(fh, model_tensors)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0
    with path.open("rb") as fh:
        tensors = read_tensor_map(fh, len(raw))
    for t in tensors:
        assert raw[t.start : t.end] == model_tensors[t.name][2]


def test_seal_file_host_memory_is_bounded(new_manager: Any, tmp_path: Path) -> None:
    size = 64 * MIB
    path = tmp_path / "big.bin"
    with path.open("wb") as fh:
        for i in range(64):
            fh.write(bytes([i]) * MIB)
    backend = MockBackend(capacity=128 * MIB)
    manager = new_manager(backend, audit="disabled", chunk_bytes=MIB)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        shard = manager.seal_file(path)
        seal_peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        manager.verify_sealed(shard)
        verify_peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    # The mock's "VRAM" is a host bytearray of the shard's size; beyond it, a few 1 MiB chunks.
    assert seal_peak - size < 8 * MIB, f"seal_file peaked at {seal_peak - size} bytes over"
    assert verify_peak < 8 * MIB, f"verification peaked at {verify_peak} bytes"
    assert shard.vram_bytes == size


# -- input validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shard_id", "message"),
    [
        ("", "is empty"),
        ("a" * 257, "257 characters long"),
        ("models/llama", "outside"),
        ("..", "'..'"),
        ("a..b", "'..'"),
        ("tab\tname", "outside"),
        ("nul\x00", "outside"),
        ("esc\x1b[31m", "outside"),
        ("caf\u00e9", "outside"),
        ("rtl\u202e", "outside"),
        ("space name", "outside"),
    ],
    ids=repr,
)
def test_bad_shard_ids(mock_manager: VramManager, shard_id: str, message: str) -> None:
    with pytest.raises(InvalidInput, match="shard_id") as info:
        mock_manager.seal_model(b"x", shard_id=shard_id)
    text = str(info.value)
    assert message in text
    assert "\x1b" not in text and "\x00" not in text and "\u202e" not in text
    assert len(text) < 200
    assert mock_manager.used_vram() == 0


@pytest.mark.parametrize("shard_id", ["a", "a" * 256, "Model-v1.2_shard:03", "x.y"])
def test_good_shard_ids(mock_manager: VramManager, shard_id: str) -> None:
    assert mock_manager.seal_model(b"x", shard_id=shard_id).shard_id == shard_id


def test_shard_id_must_be_a_string(mock_manager: VramManager) -> None:
    with pytest.raises(InvalidInput, match="must be a string"):
        mock_manager.seal_model(b"x", shard_id=42)  # type: ignore[arg-type]


def test_duplicate_shard_id(mock_manager: VramManager, mock_backend: Any) -> None:
    mock_manager.seal_model(b"x", shard_id="dup")
    with pytest.raises(InvalidInput, match="already sealed"):
        mock_manager.seal_model(b"y", shard_id="dup")
    assert mock_backend.live_allocations == 1
    mock_manager.deallocate("dup")
    mock_manager.seal_model(b"y", shard_id="dup")  # free again after deallocation


@pytest.mark.parametrize("data", ["text", [1, 2], 42, None, memoryview(b"abcdef")[::2]], ids=repr)
def test_data_must_be_a_contiguous_buffer(mock_manager: VramManager, data: Any) -> None:
    with pytest.raises(InvalidInput, match="data must be"):
        mock_manager.seal_model(data)


@pytest.mark.parametrize("data", [b"", bytearray(), memoryview(b"")])
def test_empty_data(mock_manager: VramManager, mock_backend: Any, data: Any) -> None:
    with pytest.raises(InvalidInput, match="greater than 0"):
        mock_manager.seal_model(data)
    assert mock_backend.allocations == 0


@pytest.mark.parametrize("device", [1, 7, -1, True, "0", 0.0])
def test_device_index_out_of_range(
    make_plugin_manager: Any, mock_backend: Any, device: Any
) -> None:
    with pytest.raises(InvalidInput, match="device") as info:
        VramManager(
            TEST_TOKEN,
            device,
            allocator=mock_backend,
            plugin_manager=make_plugin_manager(),
            audit="disabled",
        )
    if device in (1, 7, -1) and not isinstance(device, bool):
        assert "1 device(s), indexes 0..0" in str(info.value)


@pytest.mark.parametrize("token", ["short", b"fifteen-bytes!!", "", "\u00e9" * 7])
def test_short_token(make_plugin_manager: Any, mock_backend: Any, token: Any) -> None:
    with pytest.raises(InvalidInput, match="worker_token is too short"):
        VramManager(
            token, allocator=mock_backend, plugin_manager=make_plugin_manager(), audit="disabled"
        )


def test_worker_id_is_checked(make_plugin_manager: Any, mock_backend: Any) -> None:
    with pytest.raises(InvalidInput, match="worker_id"):
        VramManager(
            TEST_TOKEN,
            allocator=mock_backend,
            plugin_manager=make_plugin_manager(),
            audit="disabled",
            worker_id="w\n1",
        )


def test_deallocate_checks_its_argument(mock_manager: VramManager) -> None:
    with pytest.raises(InvalidInput):
        mock_manager.deallocate("../x")
    with pytest.raises(NotSealed):
        mock_manager.deallocate("never-sealed")
