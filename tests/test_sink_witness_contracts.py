"""The sink and witness conformance suites fail sinks and witnesses with deliberate bugs, in
the tests that cover each bug and only there, and pass the same code with the bug fixed.

Each harness below is a small, correct file-backed sink or witness; each broken variant
changes one behaviour. :func:`_outcomes` runs the contract on it with pytest in-process.
"""

from __future__ import annotations

import pytest

from vramcore.testing import sample_events

pytest_plugins = ["pytester"]

SINK = '''
import json, os, threading
import pytest
from vramcore import AuditSink
from vramcore.testing import AuditSinkContract


class FileSink(AuditSink):
    """One JSON line per event; critical ones fsynced before emit returns (correct)."""

    name = "file"
    durable = True

    def __init__(self, path):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def store(self, event):
        if self.fd < 0:
            raise OSError("closed")
        os.write(self.fd, (event.to_json() + "\\n").encode())
        if event.critical:
            os.fsync(self.fd)

    def flush(self):
        if self.fd >= 0:
            os.fsync(self.fd)

    def emit(self, event):
        self.store(event)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
BROKEN

class TestSink(AuditSinkContract):
    hang_timeout = globals().get("HANG_TIMEOUT", AuditSinkContract.hang_timeout)

    @pytest.fixture
    def make_sink(self, tmp_path):
        return lambda context: SinkUnderTest(tmp_path / "events.jsonl")

    @pytest.fixture
    def read_back(self, tmp_path):
        def read(sink):
            path = tmp_path / "events.jsonl"
            return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
        return read
'''

CORRECT_SINK = "\nSinkUnderTest = FileSink\n"

#: Its fast path writes to storage in the caller's thread: correct events, but the core cannot
#: bound a fast path, so a hung storage hangs the operation (the contract's hang test).
BLOCKING_NOWAIT_SINK = """
HANG_TIMEOUT = 5.0  # the core cuts a hung emit() at 0.5 s; this hang is the fast path's

class SinkUnderTest(FileSink):
    def emit_nowait(self, event):
        self.store(event)
        return True
"""

#: Its fast path says it recorded an event it dropped.
DROPPING_NOWAIT_SINK = """
class SinkUnderTest(FileSink):
    def emit_nowait(self, event):
        return True
"""

#: Its fast path answers with something truthy that is not ``True``.
VAGUE_NOWAIT_SINK = """
HANG_TIMEOUT = 5.0

class SinkUnderTest(FileSink):
    def emit_nowait(self, event):
        self.store(event)
        return "stored"
"""

#: Claims to be durable but keeps events in memory until close (and loses errors).
BUFFERING_SINK = """
class SinkUnderTest(FileSink):
    def __init__(self, path):
        super().__init__(path)
        self.pending = []

    def emit(self, event):
        self.pending.append(event)

    def close(self):
        if self.fd >= 0:
            for event in self.pending:
                self.store(event)
        super().close()
"""

#: Stores each event at once, but critical events jump the queue of a batch of eight.
REORDERING_SINK = """
class SinkUnderTest(FileSink):
    def __init__(self, path):
        super().__init__(path)
        self.batch = []

    def emit(self, event):
        self.batch.append(event)
        if event.critical or len(self.batch) == 8:
            self.flush()

    def flush(self):
        for event in sorted(self.batch, key=lambda e: not e.critical):
            self.store(event)
        self.batch = []

    def close(self):
        if self.fd >= 0:
            self.flush()
        super().close()
"""

#: Correct but for close: a second close() fails.
CLOSE_ONCE_SINK = """
class SinkUnderTest(FileSink):
    def close(self):
        os.close(self.fd)
        self.fd = -1
"""

#: Correct but for what it holds: a seal key it got from somewhere other than its context.
LEAKY_SINK = """
from vramcore.seal import SEAL_KEY_INFO, WorkerToken
from vramcore.testing import TEST_TOKEN


class SinkUnderTest(FileSink):
    def __init__(self, path):
        super().__init__(path)
        self.key = WorkerToken(TEST_TOKEN).derive(SEAL_KEY_INFO)
"""

WITNESS = '''
import json, os, secrets, threading
import pytest
from vramcore import AuditWitness
from vramcore.testing import WitnessContract


class FileWitness(AuditWitness):
    """One canonical JSON line per head, fsynced; the newest head of a log read back."""

    name = "file"

    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def publish(self, head):
        line = json.dumps(dict(head), sort_keys=True) + "\\n"
        with self.lock:
            os.write(self.fd, line.encode())
            os.fsync(self.fd)

    def heads(self):
        for line in self.path.read_text().splitlines():
            try:
                yield json.loads(line)
            except ValueError:
                continue

    def latest(self, log_id):
        found = None
        for head in self.heads():
            if isinstance(head, dict) and head.get("log_id") == log_id:
                found = head
        return found

    def close(self):
        with self.lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
BROKEN

class TestWitness(WitnessContract):
    @pytest.fixture
    def make_witness(self, tmp_path):
        return lambda: WitnessUnderTest(tmp_path / "heads.ndjson")

    @pytest.fixture
    def make_head(self):
        return lambda log_id, seq: {"log_id": log_id, "seq": seq, "sig": secrets.token_hex(8)}
'''

CORRECT_WITNESS = "\nWitnessUnderTest = FileWitness\n"

#: Keeps heads in memory only: they do not outlive the witness object.
FORGETFUL_WITNESS = """
class WitnessUnderTest(FileWitness):
    def __init__(self, path):
        super().__init__(path)
        self.kept = {}

    def publish(self, head):
        with self.lock:
            self.kept[head.get("log_id")] = dict(head)

    def latest(self, log_id):
        return self.kept.get(log_id)
"""

#: Answers latest() with the newest head it holds, whatever log it belongs to.
ANY_LOG_WITNESS = """
class WitnessUnderTest(FileWitness):
    def latest(self, log_id):
        found = None
        for head in self.heads():
            if isinstance(head, dict) and head.get("log_id"):
                found = head
        return found
"""

#: Writes heads as raw text: a line break in a member splits one head into several lines.
UNESCAPED_WITNESS = """
class WitnessUnderTest(FileWitness):
    def publish(self, head):
        text = "{" + ", ".join(
            f'"{k}": ' + (str(v) if isinstance(v, int) else '"' + str(v) + '"')
            for k, v in sorted(head.items())
        ) + "}\\n"
        with self.lock:
            os.write(self.fd, text.encode())
"""


def _outcomes(pytester: pytest.Pytester, harness: str, code: str) -> tuple[set[str], int, int]:
    """Run the contract on ``code``: the failed tests' names, and the pass and skip counts."""
    pytester.makepyfile(test_contract_run=harness.replace("BROKEN", code))
    result = pytester.inline_run("-p", "no:cacheprovider")
    passed, skipped, failed = result.listoutcomes()
    return {r.nodeid.split("::")[-1].split("[")[0] for r in failed}, len(passed), len(skipped)


def test_a_correct_sink_passes_every_test(pytester: pytest.Pytester) -> None:
    assert _outcomes(pytester, SINK, CORRECT_SINK) == (set(), 14, 0)


@pytest.mark.slow  # runs the whole sink contract again, and waits out a hang
def test_a_sink_whose_fast_path_waits_on_its_storage_fails_the_hang_test(
    pytester: pytest.Pytester,
) -> None:
    failed, passed, _ = _outcomes(pytester, SINK, BLOCKING_NOWAIT_SINK)
    assert failed == {"test_a_hung_sink_is_cut_off_by_the_core_timeout"}
    assert passed == 13


@pytest.mark.slow  # runs the whole sink contract again
@pytest.mark.parametrize("broken", [DROPPING_NOWAIT_SINK, VAGUE_NOWAIT_SINK])
def test_a_sink_whose_fast_path_drops_or_mumbles_fails_the_fast_path_tests(
    pytester: pytest.Pytester, broken: str
) -> None:
    failed, _, _ = _outcomes(pytester, SINK, broken)
    assert "test_events_recorded_without_waiting_arrive_in_order" in failed
    assert failed <= {
        "test_events_recorded_without_waiting_arrive_in_order",
        "test_events_from_a_manager_arrive_in_order",
        "test_a_hung_sink_is_cut_off_by_the_core_timeout",
    }


def test_a_sink_that_buffers_until_close_fails_the_durability_and_fail_closed_tests(
    pytester: pytest.Pytester,
) -> None:
    failed, passed, _ = _outcomes(pytester, SINK, BUFFERING_SINK)
    assert failed == {
        "test_a_critical_event_is_stored_when_emit_returns",
        "test_flush_stores_every_event",
        "test_a_critical_event_it_cannot_store_raises",
        "test_the_core_refuses_an_operation_the_sink_cannot_record",
        "test_a_hung_sink_is_cut_off_by_the_core_timeout",
        "test_after_close_nothing_hangs_and_nothing_more_is_stored",
    }
    assert passed == 8


@pytest.mark.slow  # runs the whole sink contract again
def test_a_sink_that_reorders_events_fails_the_ordering_tests(pytester: pytest.Pytester) -> None:
    failed, passed, _ = _outcomes(pytester, SINK, REORDERING_SINK)
    assert failed == {
        "test_every_kind_of_event_arrives_unchanged",
        "test_a_stream_of_events_arrives_in_order",
        "test_events_from_a_manager_arrive_in_order",
        # what it stores when a critical event arrives is out of order there too
        "test_a_critical_event_is_stored_when_emit_returns",
        "test_flush_stores_every_event",
    }
    assert passed == 9


@pytest.mark.slow  # runs the whole sink contract again
def test_a_sink_that_cannot_close_twice_fails_that_test(pytester: pytest.Pytester) -> None:
    failed, _, _ = _outcomes(pytester, SINK, CLOSE_ONCE_SINK)
    assert failed == {"test_close_twice_is_safe"}


@pytest.mark.slow  # runs the whole sink contract again
def test_a_sink_holding_the_seal_key_fails_the_secrets_test(pytester: pytest.Pytester) -> None:
    failed, _, _ = _outcomes(pytester, SINK, LEAKY_SINK)
    assert failed == {"test_nothing_secret_reaches_the_sink"}


def test_a_correct_witness_passes_every_test(pytester: pytest.Pytester) -> None:
    failed, passed, skipped = _outcomes(pytester, WITNESS, CORRECT_WITNESS)
    assert (failed, skipped) == (set(), 1)  # no corrupt_storage fixture: said, and skipped
    assert passed == 9


def test_a_witness_that_forgets_fails_the_durability_tests(pytester: pytest.Pytester) -> None:
    failed, _, _ = _outcomes(pytester, WITNESS, FORGETFUL_WITNESS)
    assert failed == {
        "test_heads_outlive_the_witness",
        "test_publish_is_thread_safe",
        "test_garbage_heads_are_refused_or_harmless",
    }


def test_a_witness_that_ignores_the_log_id_fails_the_round_trip(
    pytester: pytest.Pytester,
) -> None:
    failed, _, _ = _outcomes(pytester, WITNESS, ANY_LOG_WITNESS)
    assert failed == {
        "test_latest_gives_each_logs_newest_head",
        "test_publish_is_thread_safe",
        "test_garbage_heads_are_refused_or_harmless",
        "test_malformed_log_ids_find_nothing",
    }


def test_a_witness_that_writes_unescaped_text_lets_a_head_be_forged(
    pytester: pytest.Pytester,
) -> None:
    failed, _, _ = _outcomes(pytester, WITNESS, UNESCAPED_WITNESS)
    assert "test_garbage_heads_are_refused_or_harmless" in failed


def test_sample_events_cover_every_event_type_and_tell_the_stream_apart() -> None:
    from vramcore.events import EVENT_TYPES

    assert [type(e) for e in sample_events()] == [
        EVENT_TYPES[t]
        for t in (
            "vram.allocated",
            "vram.allocation_failed",
            "vram.sealed",
            "seal.verified",
            "seal.verification_failed",
            "vram.deallocated",
            "policy.violation",
            "vram.seal_refused",
            "digest.fallback",
            "vram.model_sealed",
        )
    ]
    assert {type(e) for e in sample_events()} == set(EVENT_TYPES.values())
    stream = sample_events(50)
    assert len({e.to_json() for e in stream}) == 50
    assert [e.critical for e in sample_events(4)] == [False, False, False, True]
