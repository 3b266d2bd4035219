"""The core keeps the backend contract an asynchronous GPU needs, and fails closed.

Each test here reproduces a way a real CUDA backend (or a misbehaving plugin) broke the core
before: copies that finish after ``copy_in`` returns, ``close()`` racing a seal or a
verification, narration wrappers that swallow errors, hooks that return garbage, a file hashed
twice.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

import vramcore.digest
from vramcore import hookimpl
from vramcore.audit import AuditSink, SinkContext
from vramcore.backend import DeviceBuffer, DeviceDigest
from vramcore.digest import hash_leaves_packed, merkle_root
from vramcore.errors import (
    ConfigError,
    IntegrityViolation,
    InvalidInput,
    ManagerClosed,
    NotSealed,
    SealVerificationFailed,
    VramError,
)
from vramcore.manager import VramManager
from vramcore.narration import Operation
from vramcore.seal import SecretKey, WorkerToken
from vramcore.shard import SealedShard
from vramcore.testing import TEST_TOKEN, CapturingSink

KIB = 1024


def _subclass(mock_backend: Any) -> type:
    return type(mock_backend)


class _Thread:
    """A copy completion handle over a thread doing the copy."""

    def __init__(self, thread: threading.Thread) -> None:
        self._thread = thread

    def wait(self) -> None:
        self._thread.join()


def late_copy_backend(mock_backend: Any, *, handles: bool, delay: float = 0.05) -> Any:
    """A mock whose copies read the host buffer ``delay`` s after ``copy_in`` returned.

    With ``handles=False`` it is the backend bug the contract forbids: late, and no handle.
    """
    base = _subclass(mock_backend)

    class LateCopies(base):  # type: ignore[misc, valid-type]
        def copy_in(self, buf: DeviceBuffer, offset: int, data: memoryview) -> Any:
            def later() -> None:
                time.sleep(delay)
                try:
                    base.copy_in(self, buf, offset, data)  # reads ``data`` now, not before
                except InvalidInput:  # the buffer was freed meanwhile (a refused seal)
                    self.late_into_freed += 1

            thread = threading.Thread(target=later)
            thread.start()
            if handles:
                return _Thread(thread)
            self.stray.append(thread)
            return None

    backend = LateCopies(devices=1, capacity=1 << 30)
    backend.stray = []
    backend.late_into_freed = 0
    return backend


def test_asynchronous_copies_with_handles_seal_the_right_bytes(
    new_manager: Callable[..., VramManager], mock_backend: Any, tmp_path: Path, pattern: Any
) -> None:
    data = pattern(20 * 65536 + 123, 7)
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    backend = late_copy_backend(mock_backend, handles=True)
    manager = new_manager(backend, audit="disabled", chunk_bytes=65536)
    shard = manager.seal_file(path)
    assert shard.digest == merkle_root(hash_leaves_packed(data)).hex()
    manager.verify_sealed(shard)  # the bytes in VRAM are the file's
    with manager.verified(shard) as buf:
        out = bytearray(len(data))
        backend.read_into(buf, 0, memoryview(out))
    assert bytes(out) == data
    in_memory = manager.seal_model(bytearray(data), shard_id="from-memory")
    manager.verify_sealed(in_memory)


def test_a_backend_completing_copies_late_without_a_handle_is_refused_at_seal_time(
    new_manager: Callable[..., VramManager], mock_backend: Any, tmp_path: Path, pattern: Any
) -> None:
    data = pattern(20 * 65536, 8)
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    backend = late_copy_backend(mock_backend, handles=False)
    manager = new_manager(backend, audit="disabled", chunk_bytes=65536)
    # The staged hashes are the file's, but VRAM does not hold those bytes when the seal is
    # about to be signed (the copies have not landed, or landed from reused staging buffers):
    # the read-back spot check refuses it, and nothing stays allocated.
    with pytest.raises(IntegrityViolation, match="cross-check") as info:
        manager.seal_file(path)
    assert info.value.reason == "cross_check"
    for thread in backend.stray:
        thread.join()
    assert manager.shards() == [] and backend.live_allocations == 0


class SlowStrictBackend:
    """Wraps a mock: copies take ``copy_seconds``; any call after ``close()`` is recorded."""

    def __init__(self, mock_backend: Any, copy_seconds: float) -> None:
        base = _subclass(mock_backend)
        outer = self
        self.copy_started = threading.Event()
        self.after_close: list[str] = []

        class Slow(base):  # type: ignore[misc, valid-type]
            def __getattribute__(self, name: str) -> Any:
                attr = super().__getattribute__(name)
                if name in {
                    "copy_in",
                    "read_into",
                    "free",
                    "allocate",
                    "mem_info",
                    "digest",
                } and super().__getattribute__("closed"):
                    outer.after_close.append(name)
                return attr

            def copy_in(self, buf: DeviceBuffer, offset: int, data: memoryview) -> Any:
                outer.copy_started.set()
                time.sleep(copy_seconds)
                return base.copy_in(self, buf, offset, data)

        self.backend = Slow(devices=1, capacity=1 << 30)


def test_close_during_a_seal_waits_and_never_touches_a_closed_backend(
    make_plugin_manager: Any, mock_backend: Any
) -> None:
    slow = SlowStrictBackend(mock_backend, copy_seconds=0.3)
    manager = VramManager(
        TEST_TOKEN,
        allocator="slow",
        plugin_manager=make_plugin_manager(BackendPlugin(slow.backend)),
        audit="disabled",
    )
    outcome: list[BaseException | SealedShard] = []

    def seal() -> None:
        try:
            outcome.append(manager.seal_model(b"x" * 100_000, shard_id="racing"))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=seal)
    thread.start()
    assert slow.copy_started.wait(5)
    manager.close()  # owns the backend: closes it, but only after the seal finished
    thread.join(5)
    assert len(outcome) == 1
    assert isinstance(outcome[0], ManagerClosed)
    assert slow.backend.closed
    assert slow.after_close == []
    assert slow.backend.live_allocations == 0


def test_close_gives_up_on_a_stuck_operation_and_leaves_the_backend_open(
    make_plugin_manager: Any, mock_backend: Any
) -> None:
    slow = SlowStrictBackend(mock_backend, copy_seconds=1.0)
    manager = VramManager(
        TEST_TOKEN,
        allocator="slow",
        plugin_manager=make_plugin_manager(BackendPlugin(slow.backend)),
        audit="disabled",
        close_timeout=0.1,
    )
    outcome: list[BaseException | SealedShard] = []
    thread = threading.Thread(
        target=lambda: _catch(outcome, lambda: manager.seal_model(b"y" * 5000, shard_id="stuck"))
    )
    thread.start()
    assert slow.copy_started.wait(5)
    with pytest.raises(ManagerClosed, match="left open"):
        manager.close()
    assert not slow.backend.closed  # never closed under a running copy
    thread.join(5)
    assert isinstance(outcome[0], ManagerClosed)
    assert slow.after_close == []
    assert slow.backend.live_allocations == 0  # the seal cleaned up after itself


def _catch(into: list[Any], fn: Callable[[], Any]) -> None:
    try:
        into.append(fn())
    except BaseException as exc:
        into.append(exc)


class BackendPlugin:
    """Offers one ready backend named ``slow`` (so the manager owns and closes it)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    @hookimpl(tryfirst=True)
    def vramcore_allocator_backends(self) -> Sequence[Any]:
        from vramcore.backend import BackendSpec

        return [BackendSpec(name="slow", priority=100, probe=lambda: None, factory=self.make)]

    def make(self) -> Any:
        return self.backend


class Swallower:
    """A narration wrapper that logs errors and does not re-raise (the bug it must survive)."""

    def __init__(self, replace_result: object = None) -> None:
        self.swallowed: list[str] = []
        self.replace_result = replace_result

    @hookimpl(wrapper=True)
    def vramcore_operation(self, op: Operation) -> Any:
        try:
            result = yield
        except Exception as exc:
            self.swallowed.append(type(exc).__name__)
            return None
        return self.replace_result if self.replace_result is not None else result


def test_a_swallowing_wrapper_cannot_make_a_tampered_shard_verify(
    new_manager: Callable[..., VramManager], mock_backend: Any, pattern: Any
) -> None:
    swallower = Swallower(replace_result="not a seal")
    sink = CapturingSink()
    manager = new_manager(mock_backend, swallower, sink=sink)
    shard = manager.seal_model(pattern(5 * 65536), shard_id="victim")
    assert isinstance(shard, SealedShard)  # the wrapper cannot replace the result
    with manager.verified(shard) as buf:
        mock_backend.flip_bit(buf, 3 * 65536 + 5)
    tampered_at = len(sink.events)
    with pytest.raises(SealVerificationFailed) as info:
        manager.verify_sealed(shard)
    assert info.value.reason == "digest"
    used = False
    with pytest.raises(SealVerificationFailed), manager.verified(shard):
        used = True
    assert not used
    forged = SealedShard.from_json(shard.to_json().replace(shard.signature.hex(), "00" * 32))
    with pytest.raises(SealVerificationFailed) as info:
        manager.verify_sealed(forged)
    assert info.value.reason == "signature"
    assert "SealVerificationFailed" in swallower.swallowed
    assert sink.types()[tampered_at:] == ["seal.verification_failed"] * 3


def test_a_wrapper_that_never_runs_the_step_fails_the_operation(
    new_manager: Callable[..., VramManager], mock_backend: Any
) -> None:
    class Skipper:
        @hookimpl(wrapper=True)
        def vramcore_operation(self, op: Operation) -> Any:
            if op.name == "verify":
                return None  # returns before yielding: the step never runs
            return (yield)

    manager = new_manager(mock_backend, Skipper(), audit="disabled")
    shard = manager.seal_model(b"z" * 5000)
    with pytest.raises(VramError, match="before the verify step ran"):
        manager.verify_sealed(shard)


def test_verify_sealed_holds_the_shard_while_it_reads(
    new_manager: Callable[..., VramManager], mock_backend: Any
) -> None:
    started, release = threading.Event(), threading.Event()
    order: list[str] = []

    class SlowDigest:
        @hookimpl
        def vramcore_device_digest(
            self, backend: Any, buffer: DeviceBuffer, leaf_size: int, leaf_range: Any
        ) -> Any:
            out = bytearray(buffer.nbytes)
            backend.read_into(buffer, 0, memoryview(out))
            if leaf_range is None and order:  # a verification, not the seal
                started.set()
                release.wait(5)
                order.append("digest done")
            leaves = hash_leaves_packed(out, leaf_size)
            return DeviceDigest(root=merkle_root(leaves), leaves=leaves)

    manager = new_manager(mock_backend, SlowDigest(), audit="disabled")
    shard = manager.seal_model(b"q" * 70_000, shard_id="held")
    order.append("sealed")
    result: list[Any] = []
    verifier = threading.Thread(target=lambda: _catch(result, lambda: manager.verify_sealed(shard)))
    verifier.start()
    assert started.wait(5)
    freer = threading.Thread(target=lambda: (manager.deallocate(shard), order.append("freed")))
    freer.start()
    time.sleep(0.1)
    assert "freed" not in order  # deallocate waits for the verification
    release.set()
    verifier.join(5)
    freer.join(5)
    assert result == [None]
    assert order == ["sealed", "digest done", "freed"]


def test_every_call_after_close_raises_manager_closed(mock_manager: VramManager) -> None:
    shard = mock_manager.seal_model(b"a" * 100)
    mock_manager.close()
    calls: list[Callable[[], Any]] = [
        lambda: mock_manager.seal_model(b"b" * 100),
        lambda: mock_manager.seal_file("/nonexistent"),
        lambda: mock_manager.verify_sealed(shard),
        lambda: mock_manager.deallocate(shard),
        mock_manager.available_vram,
        mock_manager.total_vram,
    ]
    for call in calls:
        with pytest.raises(ManagerClosed):
            call()
    with pytest.raises(ManagerClosed), mock_manager.verified(shard):
        pass
    mock_manager.close()  # idempotent


class Garbage:
    """Answers one hook with something of the wrong type."""

    def __init__(self, hook: str, value: object) -> None:
        self.hook = hook
        self.value = value

    @hookimpl(tryfirst=True)
    def vramcore_probe_devices(self, backend: Any) -> Any:
        return self.value if self.hook == "probe" else None

    @hookimpl
    def vramcore_seal_key(self, worker_id: str) -> Any:
        return self.value if self.hook == "seal_key" else None

    @hookimpl
    def vramcore_audit_sinks(self, context: SinkContext) -> Any:
        return self.value if self.hook == "sinks" else [CapturingSink()]


@pytest.mark.parametrize(
    ("hook", "value", "match"),
    [
        ("probe", "gpu0", "device probe"),
        ("probe", ["not a DeviceInfo"], "device probe"),
        ("seal_key", b"k" * 32, "seal key provider"),
        ("seal_key", 42, "seal key provider"),
        ("sinks", "sink", "vramcore_audit_sinks"),
        ("sinks", [object()], "vramcore_audit_sinks"),
    ],
)
def test_a_hook_returning_garbage_is_a_typed_error_naming_the_plugin_and_wipes_secrets(
    make_plugin_manager: Any, mock_backend: Any, hook: str, value: object, match: str
) -> None:
    plugin = Garbage(hook, value)
    pm = make_plugin_manager(plugin)
    token = WorkerToken(TEST_TOKEN)
    provider = pm.get_name(plugin) if hook == "seal_key" else None  # asked only when named
    with pytest.raises(ConfigError, match=match) as info:
        VramManager(
            token,
            allocator=mock_backend,
            plugin_manager=pm,
            worker_id="w",
            seal_key_provider=provider,
        )
    assert TEST_TOKEN not in str(info.value)
    if hook != "sinks":
        assert "Garbage" in str(info.value)  # the implementing plugin is named
    with pytest.raises(InvalidInput, match="wiped"):
        token.derive(b"anything")
    assert mock_backend.live_allocations == 0


@pytest.mark.parametrize(
    "answer",
    [
        "junk",
        DeviceDigest(root=b"r" * 32, leaves=b"x" * 31),
        DeviceDigest(root=None, leaves=b"x" * 32 * 2),
        DeviceDigest(root=b"r" * 32, leaves=b"x" * 64, first_leaf=1),
    ],
    ids=["not-a-digest", "short-leaves", "no-root", "wrong-first-leaf"],
)
def test_a_device_digest_of_the_wrong_shape_refuses_the_seal_and_leaks_nothing(
    new_manager: Callable[..., VramManager], mock_backend: Any, answer: object
) -> None:
    class Bad:
        @hookimpl(tryfirst=True)
        def vramcore_device_digest(
            self, backend: Any, buffer: Any, leaf_size: int, leaf_range: Any
        ) -> Any:
            return answer

    manager = new_manager(mock_backend, Bad(), audit="disabled")
    with pytest.raises(ConfigError, match="device digest plugin"):
        manager.seal_model(b"d" * (65536 + 1))
    assert mock_backend.live_allocations == 0
    assert manager.used_vram() == 0


def test_seal_file_reads_and_hashes_each_byte_once(
    new_manager: Callable[..., VramManager],
    mock_backend: Any,
    tmp_path: Path,
    pattern: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = pattern(9 * 65536 + 77, 3)
    path = tmp_path / "once.bin"
    path.write_bytes(data)
    manager = new_manager(mock_backend, audit="disabled", chunk_bytes=8 * 65536)
    hashed: list[int] = []
    original = vramcore.digest._hash_span

    def counting(view: memoryview, leaf_size: int, out: memoryview) -> None:
        hashed.append(len(view))
        original(view, leaf_size, out)

    reads: list[int] = []
    read_into = mock_backend.read_into
    monkeypatch.setattr(vramcore.digest, "_hash_span", counting)
    monkeypatch.setattr(
        mock_backend, "read_into", lambda b, o, out: (reads.append(len(out)), read_into(b, o, out))
    )
    shard = manager.seal_file(path)
    # Every staged byte hashed into a leaf exactly once, plus the read-back spot check: at
    # most four leaves of each copy chunk (two chunks: 8 leaves, then 1 and a partial one),
    # hashed from the mock's host view of VRAM, so nothing is copied back.
    spot = sum(hashed) - len(data)
    assert 0 < spot <= (4 + 2) * 65536 and spot % 65536 in (0, 77)
    assert reads == []
    assert shard.file_sha256 is None  # no whole-file SHA-256 unless asked for
    asked = manager.seal_file(path, shard_id="with-sha", compute_sha256=True)
    assert asked.file_sha256 == hashlib.sha256(data).hexdigest()
    assert asked.digest == shard.digest


def test_sampled_verification_catches_a_corrupted_leaf_it_samples(
    new_manager: Callable[..., VramManager], mock_backend: Any, pattern: Any
) -> None:
    sink = CapturingSink()
    manager = new_manager(mock_backend, sink=sink)
    shard = manager.seal_model(pattern(64 * 65536, 5), shard_id="sampled")
    manager.verify_sealed(shard, sample=0.1)
    event = sink.of_type("seal.verified")[-1]
    assert event.mode == "sampled"  # type: ignore[attr-defined]
    assert event.leaves_checked == 7  # type: ignore[attr-defined]
    with manager.verified(shard) as buf:
        mock_backend.flip_bit(buf, 10 * 65536 + 1)
    with pytest.raises(SealVerificationFailed) as info:
        manager.verify_sealed(shard, sample=64)  # every leaf: it must be caught
    assert info.value.corrupted_ranges == ((10 * 65536, 11 * 65536),)
    # A sample of one leaf catches it exactly when it picks leaf 10 (fresh CSPRNG each call).
    caught = 0
    for _ in range(400):
        try:
            manager.verify_sealed(shard, sample=1)
        except SealVerificationFailed:
            caught += 1
    assert 0 < caught < 60  # expected about 400/64 = 6


def test_a_seal_refuses_device_leaves_that_do_not_give_the_device_root(
    new_manager: Callable[..., VramManager], mock_backend: Any, pattern: Any
) -> None:
    class WrongRoot:
        """A device digest whose leaves are right but whose root is of other leaves."""

        @hookimpl(tryfirst=True)
        def vramcore_device_digest(
            self, backend: Any, buffer: DeviceBuffer, leaf_size: int, leaf_range: Any
        ) -> Any:
            out = bytearray(buffer.nbytes)
            backend.read_into(buffer, 0, memoryview(out))
            leaves = hash_leaves_packed(out, leaf_size)
            if leaf_range is not None:
                first, stop = leaf_range
                return DeviceDigest(
                    root=None, leaves=leaves[first * 32 : stop * 32], first_leaf=first
                )
            swapped = leaves[32:64] + leaves[:32] + leaves[64:]
            return DeviceDigest(root=merkle_root(swapped), leaves=leaves)

    manager = new_manager(mock_backend, WrongRoot(), audit="disabled")
    # The first seal compares every leaf and the root (a one-leaf shard has nothing to
    # swap); later seals compare a sample of leaves with the staged bytes, and the root with
    # the tree of the device's own leaves: a root of other leaves is never signed.
    manager.seal_model(b"1", shard_id="warm-up")
    with pytest.raises(IntegrityViolation, match="cross-check"):
        manager.seal_model(pattern(4 * 65536, 6), shard_id="swapped")
    assert "swapped" not in [s.shard_id for s in manager.shards()]


@pytest.mark.parametrize("sample", [0, 0.0, 1.5, -1, True, "all", float("nan")])
def test_bad_sample_values_are_refused(mock_manager: VramManager, sample: object) -> None:
    shard = mock_manager.seal_model(b"s" * 100)
    with pytest.raises(InvalidInput, match="sample"):
        mock_manager.verify_sealed(shard, sample=sample)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"leaf_size": "x"},
        {"leaf_size": 4096.0},
        {"leaf_size": True},
        {"policy": "strict"},
        {"hash_workers": 0},
        {"hash_workers": "2"},
        {"close_timeout": 0},
        {"close_timeout": float("inf")},
        {"audit": "off"},
    ],
)
def test_bad_manager_arguments_are_typed_errors(
    make_plugin_manager: Any, mock_backend: Any, kwargs: dict[str, Any]
) -> None:
    with pytest.raises(InvalidInput):
        VramManager(
            TEST_TOKEN, allocator=mock_backend, plugin_manager=make_plugin_manager(), **kwargs
        )


@pytest.mark.parametrize("path", [123, b"/tmp/x", "/tmp/a\0b", None])
def test_bad_seal_file_paths_are_typed_errors(mock_manager: VramManager, path: object) -> None:
    with pytest.raises(InvalidInput):
        mock_manager.seal_file(path)  # type: ignore[arg-type]


def test_not_resident_and_type_errors_stay_typed(mock_manager: VramManager) -> None:
    with pytest.raises(InvalidInput):
        mock_manager.verify_sealed("shard")  # type: ignore[arg-type]
    shard = mock_manager.seal_model(b"n" * 10)
    mock_manager.deallocate(shard)
    with pytest.raises(NotSealed):
        mock_manager.verify_sealed(shard)


def test_sinks_get_no_token_and_cannot_derive_the_seal_key(
    new_manager: Callable[..., VramManager], mock_backend: Any
) -> None:
    class Curious(AuditSink):
        name = "curious"

        def __init__(self) -> None:
            self.contexts: list[SinkContext] = []

        def emit(self, event: Any) -> None:
            pass

    seen: list[SinkContext] = []

    class Plugin:
        @hookimpl
        def vramcore_audit_sinks(self, context: SinkContext) -> Sequence[AuditSink]:
            seen.append(context)
            return [Curious()]

    manager = new_manager(mock_backend, Plugin())
    (context,) = seen
    seal_key: SecretKey = WorkerToken(TEST_TOKEN).derive(b"vramcore/v1/seal-key")
    shard = manager.seal_model(b"k" * 64)
    # Whatever the sink derives, it cannot sign a seal this manager accepts.
    for purpose in ("seal-key", "vramcore/v1/seal-key", "x"):
        forged_key = context.derive_key(purpose)
        assert forged_key.export() != seal_key.export()
        forged = SealedShard.from_json(
            shard.to_json().replace(
                shard.signature.hex(), forged_key.mac(shard.signed_message()).hex()
            )
        )
        with pytest.raises(SealVerificationFailed):
            manager.verify_sealed(forged)


def test_the_first_seal_refuses_a_device_digest_that_disagrees_with_the_host(
    new_manager: Callable[..., VramManager], mock_backend: Any, pattern: Any
) -> None:
    class Wrong:
        @hookimpl(tryfirst=True)
        def vramcore_device_digest(
            self, backend: Any, buffer: DeviceBuffer, leaf_size: int, leaf_range: Any
        ) -> Any:
            n = -(-buffer.nbytes // leaf_size)
            leaves = b"\x11" * 32 * n  # well-formed, wrong
            return DeviceDigest(root=merkle_root(leaves), leaves=leaves)

    manager = new_manager(mock_backend, Wrong(), audit="disabled")
    with pytest.raises(IntegrityViolation, match="cross-check failed"):
        manager.seal_model(pattern(3 * 65536, 9))
    assert mock_backend.live_allocations == 0
