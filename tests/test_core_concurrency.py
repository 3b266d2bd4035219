"""Thread safety: exact capacity accounting under load, deallocation vs verified(), close()."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from vramcore_allocator_mock import MockBackend

from vramcore import VramManager
from vramcore.errors import InsufficientVram, InvalidInput, ManagerClosed, NotSealed, VramError
from vramcore.testing import CapturingSink

THREADS = 8


def _read(backend: Any, buf: Any, n: int | None = None) -> bytes:
    """The buffer's first ``n`` bytes through the backend's own read path (never ``native``)."""
    out = bytearray(buf.nbytes if n is None else min(n, buf.nbytes))
    backend.read_into(buf, 0, memoryview(out))
    return bytes(out)


def _run_threads(target: Callable[[int], None], n: int = THREADS, timeout: float = 60) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            barrier.wait()
            target(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a worker thread hung"
    if errors:
        raise errors[0]


def test_concurrent_seal_verify_deallocate_keeps_accounting_exact(
    mock_manager: VramManager, mock_backend: Any, audit_capture: CapturingSink, pattern: Any
) -> None:
    kept: dict[str, int] = {}
    kept_lock = threading.Lock()
    payload = pattern(300_000)

    def worker(i: int) -> None:
        rng = random.Random(i)
        for round_ in range(6):
            shards = []
            for j in range(3):
                size = rng.randint(1, len(payload))
                shard = mock_manager.seal_model(payload[:size], shard_id=f"t{i}-r{round_}-{j}")
                shards.append(shard)
            for shard in shards:
                mock_manager.verify_sealed(shard)
                with mock_manager.verified(shard) as buf:
                    assert buf.nbytes == shard.vram_bytes
                    assert _read(mock_backend, buf, 16) == payload[:16][: shard.vram_bytes]
            with pytest.raises(InvalidInput):
                mock_manager.seal_model(b"dup", shard_id=shards[0].shard_id)
            keep = shards.pop(rng.randrange(len(shards)))
            with kept_lock:
                kept[keep.shard_id] = keep.vram_bytes
            for shard in shards:
                mock_manager.deallocate(shard)
                with pytest.raises(NotSealed):
                    mock_manager.verify_sealed(shard)
            mock_manager.available_vram()

    _run_threads(worker)
    assert len(kept) == THREADS * 6
    assert mock_manager.used_vram() == sum(kept.values())
    assert mock_backend.used_bytes() == sum(kept.values())
    assert mock_backend.live_allocations == len(kept)
    assert {s.shard_id: s.vram_bytes for s in mock_manager.shards()} == kept
    assert mock_manager.available_vram() == mock_manager.total_vram() - sum(kept.values())
    types = audit_capture.types()
    assert types.count("vram.sealed") == THREADS * 6 * 3
    assert types.count("vram.deallocated") == THREADS * 6 * 2
    assert types.count("seal.verified") == THREADS * 6 * 3 * 2
    mock_manager.close()
    assert mock_backend.used_bytes() == 0
    assert mock_backend.live_allocations == 0


def test_concurrent_seals_racing_for_capacity(new_manager: Any) -> None:
    backend = MockBackend(capacity=1 << 20)
    manager = new_manager(backend, audit="disabled")
    results: dict[int, bool] = {}

    def worker(i: int) -> None:
        for k in range(20):
            try:
                shard = manager.seal_model(bytes(200_000), shard_id=f"w{i}-{k}")
            except InsufficientVram:
                results[i * 100 + k] = False
                continue
            results[i * 100 + k] = True
            if k % 2:
                manager.deallocate(shard)

    _run_threads(worker)
    resident = manager.shards()
    assert manager.used_vram() == sum(s.vram_bytes for s in resident) == backend.used_bytes()
    assert backend.live_allocations == len(resident)
    assert manager.used_vram() <= 1 << 20
    assert any(results.values())


def test_many_threads_verify_one_shard_while_it_is_deallocated(
    mock_manager: VramManager, mock_backend: Any
) -> None:
    shard = mock_manager.seal_model(bytes(256 * 1024), shard_id="shared")
    outcomes: list[str] = []

    def worker(i: int) -> None:
        if i == 0:
            time.sleep(0.01)
            mock_manager.deallocate(shard)
            outcomes.append("deallocated")
            return
        for _ in range(50):
            try:
                with mock_manager.verified(shard) as buf:
                    assert not buf.freed
                    assert _read(mock_backend, buf, 4) == b"\0\0\0\0"
                outcomes.append("ok")
            except NotSealed:
                outcomes.append("gone")

    _run_threads(worker)
    assert "deallocated" in outcomes
    assert mock_backend.live_allocations == 0
    assert mock_manager.used_vram() == 0


def test_deallocate_waits_for_a_verified_block_in_another_thread(
    mock_manager: VramManager, mock_backend: Any
) -> None:
    shard = mock_manager.seal_model(b"w" * 70000, shard_id="busy")
    inside = threading.Event()
    leave = threading.Event()
    seen: list[Any] = []

    def reader() -> None:
        with mock_manager.verified(shard) as buf:
            seen.append(buf)
            inside.set()
            leave.wait(10)
            seen.append(_read(mock_backend, buf, 3))  # still readable

    def deallocator() -> None:
        mock_manager.deallocate(shard)
        seen.append("freed")

    r = threading.Thread(target=reader)
    r.start()
    assert inside.wait(10)
    d = threading.Thread(target=deallocator)
    d.start()
    d.join(0.3)
    assert d.is_alive(), "deallocate returned while the shard was in use"
    buf = seen[0]
    assert not buf.freed
    assert mock_backend.live_allocations == 1
    with pytest.raises(NotSealed):  # it is no longer offered to new users meanwhile
        mock_manager.verify_sealed(shard)
    leave.set()
    r.join(10)
    d.join(10)
    assert not d.is_alive()
    assert seen[1:] == [b"www", "freed"]
    assert buf.freed
    assert mock_backend.live_allocations == 0
    assert mock_manager.used_vram() == 0


def test_deallocate_inside_own_verified_block_is_refused(
    mock_manager: VramManager, mock_backend: Any
) -> None:
    shard = mock_manager.seal_model(b"w" * 100, shard_id="mine")
    with mock_manager.verified(shard), mock_manager.verified(shard):
        with pytest.raises(InvalidInput, match="inside its own verified"):
            mock_manager.deallocate(shard)
        with pytest.raises(InvalidInput):
            mock_manager.deallocate("mine")
    assert [s.shard_id for s in mock_manager.shards()] == ["mine"]
    mock_manager.verify_sealed(shard)
    mock_manager.deallocate(shard)  # fine once both blocks have left
    assert mock_backend.live_allocations == 0


def test_verified_block_releases_its_claim_when_the_body_raises(
    mock_manager: VramManager,
) -> None:
    shard = mock_manager.seal_model(b"w" * 100, shard_id="s")
    with pytest.raises(RuntimeError), mock_manager.verified(shard):
        raise RuntimeError("inference failed")
    mock_manager.deallocate(shard)  # would block forever if the claim leaked
    assert mock_manager.shards() == []


def test_close_frees_everything_and_is_idempotent(
    mock_manager: VramManager, mock_backend: Any, audit_capture: CapturingSink, tmp_path: Any
) -> None:
    shards = [mock_manager.seal_model(b"x" * (1000 * (i + 1)), shard_id=f"s{i}") for i in range(4)]
    assert mock_backend.live_allocations == 4
    mock_manager.close()
    assert mock_backend.live_allocations == 0
    assert mock_backend.used_bytes() == 0
    assert mock_manager.used_vram() == 0
    assert audit_capture.types().count("vram.deallocated") == 4
    assert audit_capture.closed
    with pytest.raises(ManagerClosed):  # the key is wiped: nothing verifies any more
        mock_manager.verify_sealed(shards[0])
    assert not mock_backend.closed  # a backend passed in belongs to the caller
    assert "closed" in repr(mock_manager)
    mock_manager.close()
    assert audit_capture.types().count("vram.deallocated") == 4
    path = tmp_path / "f.bin"
    path.write_bytes(b"x")
    operations: list[Callable[[], Any]] = [
        lambda: mock_manager.seal_model(b"x"),
        lambda: mock_manager.seal_file(path),
        lambda: mock_manager.verify_sealed(shards[0]),
        lambda: mock_manager.deallocate(shards[0]),
        lambda: mock_manager.verified(shards[0]).__enter__(),
        mock_manager.available_vram,
        mock_manager.total_vram,
    ]
    for op in operations:
        with pytest.raises(VramError, match="closed"):
            op()


def test_context_manager_closes(new_manager: Any, mock_backend: Any) -> None:
    with new_manager(mock_backend, audit="disabled") as manager:
        manager.seal_model(b"x" * 10)
        assert mock_backend.live_allocations == 1
    assert mock_backend.live_allocations == 0
    with pytest.raises(VramError):
        manager.seal_model(b"x")
