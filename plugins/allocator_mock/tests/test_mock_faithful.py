"""The mock's GPU-like options: asynchronous copies, garbage memory, strict close, sticky
errors, injected read/free/wait/digest failures, opaque native and the mock device digest."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import vramcore_allocator_mock
from vramcore_allocator_mock import (
    BackendClosed,
    DevicePoisoned,
    MockBackend,
    MockCopyHandle,
    MockDeviceArray,
)

from vramcore.backend import CopyHandle, DeviceBuffer, DeviceDigest
from vramcore.digest import hash_leaves, merkle_root
from vramcore.errors import AllocationFailed, ConfigError, InvalidInput, VramError
from vramcore.plugins import get_plugin_manager, select_backend

LEAF = 65536


def read(backend: MockBackend, buf: DeviceBuffer, offset: int = 0, n: int | None = None) -> bytes:
    out = bytearray(buf.nbytes - offset if n is None else n)
    backend.read_into(buf, offset, memoryview(out))
    return bytes(out)


def wait_copy(handle: CopyHandle | None) -> None:
    assert handle is not None
    handle.wait()


def wait_until(condition: Any, what: str) -> None:
    """Poll ``condition`` (a hang guard, not a timing assertion)."""
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.001)


# -- configuration --------------------------------------------------------------------------


def test_from_env_reads_every_switch() -> None:
    backend = MockBackend.from_env(
        {
            "VRAMCORE_MOCK_ASYNC": "1",
            "VRAMCORE_MOCK_UNINITIALISED": "yes",
            "VRAMCORE_MOCK_STRICT_CLOSE": "true",
            "VRAMCORE_MOCK_STICKY_ERRORS": "on",
            "VRAMCORE_MOCK_DEVICE_DIGEST": "1",
            "VRAMCORE_MOCK_OPAQUE_NATIVE": "1",
            "VRAMCORE_MOCK_COPY_DELAY": "0.25",
            "VRAMCORE_MOCK_FAIL": "read:3, free:1",
        }
    )
    assert backend.async_copies
    assert backend.uninitialised
    assert backend.strict_close
    assert backend.sticky_errors
    assert backend.device_digest
    assert backend.opaque_native
    buf = backend.allocate(0, 8)
    with pytest.raises(DevicePoisoned, match=r"free #1 failed \(fail_at\)"):
        backend.free(buf)


def test_defaults_are_kind() -> None:
    backend = MockBackend.from_env({})
    assert not any(
        (
            backend.async_copies,
            backend.uninitialised,
            backend.strict_close,
            backend.sticky_errors,
            backend.device_digest,
            backend.opaque_native,
        )
    )


def test_faithful_switches_four_options_and_single_switches_override_it() -> None:
    backend = MockBackend.from_env(
        {"VRAMCORE_MOCK_FAITHFUL": "1", "VRAMCORE_MOCK_UNINITIALISED": "0"}
    )
    assert backend.async_copies
    assert backend.strict_close
    assert backend.opaque_native
    assert not backend.uninitialised
    assert not backend.device_digest
    direct = MockBackend.faithful(capacity=1 << 20, strict_close=False)
    assert direct.async_copies
    assert direct.uninitialised
    assert not direct.strict_close


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"VRAMCORE_MOCK_ASYNC": "maybe"}, "VRAMCORE_MOCK_ASYNC"),
        ({"VRAMCORE_MOCK_FAITHFUL": "2"}, "VRAMCORE_MOCK_FAITHFUL"),
        ({"VRAMCORE_MOCK_COPY_DELAY": "soon"}, "VRAMCORE_MOCK_COPY_DELAY"),
        ({"VRAMCORE_MOCK_COPY_DELAY": "-1"}, "VRAMCORE_MOCK_COPY_DELAY"),
        ({"VRAMCORE_MOCK_COPY_DELAY": "nan"}, "VRAMCORE_MOCK_COPY_DELAY"),
        ({"VRAMCORE_MOCK_FAIL": "read"}, "VRAMCORE_MOCK_FAIL"),
        ({"VRAMCORE_MOCK_FAIL": "read:0"}, "VRAMCORE_MOCK_FAIL"),
        ({"VRAMCORE_MOCK_FAIL": "explode:1"}, "VRAMCORE_MOCK_FAIL"),
    ],
)
def test_from_env_rejects_bad_switches(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        MockBackend.from_env(env)


def test_constructor_rejects_bad_options() -> None:
    with pytest.raises(ConfigError, match="fail_at"):
        MockBackend(fail_at={"explode": 1})
    with pytest.raises(ConfigError, match="copy_delay"):
        MockBackend(copy_delay=-1)
    with pytest.raises(InvalidInput, match="unknown mock operation"):
        MockBackend().fail_next("explode")


def test_the_entry_point_factory_honours_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VRAMCORE_MOCK_FAITHFUL", "1")
    monkeypatch.setenv("VRAMCORE_MOCK_VRAM", "64MiB")
    pm = get_plugin_manager([vramcore_allocator_mock], load_entrypoints=False, env={})
    backend = select_backend(pm, "mock").factory()
    assert isinstance(backend, MockBackend)
    assert backend.async_copies
    assert backend.strict_close


# -- asynchronous copies ----------------------------------------------------------------------


@pytest.fixture
def slow() -> MockBackend:
    """Asynchronous copies that nobody but a waiter or a synchronisation completes."""
    return MockBackend(capacity=1 << 24, async_copies=True, copy_delay=60)


def test_an_async_copy_reads_its_source_only_when_it_completes(slow: MockBackend) -> None:
    buf = slow.allocate(0, 4)
    src = bytearray(b"old!")
    handle = slow.copy_in(buf, 0, memoryview(src))
    assert isinstance(handle, MockCopyHandle)
    assert isinstance(handle, CopyHandle)
    assert not handle.done
    assert repr(handle) == "<MockCopyHandle pending>"
    assert slow.pending_copies == 1
    src[:] = b"new!"  # the caller broke the contract: reused the source before wait()
    handle.wait()
    assert handle.done
    assert repr(handle) == "<MockCopyHandle done>"
    assert read(slow, buf) == b"new!"  # what a GPU would hold too
    handle.wait()  # idempotent


def test_a_pending_copy_pins_its_source(slow: MockBackend) -> None:
    buf = slow.allocate(0, 4)
    src = bytearray(b"abcd")
    handle = slow.copy_in(buf, 0, memoryview(src))
    with pytest.raises(BufferError):
        src.extend(b"x")  # cannot be resized (freed) under a pending copy
    assert handle is not None
    handle.wait()
    src.extend(b"x")


def test_waiting_completes_earlier_copies_first(slow: MockBackend) -> None:
    buf = slow.allocate(0, 4)
    first = slow.copy_in(buf, 0, memoryview(b"aaaa"))
    second = slow.copy_in(buf, 2, memoryview(b"bb"))
    assert second is not None
    assert first is not None
    second.wait()
    assert first.done
    assert read(slow, buf) == b"aabb"  # issue order, as on one CUDA stream


@pytest.mark.parametrize("sync_point", ["read", "free", "close", "flip_bit", "digest"])
def test_synchronising_calls_land_pending_copies(slow: MockBackend, sync_point: str) -> None:
    buf = slow.allocate(0, 4)
    handle = slow.copy_in(buf, 0, memoryview(b"\x01\x02\x03\x04"))
    assert handle is not None
    if sync_point == "read":
        assert read(slow, buf) == b"\x01\x02\x03\x04"
    elif sync_point == "free":
        slow.free(buf)
    elif sync_point == "close":
        slow.close()
    elif sync_point == "flip_bit":
        slow.flip_bit(buf, 0)
        assert read(slow, buf)[0] == 0  # the flip came after the copy
    else:
        slow.digest(buf, 4096)
    assert handle.done
    assert slow.pending_copies == 0


def test_the_worker_thread_completes_copies_nobody_waits_for() -> None:
    backend = MockBackend(capacity=1 << 20, async_copies=True, copy_delay=0)
    buf = backend.allocate(0, 3)
    before = set(threading.enumerate())
    handle = backend.copy_in(buf, 0, memoryview(b"xyz"))
    workers = [t for t in set(threading.enumerate()) - before if t.name == "vramcore-mock-copy"]
    assert len(workers) <= 1  # none if it already finished and left
    assert handle is not None
    wait_until(lambda: handle.done, "the worker's completion")
    wait_until(lambda: not any(t.is_alive() for t in workers), "the idle worker's exit")
    assert read(backend, buf) == b"xyz"


def test_staging_is_scribbled_when_lent_back_with_async_copies(slow: MockBackend) -> None:
    buf = slow.allocate(0, 8)
    with slow.staging(1, 8) as (stage,):
        stage[:] = b"payload!"
        handle = slow.copy_in(buf, 0, stage)  # left pending past the block: a core bug
    assert handle is not None
    handle.wait()
    assert read(slow, buf) == b"\xa5" * 8  # the reused pinned buffer's junk landed
    with slow.staging(1, 8) as (again,):
        assert again.nbytes == 8
    with pytest.raises(InvalidInput):
        slow.staging(-1, 8).__enter__()


def test_staging_buffers_are_released_after_the_block() -> None:
    backend = MockBackend(capacity=1 << 20)
    with backend.staging(2, 16) as lent:
        assert [v.nbytes for v in lent] == [16, 16]
    with pytest.raises(ValueError, match="released"):
        lent[0][0]


# -- uninitialised memory and opaque native ------------------------------------------------------


def test_uninitialised_memory_is_garbage_not_zeros() -> None:
    backend = MockBackend(capacity=1 << 22, uninitialised=True)
    a = backend.allocate(0, 100_000)
    b = backend.allocate(0, 100_000)
    first, second = read(backend, a), read(backend, b)
    assert len(first) == 100_000
    assert first.count(0) < 2_000
    assert first != second
    backend.copy_in(a, 10, memoryview(b"data"))
    assert read(backend, a, 8, 8) == first[8:10] + b"data" + first[14:16]


def test_opaque_native_cannot_be_read_as_host_memory() -> None:
    backend = MockBackend(capacity=1 << 20, opaque_native=True)
    buf = backend.allocate(0, 16)
    assert isinstance(buf.native, MockDeviceArray)
    assert repr(buf.native) == "<MockDeviceArray GPU0 16 bytes>"
    with pytest.raises(TypeError):
        bytes(buf.native)  # type: ignore[call-overload]
    with pytest.raises(TypeError):
        memoryview(buf.native)  # type: ignore[arg-type]


# -- strict close ------------------------------------------------------------------------------


def test_strict_close_refuses_every_later_call() -> None:
    backend = MockBackend(capacity=1 << 20, strict_close=True)
    buf = backend.allocate(0, 8)
    backend.close()
    backend.close()  # idempotent
    calls = {
        "devices": backend.devices,
        "mem_info": lambda: backend.mem_info(0),
        "allocate": lambda: backend.allocate(0, 8),
        "copy_in": lambda: backend.copy_in(buf, 0, memoryview(b"x")),
        "read_into": lambda: backend.read_into(buf, 0, memoryview(bytearray(1))),
        "free": lambda: backend.free(buf),
        "memory_kind": lambda: backend.memory_kind(buf),
        "staging": lambda: backend.staging(1, 8).__enter__(),
        "digest": lambda: backend.digest(buf, 4096),
        "reset": backend.reset,
    }
    for name, call in calls.items():
        with pytest.raises(BackendClosed, match="closed") as info:
            call()
        assert info.value.fatal, name


def test_lenient_close_keeps_working() -> None:
    backend = MockBackend(capacity=1 << 20)
    buf = backend.allocate(0, 8)
    backend.close()
    assert backend.closed
    backend.copy_in(buf, 0, memoryview(b"12345678"))
    assert read(backend, buf) == b"12345678"
    backend.free(buf)


# -- injected failures --------------------------------------------------------------------------


def test_read_failure_leaves_out_untouched_and_is_one_shot() -> None:
    backend = MockBackend(capacity=1 << 20)
    buf = backend.allocate(0, 4)
    backend.copy_in(buf, 0, memoryview(b"abcd"))
    backend.fail_next_read("ECC error")
    out = bytearray(b"....")
    with pytest.raises(AllocationFailed, match="ECC error"):
        backend.read_into(buf, 0, memoryview(out))
    assert out == b"...."
    assert read(backend, buf) == b"abcd"


def test_free_failure_keeps_the_buffer_until_a_second_free() -> None:
    backend = MockBackend(capacity=1 << 20)
    buf = backend.allocate(0, 4096)
    backend.fail_next_free()
    with pytest.raises(AllocationFailed, match="injected free failure"):
        backend.free(buf)
    assert not buf.freed
    assert backend.used_bytes(0) == 4096
    backend.free(buf)
    assert backend.used_bytes(0) == 0


@pytest.mark.parametrize("async_copies", [False, True], ids=["sync", "async"])
def test_wait_failure_surfaces_from_the_handle(async_copies: bool) -> None:
    backend = MockBackend(capacity=1 << 20, async_copies=async_copies)
    buf = backend.allocate(0, 4)
    backend.copy_in(buf, 0, memoryview(b"good"))
    backend.fail_next_wait("PCIe replay")
    handle = backend.copy_in(buf, 0, memoryview(b"lost"))
    assert handle is not None
    for _ in range(2):  # raised again on every wait
        with pytest.raises(AllocationFailed, match="PCIe replay"):
            handle.wait()
    assert read(backend, buf) == b"good"  # the failed copy wrote nothing
    assert backend.copy_in(buf, 0, memoryview(b"next")) is None or async_copies


def test_fail_at_counts_calls_per_operation() -> None:
    backend = MockBackend(capacity=1 << 20, fail_at={"read": 2, "allocate": 1})
    with pytest.raises(AllocationFailed, match="allocate #1"):
        backend.allocate(0, 4)
    buf = backend.allocate(0, 4)
    read(backend, buf)
    with pytest.raises(AllocationFailed, match="read #2"):
        read(backend, buf)
    read(backend, buf)  # once only


def test_digest_failure() -> None:
    backend = MockBackend(capacity=1 << 20, device_digest=True)
    buf = backend.allocate(0, 4)
    backend.fail_next_digest("kernel launch failed")
    with pytest.raises(AllocationFailed, match="kernel launch failed"):
        backend.digest(buf, 4096)
    assert backend.digest(buf, 4096).leaf_count == 1


# -- sticky errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("trigger", ["copy", "read", "free", "wait", "poison"])
def test_a_sticky_error_poisons_every_call_until_reset(trigger: str) -> None:
    backend = MockBackend(capacity=1 << 20, sticky_errors=True)
    buf = backend.allocate(0, 4096)
    if trigger == "poison":
        backend.poison("illegal address")
    else:
        backend.fail_next(trigger, "illegal address")
        calls = {
            "copy": lambda: backend.copy_in(buf, 0, memoryview(b"x")),
            "read": lambda: read(backend, buf),
            "free": lambda: backend.free(buf),
            "wait": lambda: wait_copy(backend.copy_in(buf, 0, memoryview(b"x"))),
        }
        with pytest.raises(VramError, match="illegal address"):
            calls[trigger]()
    assert backend.poisoned
    for call in (
        lambda: backend.allocate(0, 8),
        lambda: backend.copy_in(buf, 0, memoryview(b"x")),
        lambda: read(backend, buf),
        lambda: backend.free(buf),
        lambda: backend.mem_info(0),
        backend.devices,
    ):
        with pytest.raises(DevicePoisoned, match=r"illegal address.*reset\(\) it") as info:
            call()
        assert info.value.fatal
    backend.reset()
    assert not backend.poisoned
    assert buf.freed  # every allocation was lost with the context
    assert backend.mem_info(0) == (1 << 20, 1 << 20)
    assert backend.live_allocations == 0
    fresh = backend.allocate(0, 4)
    backend.copy_in(fresh, 0, memoryview(b"back"))
    assert read(backend, fresh) == b"back"


def test_an_async_copy_failing_later_poisons_when_it_completes() -> None:
    backend = MockBackend(capacity=1 << 20, async_copies=True, copy_delay=60, sticky_errors=True)
    buf = backend.allocate(0, 4)
    backend.fail_next_wait("Xid 79")
    handle = backend.copy_in(buf, 0, memoryview(b"lost"))
    assert not backend.poisoned  # not yet: the copy has not run
    assert handle is not None
    with pytest.raises(AllocationFailed, match="Xid 79"):
        handle.wait()
    assert backend.poisoned
    with pytest.raises(DevicePoisoned):
        read(backend, buf)


def test_reset_cancels_pending_copies() -> None:
    backend = MockBackend(capacity=1 << 20, async_copies=True, copy_delay=60)
    buf = backend.allocate(0, 4)
    handle = backend.copy_in(buf, 0, memoryview(b"gone"))
    backend.reset()
    assert handle is not None
    with pytest.raises(DevicePoisoned, match="reset before the copy completed"):
        handle.wait()
    assert backend.pending_copies == 0


def test_injections_without_sticky_errors_never_poison() -> None:
    backend = MockBackend(capacity=1 << 20)
    buf = backend.allocate(0, 4)
    backend.fail_next_copy()
    with pytest.raises(AllocationFailed):
        backend.copy_in(buf, 0, memoryview(b"x"))
    assert not backend.poisoned
    backend.mem_info(0)


# -- the mock device digest ----------------------------------------------------------------


def test_the_digest_hook_answers_only_for_mock_backends_that_enable_it() -> None:
    plain = MockBackend(capacity=1 << 20)
    buf = plain.allocate(0, 10)
    hook = vramcore_allocator_mock.vramcore_device_digest
    assert hook(backend=plain, buffer=buf, leaf_size=4096, leaf_range=None) is None
    assert hook(backend=object(), buffer=buf, leaf_size=4096, leaf_range=None) is None  # type: ignore[arg-type]


def test_the_mock_digest_is_the_host_digest_full_and_ranged() -> None:
    backend = MockBackend(capacity=1 << 22, device_digest=True, async_copies=True)
    data = bytes(range(256)) * (5 * LEAF // 256) + b"tail"
    buf = backend.allocate(0, len(data))
    backend.copy_in(buf, 0, memoryview(data))  # not waited: the digest synchronises
    leaves = hash_leaves(data, LEAF)
    pm = get_plugin_manager([vramcore_allocator_mock], load_entrypoints=False, env={})
    full = pm.hook.vramcore_device_digest(
        backend=backend, buffer=buf, leaf_size=LEAF, leaf_range=None
    )
    assert isinstance(full, DeviceDigest)
    assert full.root == merkle_root(leaves)
    assert full.leaves == b"".join(leaves)
    part = backend.digest(buf, LEAF, (2, 6))
    assert part.root is None
    assert part.first_leaf == 2
    assert part.leaves == b"".join(leaves[2:6])


@pytest.mark.parametrize("leaf_range", [(0, 0), (-1, 1), (5, 3), (0, 2), (1.0, 2)])
def test_the_mock_digest_rejects_ranges_outside_the_buffer(leaf_range: Any) -> None:
    backend = MockBackend(capacity=1 << 20, device_digest=True)
    buf = backend.allocate(0, LEAF)
    with pytest.raises(InvalidInput, match="leaf range"):
        backend.digest(buf, LEAF, leaf_range)
    for bad in (0, -4096, True):
        with pytest.raises(InvalidInput, match="leaf_size"):
            backend.digest(buf, bad)


def test_a_manager_on_a_digesting_faithful_mock_seals_the_host_digest() -> None:
    from vramcore import VramManager
    from vramcore.testing import TEST_TOKEN

    backend = MockBackend.faithful(capacity=1 << 24, device_digest=True)
    data = bytes(range(256)) * (3 * LEAF // 256) + b"odd"
    pm = get_plugin_manager([vramcore_allocator_mock], load_entrypoints=False, env={})
    with VramManager(TEST_TOKEN, allocator=backend, plugin_manager=pm, audit="disabled") as vram:
        shard = vram.seal_model(data, shard_id="s")
        assert shard.digest == merkle_root(hash_leaves(data, LEAF)).hex()
        vram.verify_sealed(shard)
