"""Pageable vs page-locked copies on the stand-in PyCUDA, as CUDA's "API synchronization
behavior" describes ``cuMemcpyHtoDAsync`` (PyCUDA's ``memcpy_htod_async`` calls it with the
buffer's address), and the core's copy contract checked against them.

* From page-locked memory the copy is fully asynchronous: it reads its source when the stream
  runs it, so reusing the buffer before waiting copies the new bytes (``raced``) and freeing
  it copies what freed memory holds (``freed_pending``).
* From pageable memory the driver stages the source before the call returns.

The tests that say "Old fake" failed on the stand-in before these semantics: it queued every
asynchronous copy, and ``HostAllocation.free`` only set a flag, so the bytes stayed in place
and a caller that freed a staging buffer before waiting passed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import vramcore_allocator_pycuda
from vramcore_allocator_pycuda import DriverApi, PyCudaBackend, _copies, _kernels

from vramcore import VramManager, _loading
from vramcore.digest import hash_leaves, merkle_root
from vramcore.errors import IntegrityViolation
from vramcore.kernels import _nvrtc
from vramcore.testing import TEST_TOKEN, CapturePlugin, CapturingSink

LEAF = 65536
N = 4096


@pytest.fixture(autouse=True)
def shipped_ptx(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels as the shipped PTX: the fake driver loads it at once, where an NVRTC
    compile per backend costs about 2 s (NVRTC is tested in tests/test_kernel_nvrtc.py)."""
    text, _digest = _nvrtc.shipped_ptx()
    image = _nvrtc.KernelImage(
        data=text.encode("ascii") + b"\0", kind="ptx", origin="shipped PTX compute_80"
    )
    monkeypatch.setattr(_kernels, "kernel_image", lambda *args: image)


@pytest.fixture
def context(fake_driver: Any) -> Iterator[Any]:
    """The fake's primary context, current on this thread for the test."""
    ctx = fake_driver.primary_contexts[0]
    ctx.push()
    yield ctx
    ctx.pop()


def _device(fake_driver: Any, alloc: Any, n: int = N) -> bytes:
    out = bytearray(n)
    fake_driver.memcpy_dtoh(out, alloc)  # synchronous: drains every stream first
    return bytes(out)


def test_a_pageable_source_is_staged_when_the_copy_is_issued(
    fake_driver: Any, context: Any
) -> None:
    # Old fake: queued the copy with the source's address, so the device got b"B"s.
    dst = fake_driver.mem_alloc(N)
    stream = fake_driver.Stream()
    src = np.frombuffer(bytearray(b"A" * N), dtype=np.uint8)
    fake_driver.memcpy_htod_async(dst, src, stream)
    src[:] = ord("B")  # reused at once: allowed for pageable memory
    assert stream.queue, "the device write is still in stream order"
    assert _device(fake_driver, dst) == b"A" * N
    assert fake_driver.raced == 0
    dst.free()


def test_a_page_locked_source_is_read_when_the_copy_runs(fake_driver: Any, context: Any) -> None:
    dst = fake_driver.mem_alloc(N)
    stream = fake_driver.Stream()
    src = fake_driver.pagelocked_empty(N, np.uint8, mem_flags=1)
    src[:] = ord("A")
    fake_driver.memcpy_htod_async(dst, src, stream)
    src[:] = ord("B")  # reused before the wait: a GPU copies the new bytes
    assert _device(fake_driver, dst) == b"B" * N
    assert fake_driver.raced == 1
    dst.free()


def test_page_locked_memory_freed_under_a_queued_copy_copies_garbage(
    fake_driver: Any, context: Any
) -> None:
    # Old fake: free() only set a flag; the copy still found b"A"s and nothing was counted.
    dst = fake_driver.mem_alloc(N)
    stream = fake_driver.Stream()
    src = fake_driver.pagelocked_empty(N, np.uint8, mem_flags=1)
    src[:] = ord("A")
    fake_driver.memcpy_htod_async(dst, src, stream)
    src.base.free()
    assert _device(fake_driver, dst) == bytes([fake_driver.POISON]) * N
    assert fake_driver.freed_pending == 1
    other = fake_driver.pagelocked_empty(N, np.uint8, mem_flags=1)
    other.base.free()  # nothing queued reads it: not counted
    assert fake_driver.freed_pending == 1
    dst.free()


# -- a caller that breaks the copy contract is caught -----------------------------------------


def test_releasing_a_staging_buffer_before_the_wait_copies_the_wrong_bytes(
    fake_api: DriverApi, fake_driver: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Old fake: the released (freed) buffer kept its bytes, so this copy "worked".
    monkeypatch.setattr(_copies, "PINNED_KEEP_BYTES", 0)  # released = freed at once
    backend = PyCudaBackend(fake_api)
    buf = backend.allocate(0, N)
    with backend.staging(1, N) as (lent,):
        lent[:] = b"D" * N
        handle = backend.copy_in(buf, 0, lent)
        assert handle is not None
    handle.wait()  # too late: the staging block has ended
    out = bytearray(N)
    backend.read_into(buf, 0, memoryview(out))
    assert bytes(out) == bytes([fake_driver.POISON]) * N
    assert fake_driver.freed_pending == 1
    backend.close()


def test_reusing_a_staging_buffer_before_the_wait_copies_the_new_bytes(
    fake_api: DriverApi, fake_driver: Any
) -> None:
    backend = PyCudaBackend(fake_api)
    buf = backend.allocate(0, N)
    with backend.staging(1, N) as (lent,):
        lent[:] = b"E" * N
        handle = backend.copy_in(buf, 0, lent)
        assert handle is not None
        lent[:] = b"F" * N  # the next chunk read into the slot before the wait
        handle.wait()
    out = bytearray(N)
    backend.read_into(buf, 0, memoryview(out))
    assert bytes(out) == b"F" * N
    assert fake_driver.raced == 1
    backend.close()


# -- the core keeps the contract --------------------------------------------------------------


def _manager(backend: PyCudaBackend, make_plugin_manager: Any) -> VramManager:
    pm = make_plugin_manager(vramcore_allocator_pycuda, CapturePlugin(CapturingSink()))
    # One leaf per chunk: the ring of staging buffers is reused many times per file.
    return VramManager(TEST_TOKEN, allocator=backend, plugin_manager=pm, chunk_bytes=LEAF)


def test_the_core_never_reuses_or_releases_a_staging_buffer_before_the_wait(
    fake_api: DriverApi,
    fake_driver: Any,
    make_plugin_manager: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_copies, "PINNED_KEEP_BYTES", 0)  # every release frees
    backend = PyCudaBackend(fake_api)
    data = bytes(range(251)) * 2000  # 502,000 bytes: 8 chunks through a ring of 4
    path = tmp_path / "w.bin"
    path.write_bytes(data)
    with _manager(backend, make_plugin_manager) as manager:
        shard = manager.seal_file(path)
        assert shard.digest == merkle_root(hash_leaves(data, LEAF)).hex()
        manager.verify_sealed(shard)
    assert fake_driver.events_made >= 1, "the chunks went through page-locked staging"
    assert sum(p.freed for p in fake_driver.pinned) >= 2, "staging buffers were freed"
    assert (fake_driver.raced, fake_driver.freed_pending) == (0, 0)
    backend.close()


def test_a_core_that_skips_the_wait_is_caught(
    fake_api: DriverApi,
    fake_driver: Any,
    make_plugin_manager: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The check above can fail: a core that forgot the copy handles trips the fake."""

    def drain_without_waiting(self: Any) -> None:
        self.handles.clear()
        for wait in self.waiters:
            wait()
        self.waiters.clear()

    monkeypatch.setattr(_loading._Pipeline, "drain", drain_without_waiting)
    monkeypatch.setattr(_copies, "PINNED_KEEP_BYTES", 0)
    backend = PyCudaBackend(fake_api)
    data = bytes(range(251)) * 2000
    path = tmp_path / "w.bin"
    path.write_bytes(data)
    with (
        _manager(backend, make_plugin_manager) as manager,
        pytest.raises(IntegrityViolation, match="cross-check failed"),
    ):
        manager.seal_file(path)  # the device hashed stale bytes; nothing was sealed
    assert fake_driver.raced > 0 and fake_driver.freed_pending > 0
    backend.close()
