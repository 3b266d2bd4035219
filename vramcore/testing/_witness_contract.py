"""The conformance suite every audit witness passes: :class:`WitnessContract`."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vramcore._heads import Head
from vramcore.audit import AuditWitness
from vramcore.testing._bounded import BoundedCall, run_bounded
from vramcore.testing._faults import DiskFault

__all__ = ["HeadSigner", "WitnessContract"]

#: What ``make_witness`` is: a new witness over the test's storage (the same on every call).
WitnessFactory = Callable[[], AuditWitness]
#: What ``make_head`` is: a well-formed, signed head of log ``log_id`` at record ``seq``.
HeadFactory = Callable[[str, int], Mapping[str, Any]]


class HeadSigner:
    """Signs chain heads (the wire format of :mod:`vramcore._heads`) with a checkpoint key of
    its own, as the audit chain's writer does: what :class:`WitnessContract` publishes."""

    def __init__(self) -> None:
        self._key = Ed25519PrivateKey.generate()
        self.public_key = self._key.public_key().public_bytes_raw().hex()

    def head(self, log_id: str, seq: int) -> Mapping[str, Any]:
        """A signed head of log ``log_id`` (32 lowercase hex characters) at record ``seq``."""
        mac = hashlib.sha256(f"{log_id}/{seq}".encode()).hexdigest()
        return Head.build(
            self._key.sign,
            log_id=log_id,
            seq=seq,
            epoch=seq // 10,
            mac=mac,
            segment=hashlib.sha256(mac.encode()).hexdigest(),
            ts="2026-01-01T00:00:00.000000Z",
            reason="critical",
            public_key=self.public_key,
        ).to_dict()


_NO_READBACK = "the witness cannot read heads back (it does not override AuditWitness.latest)"


class WitnessContract:
    """The conformance suite every audit witness passes (like keyring's backend tests).

    A witness's test module subclasses it (the class name must start with ``Test``) and
    supplies a ``make_witness`` fixture: a callable that opens a witness over the test's
    storage (each call a new witness over the *same* storage, as a restarted worker would).
    The heads it publishes come from ``make_head``, a callable ``(log_id, seq)`` giving a
    signed head of that log at that record; the default signs heads of the audit chain's wire
    format (see its FORMAT.md, *Heads*) with one checkpoint key per test (:class:`HeadSigner`)::

        import pytest
        from vramcore.testing import WitnessContract
        from my_witness import MyWitness

        class TestMyWitness(WitnessContract):
            @pytest.fixture
            def make_witness(self, tmp_path):
                return lambda: MyWitness(tmp_path / "heads")

    Optional fixtures: ``make_head`` (see above); ``new_log_id`` (a callable giving a fresh
    log id; default 32 random lowercase hex characters, the chain's form); ``break_storage``
    (a callable ``(witness) -> None`` after which the witness's storage fails; default: this
    process's ``os.write``/``os.fsync``/``os.fdatasync`` raise ``ENOSPC``);
    ``corrupt_storage`` (a callable ``() -> None`` that writes garbage into the storage the
    way a crash or an intruder would; default ``None``: that test is skipped).

    What it checks: ``name`` is a non-empty string and ``required`` a bool. Round trip: heads
    of several logs, published interleaved, come back per log id (``latest`` gives each log's
    newest head, equal to what was published, and ``None`` for a log it never saw); from a
    new witness over the same storage too (durability: heads outlive the witness object).
    ``publish`` is thread-safe (eight threads at once lose and mix up nothing). ``close()``
    twice is safe; after it, calls return or raise an ``Exception`` without hanging, and a
    required witness refuses ``publish``. Failed storage: a required witness raises (the
    sink then fails closed). Garbage: a malformed head (missing members, values that are not
    JSON, text with line breaks that spell a forged head of another log, huge values)
    is refused (``publish`` raises) or harmless: it never hangs, never changes what
    ``latest`` gives for another log, and ``latest`` of a malformed log id gives ``None`` or
    raises. Corrupt storage: ``latest`` still gives the newest intact head, ``None``, or
    raises an ``Exception``; it never gives another log's head.

    A witness that cannot read back (``latest`` not overridden) skips the read-back parts,
    saying so.
    """

    #: Seconds any single witness call may block before the suite reports a hang.
    hang_timeout: float = 60.0

    # -- fixtures a subclass supplies or overrides ----------------------------------------

    @pytest.fixture
    def make_witness(self) -> WitnessFactory:
        """Opens the witness under test over the test's storage: override this fixture."""
        raise NotImplementedError(
            f"{type(self).__name__} must define a `make_witness` fixture: a callable "
            "() -> a witness over the test's storage"
        )

    @pytest.fixture
    def make_head(self) -> HeadFactory:
        """Makes a signed head of the chain's wire format (one checkpoint key per test)."""
        return HeadSigner().head

    @pytest.fixture
    def new_log_id(self) -> Callable[[], str]:
        """A fresh log id (32 random lowercase hex characters)."""
        return lambda: secrets.token_hex(16)

    @pytest.fixture
    def disk_fault(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[DiskFault]:
        """The default storage fault (released after the test)."""
        fault = DiskFault(monkeypatch)
        yield fault
        fault.release()

    @pytest.fixture
    def break_storage(self, disk_fault: DiskFault) -> Callable[[AuditWitness], None] | None:
        """Makes a witness's storage fail (default: a full disk)."""
        return disk_fault.fail

    @pytest.fixture
    def corrupt_storage(self) -> Callable[[], None] | None:
        """Writes garbage into the witness's storage (default: none, the test is skipped)."""
        return None

    @pytest.fixture
    def witness(self, make_witness: WitnessFactory) -> Iterator[AuditWitness]:
        """The witness under test, closed after the test."""
        witness = self._open(make_witness)
        yield witness
        with contextlib.suppress(Exception):
            run_bounded(witness.close, "close() at teardown", self.hang_timeout)

    # -- helpers -------------------------------------------------------------------------

    def _open(self, make_witness: WitnessFactory) -> AuditWitness:
        witness = run_bounded(make_witness, "make_witness()", self.hang_timeout)
        assert isinstance(witness, AuditWitness), (
            f"make_witness returned a {type(witness).__name__}, not an AuditWitness"
        )
        return witness

    def _publish(self, witness: AuditWitness, head: Mapping[str, Any]) -> None:
        run_bounded(lambda: witness.publish(head), "publish()", self.hang_timeout)

    def _latest(self, witness: AuditWitness, log_id: str) -> Mapping[str, Any] | None:
        latest: Mapping[str, Any] | None = run_bounded(
            lambda: witness.latest(log_id), "latest()", self.hang_timeout
        )
        return latest

    @staticmethod
    def _require_readback(witness: AuditWitness) -> None:
        if type(witness).latest is AuditWitness.latest:
            pytest.skip(_NO_READBACK)

    def _assert_latest(
        self, witness: AuditWitness, log_id: str, expected: Mapping[str, Any] | None, what: str
    ) -> None:
        got = self._latest(witness, log_id)
        if expected is None:
            assert got is None, f"{what}: latest() of a log it never saw gave a head"
            return
        assert got is not None, f"{what}: latest() lost the log's heads"
        assert dict(got) == dict(expected), (
            f"{what}: latest() gave seq {got.get('seq')!r:.20} of log "
            f"{str(got.get('log_id'))[:40]!r}, expected seq {expected.get('seq')!r} of "
            f"{str(expected.get('log_id'))[:40]!r}"
        )

    # -- declarations ----------------------------------------------------------------------

    def test_name_and_required_are_declared(self, witness: AuditWitness) -> None:
        """``name`` is a non-empty string; ``required`` is exactly ``True`` or ``False``."""
        assert isinstance(witness.name, str)
        assert witness.name.strip()
        assert isinstance(witness.required, bool), "required must be a bool, not merely truthy"

    # -- round trip and durability ---------------------------------------------------------

    def test_latest_gives_each_logs_newest_head(
        self, witness: AuditWitness, make_head: HeadFactory, new_log_id: Callable[[], str]
    ) -> None:
        """Heads of two logs, published interleaved, come back per log id; a log it never
        saw gives ``None``."""
        self._require_readback(witness)
        a, b = new_log_id(), new_log_id()
        heads = [make_head(a, 1), make_head(b, 1), make_head(a, 2), make_head(b, 5)]
        heads.append(make_head(a, 3))
        for head in heads:
            self._publish(witness, head)
        self._assert_latest(witness, a, heads[4], "log A")
        self._assert_latest(witness, b, heads[3], "log B")
        self._assert_latest(witness, new_log_id(), None, "an unknown log")

    def test_heads_outlive_the_witness(
        self, make_witness: WitnessFactory, make_head: HeadFactory, new_log_id: Callable[[], str]
    ) -> None:
        """A new witness over the same storage (a restarted worker) gives the newest head
        the closed one was given."""
        first = self._open(make_witness)
        self._require_readback(first)
        log_id = new_log_id()
        heads = [make_head(log_id, seq) for seq in (1, 2, 7)]
        for head in heads:
            self._publish(first, head)
        run_bounded(first.close, "close()", self.hang_timeout)
        second = self._open(make_witness)
        try:
            self._assert_latest(second, log_id, heads[-1], "after a restart")
        finally:
            run_bounded(second.close, "close()", self.hang_timeout)

    def test_publish_is_thread_safe(
        self,
        witness: AuditWitness,
        make_witness: WitnessFactory,
        make_head: HeadFactory,
        new_log_id: Callable[[], str],
    ) -> None:
        """Eight threads publishing 20 heads each at once: every log's newest head comes
        back intact, from this witness and from a new one."""
        self._require_readback(witness)
        log_ids = [new_log_id() for _ in range(8)]
        logs = {log_id: [make_head(log_id, seq) for seq in range(1, 21)] for log_id in log_ids}
        start = threading.Barrier(len(logs))
        calls = [
            BoundedCall(_Publisher(witness, heads, start).run, "publish() from 8 threads").start()
            for heads in logs.values()
        ]
        for call in calls:
            call.result(self.hang_timeout)
        other = self._open(make_witness)
        try:
            for log_id, heads in logs.items():
                self._assert_latest(witness, log_id, heads[-1], "concurrent publishes")
                self._assert_latest(other, log_id, heads[-1], "concurrent publishes, reopened")
        finally:
            run_bounded(other.close, "close()", self.hang_timeout)

    # -- close -------------------------------------------------------------------------------

    def test_close_twice_is_safe(
        self, witness: AuditWitness, make_head: HeadFactory, new_log_id: Callable[[], str]
    ) -> None:
        """A second ``close()`` returns without raising."""
        self._publish(witness, make_head(new_log_id(), 1))
        run_bounded(witness.close, "close()", self.hang_timeout)
        run_bounded(witness.close, "a second close()", self.hang_timeout)

    def test_after_close_nothing_hangs(
        self, witness: AuditWitness, make_head: HeadFactory, new_log_id: Callable[[], str]
    ) -> None:
        """After ``close()``, ``publish`` and ``latest`` return or raise an ``Exception``
        without hanging; a required witness refuses ``publish`` (it cannot keep the head)."""
        log_id = new_log_id()
        self._publish(witness, make_head(log_id, 1))
        run_bounded(witness.close, "close()", self.hang_timeout)
        late = make_head(log_id, 2)
        publish = BoundedCall(lambda: witness.publish(late), "publish() after close()").start()
        latest = BoundedCall(lambda: witness.latest(log_id), "latest() after close()").start()
        for call in (publish, latest):
            assert call.finished_within(self.hang_timeout), f"{call.what} hangs"
            assert call.error is None or isinstance(call.error, Exception), (
                f"{call.what} raised {type(call.error).__name__}, which is not an Exception"
            )
        if witness.required:
            assert publish.error is not None, "a required witness accepted a head after close()"

    # -- failures and garbage ------------------------------------------------------------------

    def test_failed_storage_fails_a_required_witness(
        self,
        witness: AuditWitness,
        make_head: HeadFactory,
        new_log_id: Callable[[], str],
        break_storage: Callable[[AuditWitness], None] | None,
    ) -> None:
        """With its storage failing, ``publish`` returns or raises without hanging, and a
        required witness raises (so the sink fails critical events closed)."""
        log_id = new_log_id()
        self._publish(witness, make_head(log_id, 1))
        if break_storage is None:
            pytest.skip("the witness has no storage that can fail (break_storage is None)")
        break_storage(witness)
        call = BoundedCall(
            lambda: witness.publish(make_head(log_id, 2)), "publish() on failed storage"
        ).start()
        assert call.finished_within(self.hang_timeout), "publish() on failed storage hangs"
        assert call.error is None or isinstance(call.error, Exception)
        if witness.required:
            assert call.error is not None, "a required witness acknowledged a head it lost"

    def test_garbage_heads_are_refused_or_harmless(
        self,
        witness: AuditWitness,
        make_witness: WitnessFactory,
        make_head: HeadFactory,
        new_log_id: Callable[[], str],
    ) -> None:
        """Malformed heads are refused (``publish`` raises) or harmless: nothing hangs, and
        another log's newest head is unchanged, here and after a restart."""
        self._require_readback(witness)
        victim, other = new_log_id(), new_log_id()
        kept = make_head(victim, 5)
        self._publish(witness, kept)
        for what, garbage in _garbage_heads(make_head, victim, other):
            publish = functools.partial(witness.publish, garbage)
            call = BoundedCall(publish, f"publish({what})").start()
            assert call.finished_within(self.hang_timeout), f"publish({what}) hangs"
            assert call.error is None or isinstance(call.error, Exception), (
                f"publish({what}) raised {type(call.error).__name__}, not an Exception"
            )
            self._assert_latest(witness, victim, kept, f"after publish({what})")
        reopened = self._open(make_witness)
        try:
            self._assert_latest(reopened, victim, kept, "after garbage, reopened")
        finally:
            run_bounded(reopened.close, "close()", self.hang_timeout)

    def test_malformed_log_ids_find_nothing(
        self, witness: AuditWitness, make_head: HeadFactory, new_log_id: Callable[[], str]
    ) -> None:
        """``latest`` of a malformed log id gives ``None`` or raises an ``Exception``."""
        self._require_readback(witness)
        log_id = new_log_id()
        self._publish(witness, make_head(log_id, 3))
        for bad in ("", "\n", log_id.upper(), log_id[:-1], f"{log_id}\n", "../" * 50, "x" * 10_000):
            latest = functools.partial(witness.latest, bad)
            call = BoundedCall(latest, "latest(malformed id)").start()
            assert call.finished_within(self.hang_timeout), "latest(malformed id) hangs"
            if call.error is None:
                assert call.value is None, f"latest({bad[:40]!r}) gave a head"
            else:
                assert isinstance(call.error, Exception)

    def test_corrupt_storage_never_gives_another_logs_head(
        self,
        witness: AuditWitness,
        make_witness: WitnessFactory,
        make_head: HeadFactory,
        new_log_id: Callable[[], str],
        corrupt_storage: Callable[[], None] | None,
    ) -> None:
        """With garbage in its storage, a new witness gives the newest intact head, ``None``
        or an ``Exception`` for a log, never another log's head."""
        self._require_readback(witness)
        if corrupt_storage is None:
            pytest.skip("no corrupt_storage fixture: the subclass does not say how to corrupt")
        a, b = new_log_id(), new_log_id()
        heads = [make_head(a, 1), make_head(b, 9), make_head(a, 2)]
        for head in heads:
            self._publish(witness, head)
        run_bounded(witness.close, "close()", self.hang_timeout)
        corrupt_storage()
        reopened = self._open(make_witness)
        try:
            call = BoundedCall(lambda: reopened.latest(a), "latest() on corrupt storage").start()
            assert call.finished_within(self.hang_timeout), "latest() on corrupt storage hangs"
            if call.error is not None:
                assert isinstance(call.error, Exception)
            elif call.value is not None:
                assert dict(call.value) in (dict(heads[0]), dict(heads[2])), (
                    "latest() on corrupt storage gave a head that was never published for it"
                )
        finally:
            run_bounded(reopened.close, "close()", self.hang_timeout)


class _Publisher:
    """One thread of the thread-safety test: waits for the others, then publishes."""

    def __init__(
        self, witness: AuditWitness, heads: list[Mapping[str, Any]], start: threading.Barrier
    ) -> None:
        self.witness = witness
        self.heads = heads
        self.start = start

    def run(self) -> None:
        """Publish every head, in order, once all threads are ready."""
        self.start.wait()
        for head in self.heads:
            self.witness.publish(head)


def _garbage_heads(
    make_head: HeadFactory, victim: str, other: str
) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Malformed heads, each named; none is a valid head of ``victim``."""
    valid = dict(make_head(other, 1))
    forged = dict(make_head(victim, 1_000_000))
    line = json.dumps(forged, sort_keys=True, separators=(",", ":"))
    yield "an empty mapping", {}
    yield "a head without its members", {"log_id": other, "seq": 2}
    yield "a head with a member too many", {**valid, "seq": 3, "extra": "x"}
    yield "a head with a non-JSON value", {**valid, "seq": 4, "reason": object()}
    yield "a head with a negative seq", {**valid, "seq": -1}
    yield "a head with a huge value", {**valid, "seq": 5, "reason": "x" * (1 << 20)}
    for key in ("reason", "ts", "log_id"):
        yield (
            f"a forged head of another log hidden in {key}",
            {**valid, "seq": 6, key: f"x\n{line}\n"},
        )
