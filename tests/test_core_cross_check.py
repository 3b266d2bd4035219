"""Every seal whose digest came from the device is cross-checked against the staged bytes.

A GPU backend whose copy silently loses a chunk (a lost DMA) must never get a seal signed over
the wrong bytes, whatever the device digest did before: these tests drive the core with a mock
that drops one copy chunk of a chosen seal, and with device digests that decline, answer
wrongly, or fail in other ways.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import vramcore_allocator_mock as mock_plugin

from vramcore import DeviceBuffer, DeviceDigest, VramManager, hookimpl
from vramcore.digest import hash_leaves_packed, merkle_root
from vramcore.errors import (
    DeviceDigestUnavailable,
    IntegrityViolation,
    SealVerificationFailed,
    VramError,
)
from vramcore.testing import CapturingSink

LEAF = 4096
CHUNK = 16 * LEAF  # 16 leaves per copy chunk
SIZE = 40 * CHUNK + 1000  # 41 copy chunks, the last one short


class LosingBackend(mock_plugin.MockBackend):
    """A mock whose ``copy_in`` silently drops one chunk of the seals it is told to."""

    def __init__(self, **options: Any) -> None:
        super().__init__(capacity=1 << 30, **options)
        self.seals = 0
        self.lose_on: set[int] = set()  # 1-based seal numbers whose third chunk is lost
        self._copies = 0

    def allocate(self, device: int, nbytes: int) -> DeviceBuffer:
        self.seals += 1
        self._copies = 0
        return super().allocate(device, nbytes)

    def copy_in(self, buf: DeviceBuffer, offset: int, data: memoryview) -> Any:
        self._copies += 1
        if self.seals in self.lose_on and self._copies == 3:
            return None  # "done", but nothing was written: a lost DMA
        return super().copy_in(buf, offset, data)


class VramDigest:
    """A device digest that hashes what is really in VRAM (a correct kernel)."""

    @hookimpl(tryfirst=True)
    def vramcore_device_digest(
        self, backend: Any, buffer: DeviceBuffer, leaf_size: int, leaf_range: Any
    ) -> Any:
        return backend.digest(buffer, leaf_size, leaf_range)


class DeclinesOnce(VramDigest):
    """Declines its first digest (no room for its scratch), then answers from VRAM."""

    def __init__(self, decline: Callable[[], Any]) -> None:
        self.calls = 0
        self._decline = decline

    @hookimpl(tryfirst=True)
    def vramcore_device_digest(
        self, backend: Any, buffer: DeviceBuffer, leaf_size: int, leaf_range: Any
    ) -> Any:
        self.calls += 1
        if self.calls == 1:
            return self._decline()
        return backend.digest(buffer, leaf_size, leaf_range)


def _raise_unavailable() -> None:
    raise DeviceDigestUnavailable("no VRAM for the digest scratch")


def _manager(new_manager: Any, backend: Any, *plugins: object, sink: CapturingSink) -> Any:
    return new_manager(backend, *plugins, sink=sink, leaf_size=LEAF, chunk_bytes=CHUNK)


def _assert_refused(
    manager: VramManager, backend: LosingBackend, sink: CapturingSink, data: bytes, sid: str
) -> None:
    used, live, free = manager.used_vram(), backend.live_allocations, manager.available_vram()
    with pytest.raises(IntegrityViolation, match="cross-check") as info:
        manager.seal_model(data, shard_id=sid)
    assert info.value.reason == "cross_check"
    refused = [e for e in sink.of_type("vram.seal_refused") if e.shard_id == sid]
    assert [e.reason for e in refused] == ["cross_check"]
    assert sid not in [e.shard_id for e in sink.of_type("vram.sealed")]
    assert sid not in [s.shard_id for s in manager.shards()]
    assert (manager.used_vram(), backend.live_allocations) == (used, live)
    assert manager.available_vram() == free


@pytest.mark.parametrize("lost_seal", [2, 3])
def test_a_lost_copy_chunk_refuses_any_seal_with_the_device_digest_on(
    new_manager: Any, lost_seal: int
) -> None:
    backend = LosingBackend(device_digest=True)
    backend.lose_on = {lost_seal}
    sink = CapturingSink()
    manager = _manager(new_manager, backend, sink=sink)
    for n in range(1, lost_seal):
        shard = manager.seal_model(os.urandom(SIZE), shard_id=f"ok-{n}")
        manager.verify_sealed(shard)
    _assert_refused(manager, backend, sink, os.urandom(SIZE), "lost")
    # The next seal (nothing lost) is fine again, and so is every shard sealed before.
    manager.verify_sealed(manager.seal_model(os.urandom(SIZE), shard_id="after"))
    for shard in manager.shards():
        manager.verify_sealed(shard)


@pytest.mark.parametrize("source", ["memory", "file"])
def test_a_lost_copy_chunk_refuses_a_seal_hashed_on_the_host(
    new_manager: Any, source: str, tmp_path: Any
) -> None:
    # With no device digest the staged hashes are the digest; VRAM is still read back (a
    # CSPRNG sample from every copy chunk) before anything is signed.
    backend = LosingBackend()
    backend.lose_on = {1}
    sink = CapturingSink()
    manager = _manager(new_manager, backend, sink=sink)
    data = os.urandom(SIZE)
    if source == "memory":
        _assert_refused(manager, backend, sink, data, "lost")
    else:
        path = tmp_path / "lost.bin"
        path.write_bytes(data)
        with pytest.raises(IntegrityViolation, match="cross-check") as info:
            manager.seal_file(path, shard_id="lost")
        assert info.value.reason == "cross_check"
        assert backend.live_allocations == 0
    manager.verify_sealed(manager.seal_model(data, shard_id="after"))


def test_a_device_that_declines_the_seal_whose_copy_was_lost_refuses_it(
    new_manager: Any,
) -> None:
    backend = LosingBackend(device_digest=True)
    backend.lose_on = {1}
    sink = CapturingSink()
    manager = _manager(new_manager, backend, DeclinesOnce(_raise_unavailable), sink=sink)
    with pytest.raises(IntegrityViolation, match="the device declined: no VRAM for the digest"):
        manager.seal_model(os.urandom(SIZE), shard_id="lost")
    assert backend.live_allocations == 0


@pytest.mark.parametrize("decline", [lambda: None, _raise_unavailable], ids=["none", "raises"])
def test_a_device_that_declined_once_is_still_cross_checked(
    new_manager: Any, decline: Callable[[], Any]
) -> None:
    backend = LosingBackend(device_digest=True)
    backend.lose_on = {2}
    sink = CapturingSink()
    digest = DeclinesOnce(decline)
    manager = _manager(new_manager, backend, digest, sink=sink)
    first = manager.seal_model(os.urandom(SIZE), shard_id="first")  # the device declines here
    manager.verify_sealed(first)  # ... and answers from here on (wrongly for the next seal)
    assert digest.calls >= 2
    _assert_refused(manager, backend, sink, os.urandom(SIZE), "second")
    manager.verify_sealed(first)


def test_a_device_digest_that_declines_with_the_typed_error_is_audited_and_hashed_on_the_host(
    new_manager: Any,
) -> None:
    backend = LosingBackend(device_digest=True)
    sink = CapturingSink()
    manager = _manager(new_manager, backend, DeclinesOnce(_raise_unavailable), sink=sink)
    data = os.urandom(SIZE)
    shard = manager.seal_model(data, shard_id="host")
    assert shard.digest == merkle_root(hash_leaves_packed(data, LEAF)).hex()
    [warning] = sink.of_type("digest.fallback")
    assert warning.severity == "warning"
    assert warning.shard_id == "host" and warning.operation == "seal"
    assert "no VRAM for the digest scratch" in warning.reason
    manager.verify_sealed(shard)


def test_full_cross_check_compares_every_leaf(new_manager: Any) -> None:
    class OneLeafWrong(VramDigest):
        @hookimpl(tryfirst=True)
        def vramcore_device_digest(
            self, backend: Any, buffer: DeviceBuffer, leaf_size: int, leaf_range: Any
        ) -> Any:
            answer = backend.digest(buffer, leaf_size, leaf_range)
            leaves = bytearray(answer.leaves)
            leaves[7 * 32] ^= 1  # one leaf of one chunk, root consistent with the lie
            root = merkle_root(bytes(leaves)) if answer.root is not None else None
            return DeviceDigest(root=root, leaves=bytes(leaves), first_leaf=answer.first_leaf)

    backend = LosingBackend(device_digest=True)
    sink = CapturingSink()
    manager = _manager(new_manager, backend, OneLeafWrong(), sink=sink)
    with pytest.raises(IntegrityViolation, match="cross-check"):
        manager.seal_model(os.urandom(SIZE), shard_id="full", cross_check="full")
    assert backend.live_allocations == 0 and manager.used_vram() == 0
    with pytest.raises(VramError, match="cross_check"):
        manager.seal_model(b"x" * 10, cross_check="some")  # type: ignore[arg-type]


class Exploding:
    """A device digest that answers the seal, then raises ``error`` on later calls."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.armed = False

    @hookimpl(tryfirst=True)
    def vramcore_device_digest(
        self, backend: Any, buffer: DeviceBuffer, leaf_size: int, leaf_range: Any
    ) -> Any:
        if self.armed:
            raise self.error
        return backend.digest(buffer, leaf_size, leaf_range)


ERRORS = [RuntimeError("driver fault"), SystemExit(3), ValueError("bad")]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("sample", [None, 0.5])
def test_a_device_digest_raising_during_verification_fails_it_typed_and_audited(
    new_manager: Any, error: BaseException, sample: float | None
) -> None:
    backend = LosingBackend(device_digest=True)
    sink = CapturingSink()
    plugin = Exploding(error)
    manager = _manager(new_manager, backend, plugin, sink=sink)
    shard = manager.seal_model(os.urandom(SIZE), shard_id="s")
    plugin.armed = True
    with pytest.raises(SealVerificationFailed) as info:
        manager.verify_sealed(shard, sample=sample)
    assert info.value.reason == "digest_failed"
    assert type(error).__name__ in str(info.value)
    [failed] = sink.of_type("seal.verification_failed")
    assert failed.reason == "digest_failed"
    assert not sink.of_type("seal.verified")
    plugin.armed = False
    manager.verify_sealed(shard)  # not quarantined: the bytes were never shown to be wrong


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_a_device_digest_raising_during_a_seal_refuses_it_typed_and_audited(
    new_manager: Any, error: BaseException
) -> None:
    backend = LosingBackend(device_digest=True)
    sink = CapturingSink()
    plugin = Exploding(error)
    plugin.armed = True
    manager = _manager(new_manager, backend, plugin, sink=sink)
    with pytest.raises(VramError, match=type(error).__name__):
        manager.seal_model(os.urandom(SIZE), shard_id="s")
    [failed] = sink.of_type("vram.allocation_failed")
    assert type(error).__name__ in failed.reason
    assert backend.live_allocations == 0 and manager.used_vram() == 0


def test_the_scrubber_survives_a_backend_error_on_one_shard(new_manager: Any) -> None:
    class FailsOnOne(VramDigest):
        @hookimpl(tryfirst=True)
        def vramcore_device_digest(
            self, backend: Any, buffer: DeviceBuffer, leaf_size: int, leaf_range: Any
        ) -> Any:
            if leaf_range is not None and buffer.nbytes == 3 * LEAF:
                raise RuntimeError("ECC error while reading")
            return backend.digest(buffer, leaf_size, leaf_range)

    backend = LosingBackend(device_digest=True)
    sink = CapturingSink()
    manager = _manager(new_manager, backend, FailsOnOne(), sink=sink)
    manager.seal_model(os.urandom(3 * LEAF), shard_id="bad")
    good = manager.seal_model(os.urandom(5 * LEAF), shard_id="good")
    with manager.verified(good) as buf:
        pass
    backend.flip_bit(buf, 2 * LEAF + 5)
    scrubber = manager.scrub(1 << 30)
    try:
        assert scrubber.wait_for_passes(2, timeout=20)
        assert scrubber.running
    finally:
        scrubber.stop()
    assert scrubber.stats().corrupted == ("good",)
    reasons = {(e.shard_id, e.reason) for e in sink.of_type("seal.verification_failed")}
    assert ("bad", "digest_failed") in reasons and ("good", "digest") in reasons


class IndexedDigest:
    """A device digest that answers index requests itself, recording what it was asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[int, ...]] = []

    @hookimpl(tryfirst=True)
    def vramcore_device_digest(
        self,
        backend: Any,
        buffer: DeviceBuffer,
        leaf_size: int,
        leaf_range: Any,
        leaf_indices: Any,
    ) -> Any:
        if leaf_indices is None:
            return backend.digest(buffer, leaf_size, leaf_range)
        self.asked.append(tuple(leaf_indices))
        return self.answer(backend.digest(buffer, leaf_size, None).leaves, tuple(leaf_indices))

    def answer(self, every: bytes, indices: tuple[int, ...]) -> DeviceDigest:
        """The answer to an index request, from every leaf's hash."""
        picked = b"".join(every[i * 32 : (i + 1) * 32] for i in indices)
        return DeviceDigest(root=None, leaves=picked, leaf_indices=indices)


def test_a_sampled_verification_asks_the_device_once_for_the_sorted_indices(
    new_manager: Any,
) -> None:
    backend = LosingBackend(device_digest=True)
    plugin = IndexedDigest()
    manager = _manager(new_manager, backend, plugin, sink=CapturingSink())
    shard = manager.seal_model(os.urandom(SIZE), shard_id="s")
    manager.verify_sealed(shard, sample=7)
    [asked] = plugin.asked
    assert len(asked) == 7 and list(asked) == sorted(set(asked))
    with manager.verified(shard) as buf:
        pass
    backend.flip_bit(buf, 5 * LEAF + 1)
    with pytest.raises(SealVerificationFailed) as info:
        manager.verify_sealed(shard, sample=1.0)
    assert info.value.corrupted_ranges == ((5 * LEAF, 6 * LEAF),)


def test_a_plugin_without_leaf_indices_answers_for_the_whole_buffer(new_manager: Any) -> None:
    backend = LosingBackend(device_digest=True)
    calls: list[Any] = []

    class WholeOnly(VramDigest):
        @hookimpl(tryfirst=True)
        def vramcore_device_digest(
            self, backend: Any, buffer: DeviceBuffer, leaf_size: int, leaf_range: Any
        ) -> Any:
            calls.append(leaf_range)
            return backend.digest(buffer, leaf_size, leaf_range)

    manager = _manager(new_manager, backend, WholeOnly(), sink=CapturingSink())
    shard = manager.seal_model(os.urandom(SIZE), shard_id="s")
    calls.clear()
    manager.verify_sealed(shard, sample=3)
    assert calls == [None]  # one call, seen as a whole-buffer request


def test_a_malformed_answer_to_an_index_request_fails_the_verification(
    new_manager: Any,
) -> None:
    class WrongIndices(IndexedDigest):
        def answer(self, every: bytes, indices: tuple[int, ...]) -> DeviceDigest:
            wrong = tuple(i + 1 for i in indices)
            return DeviceDigest(root=None, leaves=b"\0" * 32 * len(wrong), leaf_indices=wrong)

    sink = CapturingSink()
    manager = _manager(new_manager, LosingBackend(device_digest=True), WrongIndices(), sink=sink)
    shard = manager.seal_model(os.urandom(SIZE), shard_id="s")
    with pytest.raises(SealVerificationFailed) as info:
        manager.verify_sealed(shard, sample=2)
    assert info.value.reason == "digest_failed"
    assert "ConfigError" in str(info.value)


def test_a_device_root_that_is_not_the_tree_of_its_own_leaves_refuses_a_sampled_seal(
    new_manager: Any,
) -> None:
    class WrongRoot(VramDigest):
        lie = False

        @hookimpl(tryfirst=True)
        def vramcore_device_digest(
            self, backend: Any, buffer: DeviceBuffer, leaf_size: int, leaf_range: Any
        ) -> Any:
            answer = backend.digest(buffer, leaf_size, leaf_range)
            if answer.root is None or not self.lie:
                return answer
            root = bytes([answer.root[0] ^ 1]) + answer.root[1:]  # every leaf right, root wrong
            return DeviceDigest(root=root, leaves=answer.leaves, first_leaf=answer.first_leaf)

    backend = LosingBackend(device_digest=True)
    sink = CapturingSink()
    digest = WrongRoot()
    manager = _manager(new_manager, backend, digest, sink=sink)
    manager.verify_sealed(manager.seal_model(os.urandom(SIZE), shard_id="first"))
    digest.lie = True  # from the second seal on, when only a sample of leaves is compared
    _assert_refused(manager, backend, sink, os.urandom(SIZE), "root")
