"""Pageable vs pinned copies on the fake CUDA runtime, as CUDA's "API synchronization behavior"
describes ``cudaMemcpyAsync``, and the core's copy contract checked against them.

* From pinned memory the copy is fully asynchronous: it reads its source when the stream runs
  it, so a caller that reuses the buffer before waiting copies the new bytes, and one that
  frees it copies what was left there (the fake's ``raced`` / ``freed_pending`` counters).
* From pageable memory the driver stages the source before the call returns: reusing it at
  once is safe. Into pageable memory the call returns only once the copy has completed.

The tests that say "Old fake" failed on the fake before these semantics: it queued every copy,
pageable or not, and ``free_host`` freed the memory for real, so a copy queued from it read
freed memory (undefined behaviour in the test process; in practice the old bytes but for the
allocator's free-list pointers, so a freed-before-wait caller was caught only by accident).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import pytest
import vramcore_allocator_cupy as plugin
from vramcore_allocator_cupy import CupyBackend
from vramcore_allocator_cupy.testing import POISON, FakeCuda

from vramcore import VramManager, _loading
from vramcore.digest import hash_leaves, merkle_root
from vramcore.errors import IntegrityViolation
from vramcore.testing import TEST_TOKEN, CapturePlugin, CapturingSink

LEAF = 65536
N = 4096


def _device_bytes(fake: FakeCuda, ptr: int, n: int = N) -> bytes:
    return fake.mem[ptr][1].raw[:n]


def _setup(fake: FakeCuda) -> tuple[int, int]:
    return fake.malloc(0, N), fake.stream_create(0)


# -- the fake itself ---------------------------------------------------------------------------


def test_a_pageable_source_is_staged_when_the_copy_is_issued(fake_cuda: FakeCuda) -> None:
    # Old fake: queued the copy and read the source at the sync, so the device got b"B"s.
    dst, stream = _setup(fake_cuda)
    src = ctypes.create_string_buffer(b"A" * N, N)
    fake_cuda.memcpy_async(0, dst, ctypes.addressof(src), N, True, stream)
    ctypes.memset(src, ord("B"), N)  # reused at once: allowed for pageable memory
    assert _device_bytes(fake_cuda, dst) == b"\0" * N, "the device write is still in stream order"
    fake_cuda.stream_synchronize(0, stream)
    assert _device_bytes(fake_cuda, dst) == b"A" * N
    assert fake_cuda.raced == 0


def test_a_pinned_source_is_read_when_the_copy_runs(fake_cuda: FakeCuda) -> None:
    dst, stream = _setup(fake_cuda)
    src = fake_cuda.host_alloc(N)
    ctypes.memset(src, ord("A"), N)
    fake_cuda.memcpy_async(0, dst, src, N, True, stream)
    ctypes.memset(src, ord("B"), N)  # reused before the wait: a GPU copies the new bytes
    fake_cuda.stream_synchronize(0, stream)
    assert _device_bytes(fake_cuda, dst) == b"B" * N
    assert fake_cuda.raced == 1


def test_a_read_into_pageable_memory_is_complete_when_the_call_returns(
    fake_cuda: FakeCuda,
) -> None:
    # Old fake: queued the read too, so the bytes arrived only at the sync.
    dst, stream = _setup(fake_cuda)
    src = ctypes.create_string_buffer(b"C" * N, N)
    fake_cuda.memcpy_async(0, dst, ctypes.addressof(src), N, True, stream)
    out = ctypes.create_string_buffer(N)
    fake_cuda.memcpy_async(0, ctypes.addressof(out), dst, N, False, stream)
    assert out.raw == b"C" * N, "the earlier copy on the stream ran first"
    pinned = fake_cuda.host_alloc(N)
    fake_cuda.memcpy_async(0, pinned, dst, N, False, stream)
    assert ctypes.string_at(pinned, N) == b"\0" * N, "into pinned memory: queued"
    fake_cuda.stream_synchronize(0, stream)
    assert ctypes.string_at(pinned, N) == b"C" * N


def test_pinned_memory_freed_under_a_queued_copy_copies_garbage(fake_cuda: FakeCuda) -> None:
    # Old fake: freed the ctypes buffer for real; the queued copy read freed memory (the old
    # bytes but for the allocator's free-list pointers) and nothing counted the mistake.
    dst, stream = _setup(fake_cuda)
    src = fake_cuda.host_alloc(N)
    ctypes.memset(src, ord("A"), N)
    fake_cuda.memcpy_async(0, dst, src, N, True, stream)
    fake_cuda.free_host(src)
    fake_cuda.stream_synchronize(0, stream)
    assert _device_bytes(fake_cuda, dst) == bytes([POISON]) * N
    assert fake_cuda.freed_pending == 1
    other = fake_cuda.host_alloc(N)  # freeing with nothing queued is not counted
    fake_cuda.free_host(other)
    assert fake_cuda.freed_pending == 1


# -- a caller that breaks the copy contract is caught -----------------------------------------


def test_releasing_a_staging_buffer_before_the_wait_copies_the_wrong_bytes(
    host_lib: Any,
) -> None:
    # Old fake: the released buffer was freed for real and the copy read freed memory; only
    # the allocator's bookkeeping bytes differed, and nothing counted the mistake.
    fake = FakeCuda(host_lib)
    backend = CupyBackend(fake, nvml=False, staging_keep=0)  # released = freed at once
    buf = backend.allocate(0, N)
    with backend.staging(1, N) as (lent,):
        lent[:] = b"D" * N
        handle = backend.copy_in(buf, 0, lent)
        assert handle is not None
    handle.wait()  # too late: the staging block has ended
    out = bytearray(N)
    backend.read_into(buf, 0, memoryview(out))
    assert bytes(out) != b"D" * N
    assert fake.freed_pending == 1
    backend.close()


def test_reusing_a_staging_buffer_before_the_wait_copies_the_new_bytes(
    fake_cuda: FakeCuda, fake_backend: CupyBackend
) -> None:
    buf = fake_backend.allocate(0, N)
    with fake_backend.staging(1, N) as (lent,):
        lent[:] = b"E" * N
        handle = fake_backend.copy_in(buf, 0, lent)
        assert handle is not None
        lent[:] = b"F" * N  # the next chunk read into the slot before the wait
        handle.wait()
    out = bytearray(N)
    fake_backend.read_into(buf, 0, memoryview(out))
    assert bytes(out) == b"F" * N
    assert fake_cuda.raced == 1


def test_a_pageable_copy_in_is_done_when_it_returns(
    fake_cuda: FakeCuda, fake_backend: CupyBackend
) -> None:
    buf = fake_backend.allocate(0, N)
    data = bytearray(b"G" * N)
    assert fake_backend.copy_in(buf, 0, memoryview(data)) is None
    data[:] = b"H" * N
    out = bytearray(N)
    fake_backend.read_into(buf, 0, memoryview(out))
    assert bytes(out) == b"G" * N


# -- the core keeps the contract --------------------------------------------------------------


def _manager(fake: FakeCuda, make_plugin_manager: Any) -> tuple[VramManager, CupyBackend]:
    fake.attrs["PageableMemoryAccess"] = 0  # keep the policy out of these tests
    backend = CupyBackend(fake, nvml=False, staging_keep=0)  # every release frees
    pm = make_plugin_manager(plugin, CapturePlugin(CapturingSink()), mock=False)
    # One leaf per chunk: the ring of staging buffers is reused many times per file.
    return VramManager(TEST_TOKEN, allocator=backend, plugin_manager=pm, chunk_bytes=LEAF), backend


def test_the_core_never_reuses_or_releases_a_staging_buffer_before_the_wait(
    host_lib: Any, make_plugin_manager: Any, tmp_path: Path
) -> None:
    fake = FakeCuda(host_lib)
    manager, backend = _manager(fake, make_plugin_manager)
    data = bytes(range(251)) * 2000  # 502,000 bytes: 8 chunks through a ring of 4
    path = tmp_path / "w.bin"
    path.write_bytes(data)
    with manager:
        shard = manager.seal_file(path)
        assert shard.digest == merkle_root(hash_leaves(data, LEAF)).hex()
        manager.verify_sealed(shard)
    assert fake.calls.count("event_record") >= 8, "the chunks went through pinned staging"
    assert fake.calls.count("free_host") >= 2, "staging buffers were released (and freed)"
    assert (fake.raced, fake.freed_pending) == (0, 0)
    backend.close()


def test_a_core_that_skips_the_wait_is_caught(
    host_lib: Any, make_plugin_manager: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check above can fail: a core that forgot the copy handles trips the fake."""

    def drain_without_waiting(self: Any) -> None:
        self.handles.clear()
        for wait in self.waiters:
            wait()
        self.waiters.clear()

    monkeypatch.setattr(_loading._Pipeline, "drain", drain_without_waiting)
    fake = FakeCuda(host_lib)
    manager, backend = _manager(fake, make_plugin_manager)
    data = bytes(range(251)) * 2000
    path = tmp_path / "w.bin"
    path.write_bytes(data)
    with manager, pytest.raises(IntegrityViolation, match="cross-check failed"):
        manager.seal_file(path)  # the device hashed stale bytes; nothing was sealed
    assert fake.raced > 0 and fake.freed_pending > 0
    backend.close()
