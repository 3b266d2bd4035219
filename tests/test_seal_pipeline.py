"""The seal pipeline: several reader threads fill a ring of staging buffers and hash what they
read while this thread copies in file order (issue 21 item 1, issue 19 item 6); and a
verification with no narration wrapper skips the hook call (issue 21 item 3)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import vramcore_allocator_mock

import vramcore._loading
from vramcore import VramManager, hookimpl
from vramcore._loading import DEFAULT_MAX_READERS, MAX_READERS, default_readers
from vramcore.digest import hash_leaves_packed, merkle_root
from vramcore.errors import ConfigError, InvalidInput
from vramcore.narration import Operation
from vramcore.plugins import get_plugin_manager
from vramcore.testing import TEST_TOKEN

LEAF = 4096


def _manager(read_threads: int, plugins: list[Any] | None = None) -> VramManager:
    backend = vramcore_allocator_mock.MockBackend(devices=1, capacity=64 << 20)
    pm = get_plugin_manager([vramcore_allocator_mock, *(plugins or [])], load_entrypoints=False)
    return VramManager(
        TEST_TOKEN,
        allocator=backend,
        plugin_manager=pm,
        audit="disabled",
        leaf_size=LEAF,
        chunk_bytes=2 * LEAF,
        read_threads=read_threads,
    )


class _CopySpy:
    """A narration wrapper keeping the attributes of every ``copy`` operation."""

    def __init__(self) -> None:
        self.copies: list[dict[str, Any]] = []
        self.operations = 0

    @hookimpl(wrapper=True)
    def vramcore_operation(self, op: Operation) -> Any:
        self.operations += 1
        result = yield
        if op.name == "copy":
            self.copies.append(dict(op.attributes))
        return result


@pytest.mark.parametrize("readers", [1, 2, 3, 5])
@pytest.mark.parametrize("size", [1, 2 * LEAF, 5 * 2 * LEAF + 17])
def test_any_reader_count_seals_the_files_exact_bytes(
    tmp_path: Path, readers: int, size: int
) -> None:
    data = os.urandom(size)
    path = tmp_path / "shard.bin"
    path.write_bytes(data)
    with _manager(readers) as manager:
        shard = manager.seal_file(path, compute_sha256=True)
        manager.verify_sealed(shard)
    assert shard.digest == merkle_root(hash_leaves_packed(data, LEAF)).hex()
    assert shard.file_sha256 == hashlib.sha256(data).hexdigest()


def test_the_copy_operation_says_where_its_time_went(tmp_path: Path) -> None:
    path = tmp_path / "shard.bin"
    path.write_bytes(os.urandom(12 * LEAF))
    spy = _CopySpy()
    with _manager(3, [spy]) as manager:
        manager.seal_file(path)
        manager.seal_model(b"m" * LEAF)
    from_file, from_memory = spy.copies
    assert from_file["read_threads"] == 3
    for key in ("read_cpu_us", "hash_cpu_us", "copy_cpu_us", "stall_us", "cpu_us", "wall_us"):
        assert isinstance(from_file[key], int) and from_file[key] >= 0
    assert from_file["wall_us"] > 0
    assert "read_threads" not in from_memory  # bytes in memory are not read


def test_read_threads_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in (0, MAX_READERS + 1, True, "2"):
        with pytest.raises(InvalidInput, match="read_threads"):
            _manager(bad)  # type: ignore[arg-type]
    monkeypatch.setenv("VRAMCORE_READ_THREADS", "3")
    assert default_readers() == 3
    for bad_env in ("0", "x", "65"):
        monkeypatch.setenv("VRAMCORE_READ_THREADS", bad_env)
        with pytest.raises(ConfigError, match="VRAMCORE_READ_THREADS"):
            default_readers()
    monkeypatch.delenv("VRAMCORE_READ_THREADS")
    assert default_readers(3) == 3  # the hash workers
    assert default_readers(64) == DEFAULT_MAX_READERS


def test_an_unreadable_file_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "shard.bin"
    path.write_bytes(os.urandom(8 * LEAF))

    def failing_preadv(*_args: Any) -> int:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "preadv", failing_preadv)
    with _manager(2) as manager:
        with pytest.raises(InvalidInput, match=r"cannot read .*Input/output error"):
            manager.seal_file(path)
        assert manager.used_vram() == 0


def test_with_no_wrapper_the_operation_hook_is_not_called() -> None:
    calls: list[str] = []
    backend = vramcore_allocator_mock.MockBackend(devices=1, capacity=1 << 20)
    pm = get_plugin_manager([vramcore_allocator_mock], load_entrypoints=False)
    pm.add_hookcall_monitoring(lambda name, _impls, _kw: calls.append(name), lambda *_: None)
    with VramManager(TEST_TOKEN, allocator=backend, plugin_manager=pm, audit="disabled") as vm:
        shard = vm.seal_model(b"v" * LEAF)
        calls.clear()
        vm.verify_sealed(shard)
        assert "vramcore_operation" not in calls  # the core's step ran without pluggy
        spy = _CopySpy()
        pm.register(spy)
        vm.verify_sealed(shard)
        assert spy.operations == 2  # verify and its digest: a wrapper sees them again
        assert "vramcore_operation" in calls


@pytest.mark.parametrize("cpus", [{0, 1}, {3, 5, 6}, {2}])
def test_reader_threads_work_on_cpus_of_their_own_and_give_them_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpus: set[int]
) -> None:
    # Each reader is pinned to one CPU of the process's set, a different one per reader,
    # only while it reads and hashes a chunk; with fewer CPUs than readers nobody is pinned.
    calls: list[tuple[int, frozenset[int]]] = []
    monkeypatch.setattr(vramcore._loading, "_allowed_cpus", lambda: set(cpus))
    monkeypatch.setattr(
        os,
        "sched_setaffinity",
        lambda pid, mask: calls.append((threading.get_native_id(), frozenset(mask))),
        raising=False,
    )
    data = os.urandom(40 * LEAF + 5)
    path = tmp_path / "pinned.bin"
    path.write_bytes(data)
    with _manager(2) as manager:
        shard = manager.seal_file(path)
        assert shard.digest == merkle_root(hash_leaves_packed(data, LEAF)).hex()
    if len(cpus) < 2:
        assert calls == []
        return
    by_thread: dict[int, list[frozenset[int]]] = {}
    for tid, mask in calls:
        by_thread.setdefault(tid, []).append(mask)
    pins: dict[int, set[frozenset[int]]] = {}
    for tid, masks in by_thread.items():
        assert masks[1::2] == [frozenset(cpus)] * (len(masks) // 2)  # given back each time
        assert len(masks) % 2 == 0
        for mask in masks[::2]:
            assert len(mask) == 1 and mask <= cpus
        pins[tid] = set(masks[::2])
    assert pins and all(len(masks) == 1 for masks in pins.values())  # one CPU per thread
    if len(pins) == 2:
        assert len(set.union(*pins.values())) == 2  # and not the same one
