"""Audit delivery: bounded in time, one ordered thread per sink, any sink failure contained."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from vramcore.audit import AuditSink, SinkTimeout
from vramcore.errors import AuditError
from vramcore.events import AuditEvent
from vramcore.manager import VramManager
from vramcore.testing import CapturePlugin, CapturingSink


class BlockingSink(AuditSink):
    """Blocks on the chosen event types until released (a hung mount, a full pipe)."""

    name = "blocking"

    def __init__(self, block_on: set[str]) -> None:
        self.block_on = block_on
        self.release = threading.Event()
        self.seen: list[str] = []

    def emit(self, event: AuditEvent) -> None:
        if event.event_type in self.block_on:
            self.release.wait(30)
        self.seen.append(event.event_type)


def test_a_sink_blocking_on_a_critical_event_fails_the_operation_in_bounded_time(
    new_manager: Callable[..., VramManager], mock_backend: Any
) -> None:
    sink = BlockingSink({"vram.sealed"})
    manager = new_manager(mock_backend, sink=sink, audit_timeout=0.2)
    started = time.monotonic()
    with pytest.raises(AuditError, match=r"could not record critical event vram\.sealed") as info:
        manager.seal_model(b"x" * 1000, shard_id="hung")
    assert time.monotonic() - started < 5
    assert isinstance(info.value.__cause__, SinkTimeout)
    assert mock_backend.live_allocations == 0  # the seal was undone
    # While the sink is still stuck, later events fail quickly instead of queueing.
    started = time.monotonic()
    with pytest.raises(AuditError):
        manager.seal_model(b"y" * 1000, shard_id="after")
    assert time.monotonic() - started < 1
    sink.release.set()


def test_a_sink_blocking_on_a_non_critical_event_does_not_stop_the_operation(
    new_manager: Callable[..., VramManager], mock_backend: Any
) -> None:
    sink = BlockingSink({"vram.allocated"})
    other = CapturingSink()
    failures: list[str] = []

    class Reporter:
        from vramcore import hookimpl

        @hookimpl
        def vramcore_audit_failure(self, sink_name: str, event: AuditEvent, error: Any) -> None:
            failures.append(f"{sink_name}:{event.event_type}:{type(error).__name__}")

    # A second, healthy sink, delivered to after the blocking one.
    manager = new_manager(
        mock_backend, CapturePlugin(other), Reporter(), sink=sink, audit_timeout=0.2
    )
    with pytest.raises(AuditError):
        # vram.allocated times out (reported, not fatal); the critical vram.sealed then
        # fails fast because the sink is still stuck: fail closed.
        manager.seal_model(b"z" * 1000)
    assert failures[0] == "blocking:vram.allocated:SinkTimeout"
    sink.release.set()


class ExitingSink(AuditSink):
    name = "exiting"

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def emit(self, event: AuditEvent) -> None:
        if event.critical:
            raise self.exc


@pytest.mark.parametrize("exc", [SystemExit(3), KeyboardInterrupt(), GeneratorExit()])
def test_a_sink_raising_base_exceptions_fails_closed_and_the_process_lives(
    new_manager: Callable[..., VramManager], mock_backend: Any, exc: BaseException
) -> None:
    manager = new_manager(mock_backend, sink=ExitingSink(exc))
    with pytest.raises(AuditError, match="exiting"):
        manager.seal_model(b"e" * 100)
    assert mock_backend.live_allocations == 0


def test_each_sink_gets_its_events_in_order_from_one_thread(
    new_manager: Callable[..., VramManager], mock_backend: Any
) -> None:
    class ThreadRecorder(CapturingSink):
        def __init__(self) -> None:
            super().__init__()
            self.threads: set[int] = set()

        def emit(self, event: AuditEvent) -> None:
            self.threads.add(threading.get_ident())
            super().emit(event)

    sink = ThreadRecorder()
    manager = new_manager(mock_backend, sink=sink)
    workers = [
        threading.Thread(target=lambda i=i: manager.seal_model(b"o" * 100, shard_id=f"o{i}"))
        for i in range(8)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(sink.threads) == 1
    assert threading.get_ident() not in sink.threads
    assert sink.types().count("vram.sealed") == 8


def test_a_sink_that_hangs_on_close_does_not_hang_the_manager(
    make_plugin_manager: Any, mock_backend: Any
) -> None:
    from vramcore.testing import TEST_TOKEN, CapturePlugin

    class HangsOnClose(CapturingSink):
        def close(self) -> None:
            time.sleep(30)

    manager = VramManager(
        TEST_TOKEN,
        allocator=mock_backend,
        plugin_manager=make_plugin_manager(CapturePlugin(HangsOnClose())),
        audit_timeout=0.2,
    )
    started = time.monotonic()
    with pytest.raises(AuditError, match="closing the manager"):
        manager.close()
    assert time.monotonic() - started < 5


# -- emit_nowait: the inline fast path for sinks that can record without waiting ----------


class NowaitSink(CapturingSink):
    """Takes non-critical events inline (``accept``), records which path and thread each event
    took, and notices two calls into it at once. ``gate`` holds critical events in ``emit``."""

    name = "nowait"

    def __init__(self, *, accept: bool = True, fail: bool = False) -> None:
        super().__init__()
        self.accept = accept
        self.fail = fail
        self.paths: list[tuple[str, str, int]] = []  # (path, event_type, thread)
        self.gate = threading.Event()
        self.gate.set()
        self.in_emit = threading.Event()
        self._inside = 0
        self.overlapped = False

    def _enter(self) -> None:
        self._inside += 1
        if self._inside > 1:
            self.overlapped = True

    def emit(self, event: AuditEvent) -> None:
        self._enter()
        try:
            if event.critical:
                self.in_emit.set()
                self.gate.wait(30)
            self.paths.append(("emit", event.event_type, threading.get_ident()))
            super().emit(event)
        finally:
            self._inside -= 1

    def emit_nowait(self, event: AuditEvent) -> bool:
        self._enter()
        try:
            if self.fail:
                raise OSError("the sink broke")
            if not self.accept:
                return False
            time.sleep(0.001)  # long enough for an overlapping call to show
            self.paths.append(("nowait", event.event_type, threading.get_ident()))
            super().emit(event)
            return True
        finally:
            self._inside -= 1


def test_non_critical_events_go_inline_and_critical_ones_through_the_delivery_thread(
    new_manager: Callable[..., VramManager], mock_backend: Any
) -> None:
    sink = NowaitSink()
    manager = new_manager(mock_backend, sink=sink)
    shard = manager.seal_model(b"n" * 1000, shard_id="inline")
    manager.verify_sealed(shard)
    with manager.verified(shard):
        pass
    manager.deallocate(shard)
    me = threading.get_ident()
    assert [(path, kind) for path, kind, _ in sink.paths] == [
        ("nowait", "vram.allocated"),
        ("emit", "vram.sealed"),
        ("nowait", "seal.verified"),
        ("nowait", "seal.verified"),
        ("nowait", "vram.deallocated"),
    ]
    assert all((thread == me) == (path == "nowait") for path, _, thread in sink.paths)
    assert sink.types() == [kind for _, kind, _ in sink.paths]  # each event once, in order


def test_an_event_the_sink_declines_inline_goes_through_the_delivery_thread_once(
    new_manager: Callable[..., VramManager], mock_backend: Any
) -> None:
    sink = NowaitSink(accept=False)
    manager = new_manager(mock_backend, sink=sink)
    manager.verify_sealed(manager.seal_model(b"d" * 1000))
    assert [path for path, _, _ in sink.paths] == ["emit"] * 3
    assert sink.types() == ["vram.allocated", "vram.sealed", "seal.verified"]
    assert threading.get_ident() not in {thread for _, _, thread in sink.paths}


def test_no_event_goes_inline_while_the_delivery_thread_has_one(
    new_manager: Callable[..., VramManager], mock_backend: Any
) -> None:
    sink = NowaitSink()
    manager = new_manager(mock_backend, sink=sink)
    shard = manager.seal_model(b"a" * 1000, shard_id="first")
    sink.gate.clear()
    sink.in_emit.clear()
    sealing = threading.Thread(target=lambda: manager.seal_model(b"b" * 1000, shard_id="second"))
    sealing.start()
    assert sink.in_emit.wait(10)  # the delivery thread is inside emit(vram.sealed)
    threading.Timer(0.3, sink.gate.set).start()
    manager.verify_sealed(shard)  # waits behind it, on the delivery thread
    sealing.join(10)
    assert not sink.overlapped
    last = [(path, kind) for path, kind, _ in sink.paths][-2:]
    assert last == [("emit", "vram.sealed"), ("emit", "seal.verified")]


def test_an_inline_failure_is_reported_like_any_sink_failure(
    new_manager: Callable[..., VramManager], mock_backend: Any
) -> None:
    from vramcore import hookimpl

    failures: list[str] = []

    class Reporter:
        @hookimpl
        def vramcore_audit_failure(self, sink_name: str, event: AuditEvent, error: Any) -> None:
            failures.append(f"{sink_name}:{event.event_type}:{type(error).__name__}")

    sink = NowaitSink(fail=True)
    manager = new_manager(mock_backend, Reporter(), sink=sink)
    manager.verify_sealed(manager.seal_model(b"f" * 1000))  # non-critical: reported, goes on
    assert failures == ["nowait:vram.allocated:OSError", "nowait:seal.verified:OSError"]
    assert sink.types() == ["vram.sealed"]
