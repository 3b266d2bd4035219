"""The mock allocator: sizes, environment, bounds, lifetime, accounting and fault injection."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import vramcore_allocator_mock
from vramcore_allocator_mock import MockBackend, parse_vram

from vramcore.backend import AllocatorBackend, BackendSpec, DeviceBuffer, MemoryKind
from vramcore.errors import (
    AllocationFailed,
    BackendUnavailable,
    ConfigError,
    InsufficientVram,
    InvalidInput,
)
from vramcore.plugins import get_plugin_manager, select_backend

GIB = 1 << 30


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24GiB", (None, 24 * GIB)),
        ("2x24GiB", (2, 24 * GIB)),
        ("4 x 80 GiB", (4, 80 * GIB)),
        ("512MiB", (None, 512 << 20)),
        ("512mib", (None, 512 << 20)),
        ("1000", (None, 1000)),
        ("1000b", (None, 1000)),
        ("64KiB", (None, 64 << 10)),
        ("1TiB", (None, 1 << 40)),
        ("1.5GiB", (None, 3 << 29)),
        ("16GB", (None, 16 * 10**9)),
        (" 8MB ", (None, 8 * 10**6)),
    ],
)
def test_parse_vram(text: str, expected: tuple[int | None, int]) -> None:
    assert parse_vram(text) == expected


@pytest.mark.parametrize(
    "text", ["", "lots", "24GiX", "-1GiB", "0", "0GiB", "0x24GiB", "0.1", "2x", "x24GiB", "1e9"]
)
def test_parse_vram_rejects_nonsense(text: str) -> None:
    with pytest.raises(ConfigError, match="VRAMCORE_MOCK_VRAM"):
        parse_vram(text)


def test_from_env_defaults() -> None:
    backend = MockBackend.from_env({})
    assert len(backend.devices()) == 1
    assert backend.mem_info(0) == (24 * GIB, 24 * GIB)


@pytest.mark.parametrize(
    ("env", "devices", "capacity"),
    [
        ({"VRAMCORE_MOCK_VRAM": "512MiB"}, 1, 512 << 20),
        ({"VRAMCORE_MOCK_VRAM": "2x1GiB"}, 2, GIB),
        ({"VRAMCORE_MOCK_DEVICES": "3"}, 3, 24 * GIB),
        ({"VRAMCORE_MOCK_DEVICES": "4", "VRAMCORE_MOCK_VRAM": "2x1GiB"}, 4, GIB),
    ],
)
def test_from_env(env: dict[str, str], devices: int, capacity: int) -> None:
    backend = MockBackend.from_env(env)
    assert len(backend.devices()) == devices
    assert all(backend.mem_info(i) == (capacity, capacity) for i in range(devices))


@pytest.mark.parametrize(
    "env",
    [
        {"VRAMCORE_MOCK_DEVICES": "0"},
        {"VRAMCORE_MOCK_DEVICES": "two"},
        {"VRAMCORE_MOCK_DEVICES": "-1"},
        {"VRAMCORE_MOCK_VRAM": "huge"},
    ],
)
def test_from_env_rejects_bad_values(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        MockBackend.from_env(env)


def test_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VRAMCORE_MOCK_VRAM", "3x2MiB")
    monkeypatch.delenv("VRAMCORE_MOCK_DEVICES", raising=False)
    backend = MockBackend.from_env()
    assert [d.total_bytes for d in backend.devices()] == [2 << 20] * 3


def test_constructor_rejects_empty_devices() -> None:
    with pytest.raises(ConfigError):
        MockBackend(devices=0)
    with pytest.raises(ConfigError):
        MockBackend(capacity=0)


@pytest.fixture
def backend() -> MockBackend:
    return MockBackend(devices=2, capacity=1 << 20)


def test_it_is_an_allocator_backend(backend: MockBackend) -> None:
    assert isinstance(backend, AllocatorBackend)
    assert backend.name == "mock"
    assert MockBackend(name="other").name == "other"


def test_devices_report_the_policy_flags(backend: MockBackend) -> None:
    d0, d1 = backend.devices()
    assert (d0.index, d1.index) == (0, 1)
    assert d0.uuid != d1.uuid
    assert not d0.integrated
    assert not d0.pageable_memory_access
    assert d0.ecc_enabled is True
    backend.set_device_flags(1, integrated=True, pageable_memory_access=True, ecc_enabled=False)
    d0, d1 = backend.devices()
    assert d1.integrated and d1.pageable_memory_access and d1.ecc_enabled is False
    assert not d0.integrated
    with pytest.raises(InvalidInput, match="unknown device flag"):
        backend.set_device_flags(0, turbo=True)


def test_copy_in_and_read_into_round_trip(backend: MockBackend) -> None:
    buf = backend.allocate(0, 16)
    assert isinstance(buf, DeviceBuffer)
    assert (buf.device, buf.nbytes, buf.backend) == (0, 16, "mock")
    backend.copy_in(buf, 4, memoryview(b"abcd"))
    out = bytearray(8)
    backend.read_into(buf, 2, memoryview(out))
    assert bytes(out) == b"\0\0abcd\0\0"
    assert bytes(buf.native) == b"\0" * 4 + b"abcd" + b"\0" * 8  # type: ignore[call-overload]
    backend.copy_in(buf, 0, memoryview(b"x" * 16))  # exactly the whole buffer
    backend.read_into(buf, 16, memoryview(bytearray(0)))  # empty read at the end


@pytest.mark.parametrize(("offset", "n"), [(-1, 1), (15, 2), (16, 1), (0, 17), (100, 0)])
def test_copies_are_bounds_checked(backend: MockBackend, offset: int, n: int) -> None:
    buf = backend.allocate(0, 16)
    backend.copy_in(buf, 0, memoryview(b"y" * 16))
    with pytest.raises(InvalidInput, match="outside the 16-byte buffer"):
        backend.copy_in(buf, offset, memoryview(b"z" * n))
    with pytest.raises(InvalidInput, match="outside the 16-byte buffer"):
        backend.read_into(buf, offset, memoryview(bytearray(n)))
    out = bytearray(16)
    backend.read_into(buf, 0, memoryview(out))
    assert out == b"y" * 16  # a refused copy wrote nothing


def test_no_access_after_free(backend: MockBackend) -> None:
    buf = backend.allocate(0, 16)
    backend.free(buf)
    assert buf.freed
    assert "freed" in repr(buf)
    with pytest.raises(InvalidInput):
        backend.copy_in(buf, 0, memoryview(b"a"))
    with pytest.raises(InvalidInput):
        backend.read_into(buf, 0, memoryview(bytearray(1)))
    with pytest.raises(InvalidInput):
        backend.free(buf)
    with pytest.raises(InvalidInput):
        backend.memory_kind(buf)
    with pytest.raises(InvalidInput):
        backend.flip_bit(buf, 0)
    with pytest.raises(ValueError, match="released"):
        bytes(buf.native)  # type: ignore[call-overload]


def test_buffers_of_another_backend_are_refused(backend: MockBackend) -> None:
    other = MockBackend()
    foreign = other.allocate(0, 8)
    with pytest.raises(InvalidInput):
        backend.copy_in(foreign, 0, memoryview(b"a"))
    with pytest.raises(InvalidInput):
        backend.free(foreign)
    fake = DeviceBuffer(device=0, nbytes=8, backend="mock", native=None)
    with pytest.raises(InvalidInput):
        backend.read_into(fake, 0, memoryview(bytearray(1)))
    assert other.live_allocations == 1


def test_free_with_an_outstanding_view_still_frees(backend: MockBackend) -> None:
    buf = backend.allocate(0, 8)
    view = buf.native[2:4]  # type: ignore[index] # a view the caller still holds
    backend.free(buf)
    assert backend.live_allocations == 0
    assert backend.used_bytes(0) == 0
    del view


def test_capacity_accounting(backend: MockBackend) -> None:
    a = backend.allocate(0, 600_000)
    b = backend.allocate(1, 1 << 20)
    assert backend.used_bytes(0) == 600_000
    assert backend.used_bytes(1) == 1 << 20
    assert backend.mem_info(0) == ((1 << 20) - 600_000, 1 << 20)
    assert backend.devices()[0].free_bytes == (1 << 20) - 600_000
    assert backend.live_allocations == 2
    with pytest.raises(InsufficientVram) as info:
        backend.allocate(0, 500_000)
    assert info.value.needed == 500_000
    assert info.value.available == (1 << 20) - 600_000
    assert info.value.device == 0
    assert backend.used_bytes(0) == 600_000  # a refused allocation is not counted
    backend.free(a)
    backend.allocate(0, 500_000)
    assert backend.used_bytes(0) == 500_000
    backend.free(b)
    assert backend.used_bytes(1) == 0
    assert backend.allocations == 3


@pytest.mark.parametrize("nbytes", [0, -1, True, 1.5, "8"])
def test_allocation_size_must_be_positive(backend: MockBackend, nbytes: Any) -> None:
    with pytest.raises(InvalidInput):
        backend.allocate(0, nbytes)
    assert backend.used_bytes(0) == 0
    assert backend.live_allocations == 0


@pytest.mark.parametrize("device", [2, -1])
def test_unknown_device(backend: MockBackend, device: int) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        backend.allocate(device, 8)
    with pytest.raises(InvalidInput):
        backend.mem_info(device)


def test_concurrent_allocations_never_exceed_capacity() -> None:
    backend = MockBackend(capacity=1000)
    won: list[DeviceBuffer] = []
    lock = threading.Lock()

    def grab() -> None:
        for _ in range(50):
            try:
                buf = backend.allocate(0, 7)
            except InsufficientVram:
                continue
            with lock:
                won.append(buf)

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1000 // 7
    assert backend.used_bytes(0) == 7 * len(won)
    assert backend.live_allocations == len(won)


def test_memory_kind_and_hand_out(backend: MockBackend) -> None:
    plain = backend.allocate(0, 8)
    backend.hand_out(MemoryKind.MANAGED)
    managed = backend.allocate(0, 8)
    backend.hand_out(MemoryKind.HOST_MAPPED)
    mapped = backend.allocate(0, 8)
    assert backend.memory_kind(plain) is MemoryKind.DEVICE
    assert backend.memory_kind(managed) is MemoryKind.MANAGED
    assert backend.memory_kind(mapped) is MemoryKind.HOST_MAPPED


def test_flip_bit(backend: MockBackend) -> None:
    buf = backend.allocate(0, 4)
    backend.flip_bit(buf, 0)
    backend.flip_bit(buf, 3, 7)
    backend.flip_bit(buf, 1, 2)
    out = bytearray(4)
    backend.read_into(buf, 0, memoryview(out))
    assert out == bytes([0x01, 0x04, 0x00, 0x80])
    backend.flip_bit(buf, 3, 7)
    backend.read_into(buf, 0, memoryview(out))
    assert out[3] == 0
    for offset, bit in [(4, 0), (-1, 0), (0, 8), (0, -1)]:
        with pytest.raises(InvalidInput):
            backend.flip_bit(buf, offset, bit)


def test_fail_next_allocation_is_one_shot_and_queues(backend: MockBackend) -> None:
    backend.fail_next_allocation("first")
    backend.fail_next_allocation("second")
    with pytest.raises(AllocationFailed, match="first") as info:
        backend.allocate(0, 8)
    assert info.value.retriable
    with pytest.raises(AllocationFailed, match="second"):
        backend.allocate(0, 8)
    assert backend.used_bytes(0) == 0
    assert backend.live_allocations == 0
    backend.allocate(0, 8)  # the injections are used up
    assert backend.allocations == 1


def test_fail_next_copy_is_one_shot(backend: MockBackend) -> None:
    buf = backend.allocate(0, 8)
    backend.fail_next_copy()
    with pytest.raises(AllocationFailed, match="injected copy failure"):
        backend.copy_in(buf, 0, memoryview(b"abcd"))
    out = bytearray(4)
    backend.read_into(buf, 0, memoryview(out))
    assert out == b"\0" * 4  # the failed copy wrote nothing
    backend.copy_in(buf, 0, memoryview(b"abcd"))
    backend.read_into(buf, 0, memoryview(out))
    assert out == b"abcd"


def test_fail_next_copy_is_not_consumed_by_a_refused_copy(backend: MockBackend) -> None:
    buf = backend.allocate(0, 8)
    backend.fail_next_copy()
    with pytest.raises(InvalidInput):
        backend.copy_in(buf, 7, memoryview(b"ab"))
    with pytest.raises(AllocationFailed):
        backend.copy_in(buf, 0, memoryview(b"ab"))


def test_close_marks_closed_and_keeps_allocations(backend: MockBackend) -> None:
    buf = backend.allocate(0, 8)
    backend.close()
    assert backend.closed
    assert backend.live_allocations == 1
    backend.free(buf)


def test_entry_point_hook_offers_the_mock_at_the_lowest_priority(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VRAMCORE_MOCK_VRAM", "2x8MiB")
    (spec,) = vramcore_allocator_mock.vramcore_allocator_backends()
    assert isinstance(spec, BackendSpec)
    assert spec.name == "mock"
    assert spec.priority < 0
    assert spec.why_not() is None
    assert "pip install ./plugins/allocator_mock" in spec.install_hint
    backend = spec.factory()
    assert isinstance(backend, MockBackend)
    assert [d.total_bytes for d in backend.devices()] == [8 << 20] * 2


def test_installed_entry_point_is_named_mock() -> None:
    pm = get_plugin_manager(env={"VRAMCORE_PLUGINS": "mock"})
    assert [p.name for p in pm.loaded] == ["mock"]
    assert select_backend(pm, "mock", env={}).name == "mock"
    with pytest.raises(BackendUnavailable, match="host memory, never chosen unless named"):
        select_backend(pm, env={})  # host memory: used only when named


def test_any_other_backend_outranks_the_mock() -> None:
    from vramcore import hookimpl

    class Gpu:
        @hookimpl
        def vramcore_allocator_backends(self) -> list[BackendSpec]:
            return [BackendSpec(name="gpu", priority=0, probe=lambda: None, factory=MockBackend)]

    pm = get_plugin_manager([vramcore_allocator_mock, Gpu()], load_entrypoints=False)
    assert select_backend(pm, env={}).name == "gpu"


def test_host_view_is_zero_copy_after_pending_copies_and_absent_when_opaque() -> None:
    from vramcore_allocator_mock import MockBackend

    for options in ({}, {"async_copies": True}):
        backend = MockBackend(devices=1, capacity=1 << 20, **options)  # type: ignore[arg-type]
        buf = backend.allocate(0, 8)
        handle = backend.copy_in(buf, 0, memoryview(b"abcdefgh"))
        view = backend.host_view(buf)  # waits for the queued copy first
        assert view is not None
        assert bytes(view) == b"abcdefgh"
        backend.flip_bit(buf, 0)
        assert view[0] == ord("a") ^ 1  # the same memory, not a copy
        if handle is not None:
            handle.wait()
        backend.free(buf)
    opaque = MockBackend(devices=1, capacity=1 << 20, opaque_native=True)
    assert opaque.host_view(opaque.allocate(0, 8)) is None
