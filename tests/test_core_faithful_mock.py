"""The whole manager on every mock configuration, the GPU-like ones included.

A backend with asynchronous copies, garbage in fresh memory, strict close, an opaque
``native`` and a device digest behaves like a CUDA device where it matters to the core; the
manager's results must not depend on which one runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vramcore.digest import hash_leaves_packed, merkle_root
from vramcore.errors import SealVerificationFailed
from vramcore.manager import VramManager
from vramcore.testing import CapturingSink

LEAF = 65536

CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "async": {"async_copies": True},
    "uninitialised": {"uninitialised": True},
    "strict-close": {"strict_close": True},
    "device-digest": {"device_digest": True},
    "opaque-native": {"opaque_native": True},
    "faithful": {"faithful": True},
    "faithful-device-digest": {"faithful": True, "device_digest": True},
}


@pytest.fixture(params=sorted(CONFIGS))
def backend(request: pytest.FixtureRequest, mock_backend: Any) -> Any:
    options = dict(CONFIGS[request.param])
    cls = type(mock_backend)
    if options.pop("faithful", False):
        return cls.faithful(devices=1, capacity=1 << 30, **options)
    return cls(devices=1, capacity=1 << 30, **options)


def test_seal_verify_tamper_and_free_on_every_configuration(
    new_manager: Callable[..., VramManager],
    backend: Any,
    safetensors_file: Path,
    pattern: Any,
    tmp_path: Path,
) -> None:
    sink = CapturingSink()
    manager = new_manager(backend, sink=sink, chunk_bytes=2 * LEAF)
    data = pattern(7 * LEAF + 5, 11)
    from_memory = manager.seal_model(data, shard_id="mem")
    assert from_memory.digest == merkle_root(hash_leaves_packed(data)).hex()
    raw = safetensors_file.read_bytes()
    model = manager.seal_file(safetensors_file, compute_sha256=True)
    assert model.digest == merkle_root(hash_leaves_packed(raw)).hex()
    plain = tmp_path / "plain.bin"
    plain.write_bytes(data)
    from_file = manager.seal_file(plain)
    assert from_file.digest == from_memory.digest
    for shard in (from_memory, model, from_file):
        manager.verify_sealed(shard)
        manager.verify_sealed(shard, sample=0.5)
    with manager.verified(model) as buf:
        out = bytearray(buf.nbytes)
        backend.read_into(buf, 0, memoryview(out))
        assert bytes(out) == raw
        backend.flip_bit(buf, len(raw) - 1)
    with pytest.raises(SealVerificationFailed) as info:
        manager.verify_sealed(model)
    assert info.value.tensors  # localised to a tensor
    assert info.value.corrupted_ranges[-1][1] == len(raw)
    for shard in (from_memory, model, from_file):
        manager.deallocate(shard)
    assert backend.live_allocations == 0
    manager.close()
    assert sink.closed
