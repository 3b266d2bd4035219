"""The conformance suite every allocator backend passes: :class:`BackendContract`."""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import random
import threading
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import pytest

from vramcore.backend import AllocatorBackend, CopyHandle, DeviceBuffer, DeviceDigest, MemoryKind
from vramcore.digest import DEFAULT_LEAF_SIZE, hash_leaves, merkle_root
from vramcore.errors import InsufficientVram, InvalidInput, VramError
from vramcore.plugins import get_plugin_manager
from vramcore.testing._bounded import run_bounded

__all__ = ["BackendContract", "FaultInjector"]

_LEAF = DEFAULT_LEAF_SIZE
_MIB = 1 << 20
_ROUND_TRIP_SIZES = {
    "1B": 1,
    "4095B": 4095,
    "one-leaf": _LEAF,
    "leaf+1": _LEAF + 1,
    "3MiB+5": 3 * _MIB + 5,
}
_NO_DIGEST = "no digest plugin answers for this backend (the core hashes on the host instead)"


@runtime_checkable
class FaultInjector(Protocol):
    """What a backend offers so :class:`BackendContract` can inject failures into it.

    Each method makes the next call of that kind fail with a
    :class:`~vramcore.errors.VramError` (the mock implements them all). A backend without
    them still runs the contract; the injected-failure test is then skipped.
    """

    def fail_next_allocation(self, reason: str = ...) -> None:
        """The next ``allocate`` fails."""

    def fail_next_copy(self, reason: str = ...) -> None:
        """The next ``copy_in`` fails before it copies."""

    def fail_next_wait(self, reason: str = ...) -> None:
        """The next ``copy_in`` fails when it completes (its handle's ``wait()`` raises)."""

    def fail_next_read(self, reason: str = ...) -> None:
        """The next ``read_into`` fails."""

    def fail_next_free(self, reason: str = ...) -> None:
        """The next ``free`` fails."""


def _pattern(nbytes: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(nbytes)


def _first_difference(actual: bytes, expected: bytes) -> int:
    step = 4096
    for start in range(0, min(len(actual), len(expected)), step):
        if actual[start : start + step] != expected[start : start + step]:
            return next(
                i
                for i in range(start, start + step)
                if i >= len(actual) or actual[i] != expected[i]
            )
    return min(len(actual), len(expected))


def _assert_same(actual: bytes, expected: bytes, what: str) -> None:
    if actual != expected:
        at = _first_difference(actual, expected)
        pytest.fail(
            f"{what}: device bytes differ from what was copied, first at byte {at} of "
            f"{len(expected)} (got {len(actual)} bytes)",
            pytrace=False,
        )


def _wait(handle: CopyHandle | None) -> None:
    if handle is None:
        return
    assert isinstance(handle, CopyHandle), (
        f"copy_in returned a {type(handle).__name__}: it must return None or a CopyHandle"
    )
    handle.wait()


def _copy(backend: AllocatorBackend, buf: DeviceBuffer, offset: int, data: bytes) -> None:
    _wait(backend.copy_in(buf, offset, memoryview(data)))


def _read(backend: AllocatorBackend, buf: DeviceBuffer, offset: int, nbytes: int) -> bytes:
    out = bytearray(nbytes)
    backend.read_into(buf, offset, memoryview(out))
    return bytes(out)


def _installed_plugins() -> list[object]:
    plugins = []
    for entry_point in importlib.metadata.entry_points(group="vramcore"):
        with contextlib.suppress(Exception):  # a broken plugin is not this suite's business
            plugins.append(entry_point.load())
    return plugins


class BackendContract:
    """The conformance suite every allocator backend passes (like keyring's backend tests).

    A backend's test module subclasses it (the class name must start with ``Test``) and
    supplies a ``backend`` fixture that makes a fresh backend for each test::

        import pytest
        from vramcore.testing import BackendContract
        from my_plugin import MyBackend

        class TestMyBackend(BackendContract):
            @pytest.fixture
            def backend(self):
                backend = MyBackend()
                yield backend
                backend.close()

    A GPU backend's module adds ``pytestmark = pytest.mark.vramcore_gpu`` so that the suite
    is skipped, with the reason, on machines without a GPU. Optional fixtures to override:

    ``device``
        The device index the suite uses (default 0).
    ``digest_plugins``
        Plugin objects implementing ``vramcore_device_digest`` (default: every plugin
        installed under the ``vramcore`` entry-point group). Their answer for this backend
        must equal the host digest (:mod:`vramcore.digest`), root and packed leaves, for the
        whole buffer and for leaf ranges. When no plugin answers, those tests are skipped.
    ``fault_injector``
        An object with the :class:`FaultInjector` methods (default: the backend itself when
        it has them); without one, the injected-failure test is skipped.

    What it checks: round trips (1 B, 4095 B, one leaf, one leaf + 1, 3 MiB + 5 B, pieces
    across chunk and leaf boundaries, at offsets); typed :class:`~vramcore.errors.InvalidInput`
    for bad offsets, sizes and devices; that the source buffer can be overwritten as soon as
    ``copy_in`` returned (after waiting its handle, if any) without changing what landed;
    completion handles (waited twice, in any order, from another thread); calls from threads
    other than the one that made the backend; double free and use after free raise;
    :class:`~vramcore.errors.InsufficientVram` beyond free memory; ``memory_kind`` is
    ``DEVICE``; ``close()`` with copies in flight neither hangs nor lets later calls return
    wrong data; free memory back to its start value after forced and injected failures;
    staging buffers feed copies with double buffering.

    Free-memory checks compare ``mem_info`` before and after: run the suite on an otherwise
    idle device (the suite warms the backend up first, so a lazily created context does not
    count). ``close()`` may be called by a test and again by your fixture's teardown: a second
    ``close()`` must not raise. The whole suite runs in about a second on the mock.
    """

    #: Seconds any single call may block before the suite reports a hang.
    hang_timeout: float = 60.0
    #: Bytes by which free memory may differ from its start value once everything is freed:
    #: 0 (exact) by default; a suite on a real GPU sets a few MiB, since CUDA reports free
    #: memory in pages and the driver keeps some of them.
    free_memory_tolerance: int = 0

    # -- fixtures a subclass supplies or overrides ----------------------------------------

    @pytest.fixture
    def backend(self) -> AllocatorBackend:
        """The backend under test: override this fixture (a fresh backend per test)."""
        raise NotImplementedError(
            f"{type(self).__name__} must define a `backend` fixture returning the backend"
        )

    @pytest.fixture
    def device(self) -> int:
        """The device index the suite uses."""
        return 0

    @pytest.fixture
    def digest_plugins(self) -> Sequence[object]:
        """Plugins whose ``vramcore_device_digest`` is checked against the host digest."""
        return _installed_plugins()

    @pytest.fixture
    def fault_injector(self, backend: AllocatorBackend) -> FaultInjector | None:
        """The backend itself when it offers :class:`FaultInjector`'s methods, else ``None``."""
        return backend if isinstance(backend, FaultInjector) else None

    # -- helpers -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _allocation(
        self, backend: AllocatorBackend, device: int, nbytes: int
    ) -> Iterator[DeviceBuffer]:
        buf = backend.allocate(device, nbytes)
        assert isinstance(buf, DeviceBuffer), "allocate must return a DeviceBuffer"
        assert buf.nbytes == nbytes
        assert buf.device == device
        try:
            yield buf
        finally:
            backend.free(buf)

    def _assert_free_back(
        self, backend: AllocatorBackend, device: int, start: int, what: str
    ) -> None:
        now = backend.mem_info(device)[0]
        assert abs(now - start) <= self.free_memory_tolerance, (
            f"{what}: {now - start:+d} bytes (tolerance {self.free_memory_tolerance})"
        )

    def _free_bytes(self, backend: AllocatorBackend, device: int) -> int:
        """Free bytes after one allocation has come and gone (contexts and pools exist)."""
        backend.free(backend.allocate(device, _LEAF))
        return backend.mem_info(device)[0]

    def _device_digest(
        self,
        digest_plugins: Sequence[object],
        backend: AllocatorBackend,
        buf: DeviceBuffer,
        leaf_size: int,
        leaf_range: tuple[int, int] | None,
    ) -> DeviceDigest:
        pm = get_plugin_manager(list(digest_plugins), load_entrypoints=False, env={})
        answer = pm.hook.vramcore_device_digest(
            backend=backend,
            buffer=buf,
            leaf_size=leaf_size,
            leaf_range=leaf_range,
            leaf_indices=None,
        )
        if answer is None:
            pytest.skip(_NO_DIGEST)
        assert isinstance(answer, DeviceDigest), (
            f"vramcore_device_digest returned a {type(answer).__name__}, not a DeviceDigest"
        )
        return answer

    # -- round trips ---------------------------------------------------------------------

    @pytest.mark.parametrize(
        "nbytes", list(_ROUND_TRIP_SIZES.values()), ids=list(_ROUND_TRIP_SIZES)
    )
    def test_round_trip(self, backend: AllocatorBackend, device: int, nbytes: int) -> None:
        """What ``copy_in`` wrote, ``read_into`` reads back, byte for byte."""
        data = _pattern(nbytes, nbytes)
        with self._allocation(backend, device, nbytes) as buf:
            _copy(backend, buf, 0, data)
            _assert_same(_read(backend, buf, 0, nbytes), data, f"{nbytes}-byte round trip")

    def test_round_trip_across_chunk_boundaries(
        self, backend: AllocatorBackend, device: int
    ) -> None:
        """Pieces of odd sizes written back to back, read in other pieces, land in place."""
        nbytes = 5 * _LEAF + 333
        data = _pattern(nbytes, 5)
        pieces = [1, 4095, _LEAF + 1, 3 * _LEAF - 7, 100_000]
        with self._allocation(backend, device, nbytes) as buf:
            offset, i = 0, 0
            while offset < nbytes:
                end = min(nbytes, offset + pieces[i % len(pieces)])
                _copy(backend, buf, offset, data[offset:end])
                offset, i = end, i + 1
            got = b"".join(
                _read(backend, buf, start, min(40_000, nbytes - start))
                for start in range(0, nbytes, 40_000)
            )
            _assert_same(got, data, "chunked round trip")
            for boundary in range(_LEAF, nbytes, _LEAF):
                window = _read(backend, buf, boundary - 3, 6)
                _assert_same(window, data[boundary - 3 : boundary + 3], "read across a leaf")

    def test_round_trip_at_offsets(self, backend: AllocatorBackend, device: int) -> None:
        """Writes at offsets change exactly their bytes; partial reads return their window."""
        nbytes = 3 * _LEAF
        model = bytearray(_pattern(nbytes, 3))
        with self._allocation(backend, device, nbytes) as buf:
            _copy(backend, buf, 0, bytes(model))
            for offset, length in [(_LEAF - 1, 2), (2 * _LEAF + 5, 77), (nbytes - 1, 1), (7, 0)]:
                patch = _pattern(length, offset)
                _copy(backend, buf, offset, patch)
                model[offset : offset + length] = patch
            _assert_same(_read(backend, buf, 0, nbytes), bytes(model), "writes at offsets")
            for offset, length in [(1, 10), (_LEAF - 2, 5), (nbytes - 3, 3), (nbytes, 0)]:
                window = _read(backend, buf, offset, length)
                _assert_same(window, bytes(model[offset : offset + length]), "partial read")

    # -- bounds and typed errors -----------------------------------------------------------

    @pytest.mark.parametrize(
        ("offset", "length"), [(-1, 1), (4095, 2), (4096, 1), (0, 4097), (5000, 0)]
    )
    def test_out_of_bounds_copies_are_invalid_input(
        self, backend: AllocatorBackend, device: int, offset: int, length: int
    ) -> None:
        """Copies and reads outside the buffer raise ``InvalidInput`` and change nothing."""
        data = _pattern(4096, 1)
        with self._allocation(backend, device, 4096) as buf:
            _copy(backend, buf, 0, data)
            with pytest.raises(InvalidInput):
                _wait(backend.copy_in(buf, offset, memoryview(b"\xff" * length)))
            with pytest.raises(InvalidInput):
                backend.read_into(buf, offset, memoryview(bytearray(length)))
            _assert_same(_read(backend, buf, 0, 4096), data, "after refused copies")

    @pytest.mark.parametrize("nbytes", [0, -1])
    def test_bad_allocation_size_is_invalid_input(
        self, backend: AllocatorBackend, device: int, nbytes: int
    ) -> None:
        """Allocating zero or a negative number of bytes raises ``InvalidInput``."""
        with pytest.raises(InvalidInput):
            backend.allocate(device, nbytes)

    def test_unknown_device_is_invalid_input(self, backend: AllocatorBackend) -> None:
        """A device index past the last device raises ``InvalidInput``."""
        missing = len(backend.devices())
        with pytest.raises(InvalidInput):
            backend.allocate(missing, 4096)
        with pytest.raises(InvalidInput):
            backend.mem_info(missing)

    def test_double_free_and_use_after_free_raise(
        self, backend: AllocatorBackend, device: int
    ) -> None:
        """A freed buffer cannot be freed, written or read again."""
        buf = backend.allocate(device, 4096)
        backend.free(buf)
        with pytest.raises(VramError):
            backend.free(buf)
        with pytest.raises(VramError):
            _wait(backend.copy_in(buf, 0, memoryview(b"x")))
        with pytest.raises(VramError):
            backend.read_into(buf, 0, memoryview(bytearray(1)))

    def test_insufficient_vram(self, backend: AllocatorBackend, device: int) -> None:
        """An allocation larger than free (or total) memory raises ``InsufficientVram``."""
        start = self._free_bytes(backend, device)
        free, total = backend.mem_info(device)
        for nbytes in (free + _LEAF, total + 1):
            with pytest.raises(InsufficientVram) as info:
                backend.allocate(device, nbytes)
            assert info.value.needed == nbytes
        self._assert_free_back(backend, device, start, "a refused allocation changed free memory")

    def test_memory_kind_is_device(self, backend: AllocatorBackend, device: int) -> None:
        """Allocations are plain device memory, the only kind the VRAM-only policy accepts."""
        with self._allocation(backend, device, 4096) as buf:
            assert backend.memory_kind(buf) is MemoryKind.DEVICE

    def test_devices_and_mem_info_agree(self, backend: AllocatorBackend, device: int) -> None:
        """``devices()`` lists the device; ``mem_info`` gives ``0 <= free <= total``."""
        infos = {info.index: info for info in backend.devices()}
        assert device in infos
        free, total = backend.mem_info(device)
        assert isinstance(free, int)
        assert isinstance(total, int)
        assert 0 <= free <= total
        assert total == infos[device].total_bytes

    # -- the copy contract ---------------------------------------------------------------

    def test_source_reuse_after_copy_in(self, backend: AllocatorBackend, device: int) -> None:
        """Overwriting the source as soon as ``copy_in`` returned (and its handle, if any,
        was waited) never changes what landed: a copy that still reads ``data`` after
        returning must hand back a handle."""
        chunk = 2 * _LEAF + 11
        pieces = [_pattern(chunk, 100 + i) for i in range(4)]
        staging = bytearray(chunk)
        with self._allocation(backend, device, 4 * chunk) as buf:
            for i, piece in enumerate(pieces):
                staging[:] = piece
                _wait(backend.copy_in(buf, i * chunk, memoryview(staging)))
                staging[:] = b"\x00" * chunk  # reused at once, as the core reuses staging
            _assert_same(_read(backend, buf, 0, 4 * chunk), b"".join(pieces), "reused source")

    def test_copy_handles(self, backend: AllocatorBackend, device: int) -> None:
        """Handles can be waited twice, in any order and from other threads."""
        chunk = _LEAF + 7
        sources = [_pattern(chunk, 200 + i) for i in range(8)]
        with self._allocation(backend, device, 8 * chunk) as buf:
            handles = [
                backend.copy_in(buf, i * chunk, memoryview(src)) for i, src in enumerate(sources)
            ]
            for handle in reversed(handles[1:]):
                _wait(handle)
                _wait(handle)
            run_bounded(lambda: _wait(handles[0]), "wait() on another thread", self.hang_timeout)
            _assert_same(_read(backend, buf, 0, 8 * chunk), b"".join(sources), "after handles")

    def test_calls_from_other_threads(self, backend: AllocatorBackend, device: int) -> None:
        """Each call works from a thread other than the one that made the backend."""
        data = _pattern(_LEAF + 3, 7)
        timeout = self.hang_timeout
        buf = run_bounded(lambda: backend.allocate(device, len(data)), "allocate", timeout)
        handle = run_bounded(lambda: backend.copy_in(buf, 0, memoryview(data)), "copy", timeout)
        run_bounded(lambda: _wait(handle), "wait", timeout)
        got = run_bounded(lambda: _read(backend, buf, 0, len(data)), "read_into", timeout)
        _assert_same(got, data, "copy and read on other threads")
        kind = run_bounded(lambda: backend.memory_kind(buf), "memory_kind", timeout)
        assert kind is MemoryKind.DEVICE
        run_bounded(lambda: backend.mem_info(device), "mem_info", timeout)
        run_bounded(lambda: backend.free(buf), "free", timeout)

    def test_concurrent_copies_from_many_threads(
        self, backend: AllocatorBackend, device: int
    ) -> None:
        """Threads copying into disjoint regions (and their own buffers) at once all land."""
        region = _LEAF + 1000
        data = _pattern(8 * region, 8)
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            try:
                part = data[i * region : (i + 1) * region]
                for start in range(0, region, 9000):
                    piece = part[start : start + 9000]
                    _copy(backend, shared, i * region + start, piece)
                with self._allocation(backend, device, region) as own:
                    _copy(backend, own, 0, part)
                    _assert_same(_read(backend, own, 0, region), part, "own buffer")
            except BaseException as exc:
                errors.append(exc)

        with self._allocation(backend, device, 8 * region) as shared:
            threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(self.hang_timeout)
            assert not any(t.is_alive() for t in threads), "concurrent copies hang"
            if errors:
                raise errors[0]
            _assert_same(_read(backend, shared, 0, len(data)), data, "concurrent copies")

    def test_staging_buffers_feed_copies(self, backend: AllocatorBackend, device: int) -> None:
        """Two lent staging buffers, alternated and reused after each handle, feed copies."""
        chunk = 2 * _LEAF + 100
        nbytes = 5 * chunk + 7
        data = _pattern(nbytes, 9)
        with self._allocation(backend, device, nbytes) as buf:
            with backend.staging(2, chunk) as lent:
                assert len(lent) == 2
                views = [memoryview(b).cast("B") for b in lent]
                assert all(len(v) >= chunk and not v.readonly for v in views)
                handles: list[CopyHandle | None] = [None, None]
                for i, offset in enumerate(range(0, nbytes, chunk)):
                    slot = i % 2
                    _wait(handles[slot])  # the copy that used this buffer is done
                    piece = data[offset : offset + chunk]
                    views[slot][: len(piece)] = piece
                    handles[slot] = backend.copy_in(buf, offset, views[slot][: len(piece)])
                for handle in handles:
                    _wait(handle)
                for view in views:
                    view.release()
            _assert_same(_read(backend, buf, 0, nbytes), data, "copies from staging")

    # -- device digest -------------------------------------------------------------------

    @pytest.mark.parametrize(
        ("nbytes", "leaf_size"),
        [(1, _LEAF), (_LEAF, _LEAF), (3 * _LEAF + 17, _LEAF), (9 * _LEAF, _LEAF), (40961, 4096)],
        ids=["1B", "one-leaf", "4-leaves", "9-leaves", "small-leaves"],
    )
    def test_device_digest_matches_host(
        self,
        backend: AllocatorBackend,
        device: int,
        digest_plugins: Sequence[object],
        nbytes: int,
        leaf_size: int,
    ) -> None:
        """The device digest of a whole buffer is the host digest: root and packed leaves."""
        data = _pattern(nbytes, 11)
        leaves = hash_leaves(data, leaf_size)
        with self._allocation(backend, device, nbytes) as buf:
            _copy(backend, buf, 0, data)
            answer = self._device_digest(digest_plugins, backend, buf, leaf_size, None)
        assert answer.first_leaf == 0
        assert bytes(answer.leaves) == b"".join(leaves), "device leaf hashes differ from host"
        assert answer.root == merkle_root(leaves), "device root differs from the host root"

    def test_device_digest_of_leaf_ranges(
        self, backend: AllocatorBackend, device: int, digest_plugins: Sequence[object]
    ) -> None:
        """A leaf range gives ``root=None``, its ``first_leaf`` and exactly its leaves."""
        nbytes = 9 * _LEAF + 5  # ten leaves, the last one short
        data = _pattern(nbytes, 12)
        packed = b"".join(hash_leaves(data, _LEAF))
        with self._allocation(backend, device, nbytes) as buf:
            _copy(backend, buf, 0, data)
            for first, stop in [(0, 1), (3, 7), (9, 10), (5, 6), (0, 10)]:
                answer = self._device_digest(digest_plugins, backend, buf, _LEAF, (first, stop))
                assert answer.root is None
                assert answer.first_leaf == first
                assert bytes(answer.leaves) == packed[first * 32 : stop * 32], (
                    f"device leaf hashes of range ({first}, {stop}) differ from host"
                )

    # -- lifetime and failures ---------------------------------------------------------------

    def test_close_with_copies_in_flight(self, backend: AllocatorBackend, device: int) -> None:
        """``close()`` with copies in flight returns; handles then return or raise a
        ``VramError``; later calls are refused with a ``VramError`` or give the right bytes."""
        chunk = 4 * _LEAF
        data = _pattern(8 * chunk, 13)
        buf = backend.allocate(device, len(data))
        handles = [
            backend.copy_in(buf, offset, memoryview(data)[offset : offset + chunk])
            for offset in range(0, len(data), chunk)
        ]
        run_bounded(backend.close, "close() with copies in flight", self.hang_timeout)
        landed = True
        for handle in handles:
            try:
                run_bounded(
                    functools.partial(_wait, handle), "wait() after close", self.hang_timeout
                )
            except VramError:
                landed = False
        try:
            got = run_bounded(
                lambda: _read(backend, buf, 0, len(data)), "read after close", self.hang_timeout
            )
        except VramError:
            pass
        else:
            if landed:
                _assert_same(got, data, "read after close")
        with contextlib.suppress(VramError):
            run_bounded(lambda: backend.free(buf), "free after close", self.hang_timeout)
        with contextlib.suppress(VramError):
            late = run_bounded(
                lambda: backend.allocate(device, 4096), "allocate after close", self.hang_timeout
            )
            backend.free(late)

    def test_no_leak_after_forced_failures(self, backend: AllocatorBackend, device: int) -> None:
        """Refused calls (too large, bad size, out of bounds, double free) leak nothing."""
        start = self._free_bytes(backend, device)
        total = backend.mem_info(device)[1]
        with pytest.raises(InsufficientVram):
            backend.allocate(device, total + 1)
        with pytest.raises(InvalidInput):
            backend.allocate(device, 0)
        buf = backend.allocate(device, 4096)
        with pytest.raises(InvalidInput):
            _wait(backend.copy_in(buf, 4000, memoryview(bytes(200))))
        with pytest.raises(InvalidInput):
            backend.read_into(buf, 4000, memoryview(bytearray(200)))
        backend.free(buf)
        with pytest.raises(VramError):
            backend.free(buf)
        self._assert_free_back(backend, device, start, "free memory did not return to its start")

    def test_no_leak_after_injected_failures(
        self, backend: AllocatorBackend, device: int, fault_injector: FaultInjector | None
    ) -> None:
        """Failed allocations, copies, copy completions, reads and frees leak nothing, and
        the backend works afterwards."""
        if fault_injector is None:
            pytest.skip(
                "the backend offers no fault injection (see vramcore.testing.FaultInjector)"
            )
        start = self._free_bytes(backend, device)
        data = _pattern(2 * _LEAF, 14)
        fault_injector.fail_next_allocation("contract: allocation")
        with pytest.raises(VramError):
            backend.allocate(device, len(data))
        buf = backend.allocate(device, len(data))
        fault_injector.fail_next_copy("contract: copy")
        with pytest.raises(VramError):
            _copy(backend, buf, 0, data)
        fault_injector.fail_next_wait("contract: copy completion")
        with pytest.raises(VramError):
            _copy(backend, buf, 0, data)
        fault_injector.fail_next_read("contract: read")
        with pytest.raises(VramError):
            _read(backend, buf, 0, len(data))
        _copy(backend, buf, 0, data)
        _assert_same(_read(backend, buf, 0, len(data)), data, "after injected failures")
        fault_injector.fail_next_free("contract: free")
        with pytest.raises(VramError):
            backend.free(buf)
        with contextlib.suppress(VramError):  # released already, or released now
            backend.free(buf)
        self._assert_free_back(backend, device, start, "free memory did not return to its start")
