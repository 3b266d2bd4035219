"""The conformance suite every audit sink passes: :class:`AuditSinkContract`."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest

from vramcore.audit import AuditSink, SinkContext
from vramcore.errors import AuditError, VramError
from vramcore.events import AuditEvent
from vramcore.hookspecs import hookimpl
from vramcore.plugins import get_plugin_manager
from vramcore.testing._bounded import BoundedCall, run_bounded
from vramcore.testing._events import sample_events
from vramcore.testing._faults import DiskFault
from vramcore.testing._fixtures import TEST_TOKEN, require_mock
from vramcore.testing._secrets import SecretScan
from vramcore.testing._sinks import CapturePlugin, CapturingSink

__all__ = ["AuditSinkContract", "SinkPlugin"]

#: What ``make_sink`` is: the sink under test, built for a context the core made.
SinkFactory = Callable[[SinkContext], AuditSink]
#: What ``read_back`` is: the events a sink stored, oldest first, read from its storage.
ReadBack = Callable[[AuditSink], Sequence[Mapping[str, Any]]]

_NOT_DURABLE = "the sink says it is not durable (durable=False): it promises no lasting record"


class SinkPlugin:
    """A plugin object whose ``vramcore_audit_sinks`` builds sinks with ``make_sink``.

    It keeps each context it was handed and each sink it built, so a test can inspect them.
    """

    def __init__(self, make_sink: SinkFactory) -> None:
        self.make_sink = make_sink
        self.contexts: list[SinkContext] = []
        self.sinks: list[AuditSink] = []

    @hookimpl
    def vramcore_audit_sinks(self, context: SinkContext) -> Sequence[AuditSink]:
        """Build one sink for this manager."""
        sink = self.make_sink(context)
        self.contexts.append(context)
        self.sinks.append(sink)
        return [sink]


class _Workbench:
    """One manager on the mock, delivering to the sink under test and to a capturing sink."""

    def __init__(self, make_sink: SinkFactory, *, audit_timeout: float | None = None) -> None:
        from vramcore.manager import VramManager

        mock = require_mock()
        self.backend = mock.MockBackend(capacity=64 << 20)
        self.plugin = SinkPlugin(make_sink)
        self.reference = CapturingSink()
        pm = get_plugin_manager(
            [mock, self.plugin, CapturePlugin(self.reference)], load_entrypoints=False, env={}
        )
        options: dict[str, Any] = {} if audit_timeout is None else {"audit_timeout": audit_timeout}
        self.manager = VramManager(
            TEST_TOKEN,
            allocator=self.backend,
            plugin_manager=pm,
            worker_id="contract",
            **options,
        )
        assert len(self.plugin.sinks) == 1, "the manager did not ask the plugin for its sink"

    @property
    def sink(self) -> AuditSink:
        """The sink under test, as the manager built it."""
        return self.plugin.sinks[0]

    def close(self) -> None:
        """Close the manager (and with it the sinks); errors of a broken sink are ignored."""
        with contextlib.suppress(VramError):
            self.manager.close()


def _matches(recorded: object, event: AuditEvent) -> str | None:
    """Why ``recorded`` is not ``event`` (``None`` when it is)."""
    if not isinstance(recorded, Mapping):
        return f"read_back gave a {type(recorded).__name__}, not a mapping"
    expected = event.to_dict()
    if recorded.get("event_type") != event.event_type:
        return f"event_type {recorded.get('event_type')!r:.60}, expected {event.event_type!r}"
    for key in expected.keys() & recorded.keys():
        if recorded[key] != expected[key]:
            return f"{event.event_type}.{key} is {recorded[key]!r:.80}, expected {expected[key]!r}"
    return None


def _assert_same_events(recorded: Sequence[Mapping[str, Any]], sent: Sequence[AuditEvent]) -> None:
    assert len(recorded) == len(sent), (
        f"the sink stored {len(recorded)} events, {len(sent)} were emitted"
    )
    for i, (got, event) in enumerate(zip(recorded, sent, strict=True)):
        problem = _matches(got, event)
        assert problem is None, f"event {i}: {problem} (events out of order or changed)"


class AuditSinkContract:
    """The conformance suite every audit sink passes (like keyring's backend tests).

    A sink's test module subclasses it (the class name must start with ``Test``) and supplies
    two fixtures: ``make_sink``, a callable that builds a fresh sink (over fresh storage) from
    the :class:`~vramcore.SinkContext` the core hands a plugin, and ``read_back``, a callable
    that returns what a sink stored, oldest first, as event dicts
    (:meth:`~vramcore.events.AuditEvent.to_dict` form, with ``event_type``; a sink that keeps
    fewer fields returns those it keeps)::

        import pytest
        from vramcore.testing import AuditSinkContract
        from my_sink import MySink, read_my_log

        class TestMySink(AuditSinkContract):
            @pytest.fixture
            def make_sink(self, tmp_path):
                return lambda context: MySink(tmp_path / "log", context)

            @pytest.fixture
            def read_back(self, tmp_path):
                return lambda sink: list(read_my_log(tmp_path / "log"))

    ``read_back`` must read from where the sink stores events (its file, its exporter), never
    from the sink object's memory: the durability checks rely on it. Optional fixtures:

    ``break_storage``
        A callable ``(sink) -> None`` after which the sink's storage fails. Default: this
        process's ``os.write``/``os.fsync``/``os.fdatasync`` raise ``ENOSPC`` (a full disk);
        override it for a sink that stores elsewhere. ``None`` for a sink with no storage
        that can fail (allowed only when ``durable`` is ``False``).
    ``block_storage``
        A callable ``(sink) -> release`` after which the storage hangs until ``release()``
        is called. Default: the same calls block.

    What it checks: ``name`` is a non-empty string and ``durable`` a bool; every event
    arrives, in order and unchanged, when emitted from a thread other than the one that
    built the sink (the core's delivery thread), one of each kind and a long stream; through
    a real manager too. An honest durability flag: a durable sink has a critical event in
    storage when ``emit`` returns and every event after ``flush()``, without ``close()``
    (a crash right then loses nothing acknowledged). Fail closed: a durable sink whose storage
    fails raises on a critical event, and the core then refuses the operation (the seal is
    refused with :class:`~vramcore.errors.AuditError` and its memory freed). A sink whose
    storage hangs is cut off by the core's ``audit_timeout`` (the operation fails instead of
    hanging) and the manager still closes. Nothing secret: neither the worker token nor the
    seal key (raw, hex or base64) is in any event, the context, the sink's ``report()`` or
    anything reachable from the context or the sink. ``close()`` twice is safe. After
    ``close()``: ``emit`` and ``flush`` return or raise an ``Exception`` without hanging, and
    a durable sink raises on ``emit`` and stores nothing more. ``report()`` is ``None`` or a
    JSON-ready mapping.

    The suite starts managers on the mock backend (install ``vramcore-allocator-mock``).
    """

    #: Seconds any single sink call may block before the suite reports a hang.
    hang_timeout: float = 60.0
    #: The core's per-event audit timeout in the blocking-storage test.
    audit_timeout: float = 0.5

    # -- fixtures a subclass supplies or overrides ----------------------------------------

    @pytest.fixture
    def make_sink(self) -> SinkFactory:
        """Builds the sink under test from a context: override this fixture."""
        raise NotImplementedError(
            f"{type(self).__name__} must define a `make_sink` fixture: a callable "
            "(context) -> a fresh sink over fresh storage"
        )

    @pytest.fixture
    def read_back(self) -> ReadBack:
        """Reads back what a sink stored: override this fixture."""
        raise NotImplementedError(
            f"{type(self).__name__} must define a `read_back` fixture: a callable "
            "(sink) -> the stored events as dicts, oldest first"
        )

    @pytest.fixture
    def disk_fault(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[DiskFault]:
        """The default storage fault (released after the test)."""
        fault = DiskFault(monkeypatch)
        yield fault
        fault.release()

    @pytest.fixture
    def break_storage(self, disk_fault: DiskFault) -> Callable[[AuditSink], None] | None:
        """Makes a sink's storage fail (default: a full disk)."""
        return disk_fault.fail

    @pytest.fixture
    def block_storage(
        self, disk_fault: DiskFault
    ) -> Callable[[AuditSink], Callable[[], None]] | None:
        """Makes a sink's storage hang until released (default: a disk that hangs)."""
        return disk_fault.block

    @pytest.fixture
    def sink_context(self) -> Iterator[SinkContext]:
        """A context made by the core for a plugin (its manager stays open for the test)."""
        capture = CapturePlugin(CapturingSink())
        pm = get_plugin_manager([require_mock(), capture], load_entrypoints=False, env={})
        from vramcore.manager import VramManager

        with VramManager(TEST_TOKEN, allocator="mock", plugin_manager=pm, worker_id="contract"):
            yield capture.contexts[0]

    @pytest.fixture
    def sink(self, make_sink: SinkFactory, sink_context: SinkContext) -> Iterator[AuditSink]:
        """The sink under test, closed after the test (a second close is part of the deal)."""
        sink = make_sink(sink_context)
        assert isinstance(sink, AuditSink), (
            f"make_sink returned a {type(sink).__name__}, not an AuditSink"
        )
        sink.attach_witnesses(())
        yield sink
        with contextlib.suppress(Exception):
            run_bounded(sink.close, "close() at teardown", self.hang_timeout)

    # -- helpers -------------------------------------------------------------------------

    def _emit_all(self, sink: AuditSink, events: Sequence[AuditEvent]) -> None:
        def emit_every_event() -> None:
            for event in events:
                sink.emit(event)

        run_bounded(emit_every_event, "emit() from the delivery thread", self.hang_timeout)

    def _read(self, read_back: ReadBack, sink: AuditSink) -> list[Mapping[str, Any]]:
        return list(run_bounded(lambda: read_back(sink), "read_back", self.hang_timeout))

    @staticmethod
    def _require_durable(sink: AuditSink) -> None:
        if not sink.durable:
            pytest.skip(_NOT_DURABLE)

    # -- declarations ----------------------------------------------------------------------

    def test_name_and_durable_are_declared(self, sink: AuditSink) -> None:
        """``name`` is a non-empty string; ``durable`` is exactly ``True`` or ``False``."""
        assert isinstance(sink.name, str)
        assert sink.name.strip()
        assert isinstance(sink.durable, bool), "durable must be a bool, not merely truthy"

    # -- every event, in order -------------------------------------------------------------

    def test_every_kind_of_event_arrives_unchanged(
        self, sink: AuditSink, read_back: ReadBack
    ) -> None:
        """One event of every kind, emitted from another thread, is stored as it was."""
        events = sample_events()
        self._emit_all(sink, events)
        run_bounded(sink.close, "close()", self.hang_timeout)
        _assert_same_events(self._read(read_back, sink), events)

    def test_a_stream_of_events_arrives_in_order(
        self, sink: AuditSink, read_back: ReadBack
    ) -> None:
        """A stream of 200 events (some critical) is stored complete and in order."""
        events = sample_events(200)
        self._emit_all(sink, events)
        run_bounded(sink.close, "close()", self.hang_timeout)
        _assert_same_events(self._read(read_back, sink), events)

    def test_events_recorded_without_waiting_arrive_in_order(
        self, sink: AuditSink, read_back: ReadBack
    ) -> None:
        """Non-critical events offered to ``emit_nowait`` (then to ``emit`` when it declines,
        as the core does) are stored complete and in order; it answers exactly ``True`` or
        ``False`` (a sink without the fast path declines them all)."""
        events = [e for e in sample_events(60) if not e.critical]

        def offer_every_event() -> None:
            for event in events:
                taken = sink.emit_nowait(event)
                assert isinstance(taken, bool), "emit_nowait must return a bool"
                if not taken:
                    sink.emit(event)

        run_bounded(offer_every_event, "emit_nowait() from the caller", self.hang_timeout)
        run_bounded(sink.close, "close()", self.hang_timeout)
        _assert_same_events(self._read(read_back, sink), events)

    def test_events_from_a_manager_arrive_in_order(
        self, make_sink: SinkFactory, read_back: ReadBack
    ) -> None:
        """What a manager emits (seal, verify, refused seal, deallocate) arrives in order."""
        bench = _Workbench(make_sink)
        try:
            shard = bench.manager.seal_model(b"weights" * 5000, shard_id="contract-a")
            bench.manager.verify_sealed(shard)
            with pytest.raises(VramError):
                bench.manager.seal_model(b"other", shard_id="contract-b", expected_sha256="0" * 64)
            bench.manager.deallocate(shard)
        finally:
            bench.close()
        sent = bench.reference.events
        assert len(sent) >= 5
        _assert_same_events(self._read(read_back, bench.sink), sent)

    # -- an honest durability flag -----------------------------------------------------------

    def test_a_critical_event_is_stored_when_emit_returns(
        self, sink: AuditSink, read_back: ReadBack
    ) -> None:
        """A durable sink has a critical event in storage when ``emit`` returns (no flush,
        no close: a crash right then must not lose it)."""
        self._require_durable(sink)
        events = sample_events(4)
        assert events[3].critical
        self._emit_all(sink, events)
        stored = self._read(read_back, sink)
        assert stored, "nothing is in storage after a critical event was acknowledged"
        _assert_same_events(stored[-1:], events[-1:])

    def test_flush_stores_every_event(self, sink: AuditSink, read_back: ReadBack) -> None:
        """After ``flush()`` a durable sink has every event emitted so far in storage."""
        self._require_durable(sink)
        events = sample_events(30)
        self._emit_all(sink, events)
        run_bounded(sink.flush, "flush()", self.hang_timeout)
        _assert_same_events(self._read(read_back, sink), events)

    # -- fail closed -------------------------------------------------------------------------

    def _breaker(
        self, sink: AuditSink, break_storage: Callable[[AuditSink], None] | None
    ) -> Callable[[AuditSink], None]:
        self._require_durable(sink)
        assert break_storage is not None, (
            "a durable sink must say how its storage fails (the break_storage fixture)"
        )
        return break_storage

    def test_a_critical_event_it_cannot_store_raises(
        self, sink: AuditSink, break_storage: Callable[[AuditSink], None] | None
    ) -> None:
        """A durable sink whose storage fails raises on a critical event: it never
        acknowledges what it could not keep."""
        breaker = self._breaker(sink, break_storage)
        self._emit_all(sink, sample_events(3))
        breaker(sink)
        critical = sample_events(4)[3]
        with pytest.raises(Exception):  # noqa: B017, PT011 - any exception is a refusal
            run_bounded(lambda: sink.emit(critical), "emit() on failed storage", self.hang_timeout)

    def test_the_core_refuses_an_operation_the_sink_cannot_record(
        self, make_sink: SinkFactory, break_storage: Callable[[AuditSink], None] | None
    ) -> None:
        """With the sink's storage failing, a seal (a critical event) is refused with
        ``AuditError`` and its memory freed (fail closed)."""
        bench = _Workbench(make_sink)
        try:
            breaker = self._breaker(bench.sink, break_storage)
            bench.manager.seal_model(b"first" * 1000, shard_id="contract-ok")
            used = bench.manager.used_vram()
            breaker(bench.sink)
            with pytest.raises(AuditError):
                bench.manager.seal_model(b"second" * 1000, shard_id="contract-refused")
            assert bench.manager.used_vram() == used, "a refused seal left memory allocated"
        finally:
            bench.close()

    def test_a_hung_sink_is_cut_off_by_the_core_timeout(
        self,
        make_sink: SinkFactory,
        block_storage: Callable[[AuditSink], Callable[[], None]] | None,
    ) -> None:
        """With the sink's storage hanging, a seal fails with ``AuditError`` after the
        manager's ``audit_timeout`` instead of hanging, and the manager still closes."""
        bench = _Workbench(make_sink, audit_timeout=self.audit_timeout)
        release: Callable[[], None] | None = None
        try:
            self._require_durable(bench.sink)
            assert block_storage is not None, (
                "a durable sink must say how its storage hangs (the block_storage fixture)"
            )
            release = block_storage(bench.sink)
            seal = BoundedCall(
                lambda: bench.manager.seal_model(b"hung" * 1000, shard_id="contract-hung"),
                "seal_model() with a hung sink",
            ).start()
            assert seal.finished_within(self.hang_timeout), (
                "a sink whose storage hangs hung the operation past the core's timeout"
            )
            assert isinstance(seal.error, AuditError), (
                f"a seal the sink never recorded ended with {seal.error!r}, not AuditError"
            )
        finally:
            if release is not None:
                release()
            run_bounded(bench.close, "close() after a hung sink", self.hang_timeout)

    # -- nothing secret ------------------------------------------------------------------------

    def test_nothing_secret_reaches_the_sink(
        self, make_sink: SinkFactory, read_back: ReadBack
    ) -> None:
        """Neither the worker token nor the seal key is in the events, the context, the
        report, what the sink stored, or anything reachable from the context or the sink."""
        scan = SecretScan(TEST_TOKEN)
        bench = _Workbench(make_sink)
        try:
            shard = bench.manager.seal_model(b"secret-free" * 3000, shard_id="contract-s")
            bench.manager.verify_sealed(shard)
            bench.manager.deallocate(shard)
            reachable = scan.in_objects([bench.plugin.contexts[0], bench.sink])
        finally:
            bench.close()
        assert reachable == [], f"reachable from the sink or its context: {reachable}"
        assert scan.objects_seen > 1
        for event in bench.reference.events:
            assert scan.in_text(event.to_json()) == [], f"{event.event_type} carries a secret"
        context = bench.plugin.contexts[0]
        assert scan.in_text(repr(context) + str(context)) == []
        stored = json.dumps(self._read(read_back, bench.sink), default=repr)
        assert scan.in_text(stored) == [], "what the sink stored carries a secret"
        report = bench.sink.report()
        assert scan.in_text(json.dumps(report, default=repr)) == [], "report() shows a secret"

    # -- close -------------------------------------------------------------------------------

    def test_close_twice_is_safe(self, sink: AuditSink) -> None:
        """A second ``close()`` returns without raising."""
        self._emit_all(sink, sample_events(3))
        run_bounded(sink.close, "close()", self.hang_timeout)
        run_bounded(sink.close, "a second close()", self.hang_timeout)

    def test_after_close_nothing_hangs_and_nothing_more_is_stored(
        self, sink: AuditSink, read_back: ReadBack
    ) -> None:
        """After ``close()``, ``emit`` and ``flush`` return or raise an ``Exception``
        without hanging; a durable sink raises on ``emit`` and stores nothing more."""
        self._emit_all(sink, sample_events(3))
        run_bounded(sink.close, "close()", self.hang_timeout)
        before = self._read(read_back, sink)
        late = sample_events(4)[3]
        emit = BoundedCall(lambda: sink.emit(late), "emit() after close()").start()
        assert emit.finished_within(self.hang_timeout), "emit() after close() hangs"
        flush = BoundedCall(sink.flush, "flush() after close()").start()
        assert flush.finished_within(self.hang_timeout), "flush() after close() hangs"
        for call in (emit, flush):
            assert call.error is None or isinstance(call.error, Exception), (
                f"{call.what} raised {type(call.error).__name__}, which is not an Exception"
            )
        if sink.durable:
            assert emit.error is not None, (
                "a durable sink acknowledged an event after close(): it cannot have kept it"
            )
            assert self._read(read_back, sink) == before, "the sink stored an event after close"

    def test_report_is_json_ready(self, sink: AuditSink) -> None:
        """``report()`` after ``close()`` is ``None`` or a mapping ``json.dumps`` accepts."""
        self._emit_all(sink, sample_events(3))
        run_bounded(sink.close, "close()", self.hang_timeout)
        report = sink.report()
        if report is not None:
            assert isinstance(report, Mapping)
            json.dumps(dict(report))
