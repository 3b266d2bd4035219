"""Sealing a model directory's shards at once (``seal_dir(parallel=N)``, ``--parallel N``).

A file's SHA-256 is one sequential stream, so a signed directory is sealed faster on a
many-core host only with several shards at once. Whatever the width, the result must be the
one a seal of one shard at a time gives: the same attestation in file order, each shard's
audit events in order, all or nothing on failure (nothing left in VRAM, no further shard
started), and the error of the first failed shard in file order.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import vramcore_allocator_mock as mock_plugin

from vramcore import VramManager
from vramcore._modeldir import INDEX_SUFFIX
from vramcore._sealdir import (
    DEFAULT_MAX_PARALLEL,
    MAX_PARALLEL,
    check_parallel,
    default_parallel_shards,
)
from vramcore.errors import AllocationFailed, IntegrityViolation, InvalidInput
from vramcore.safetensors import write_safetensors
from vramcore.testing import (
    TEST_TOKEN,
    CapturePlugin,
    CapturingSink,
    publisher_keypair,
    sign_model_dir,
)

SHARDS = 6


def write_shards(root: Path, count: int = SHARDS) -> Path:
    """``count`` shards of random tensors (sizes differ, so seals end out of order), an index."""
    root.mkdir(parents=True)
    weight_map = {}
    for i in range(1, count + 1):
        name = f"model-{i:05d}-of-{count:05d}.safetensors"
        data = os.urandom(4096 * (count + 2 - i) + 64 * i)
        tensors = {f"layers.{i}.weight": ("U8", [len(data)], data)}
        with (root / name).open("wb") as fh:
            write_safetensors(fh, tensors)
        weight_map[f"layers.{i}.weight"] = name
    (root / f"model{INDEX_SUFFIX}").write_text(json.dumps({"weight_map": weight_map}))
    return root


@pytest.fixture
def backend() -> mock_plugin.MockBackend:
    return mock_plugin.MockBackend()


@pytest.fixture
def manager(backend: mock_plugin.MockBackend) -> Iterator[VramManager]:
    with VramManager(TEST_TOKEN, allocator=backend, audit="disabled") as m:
        yield m


class Watch:
    """Wraps ``manager.seal_file``: counts the seals in flight, records which files started,
    and runs a per-file action (fail, wait) before delegating."""

    def __init__(self, manager: VramManager) -> None:
        self.real = manager.seal_file
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most = 0
        self.started: list[str] = []
        self.before: dict[str, Callable[[], None]] = {}

    def seal_file(self, path: Path, **kwargs: Any) -> Any:
        name = Path(path).name
        with self.lock:
            self.started.append(name)
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        try:
            if name in self.before:
                self.before[name]()
            return self.real(path, **kwargs)
        finally:
            with self.lock:
                self.in_flight -= 1


@pytest.fixture
def watch(manager: VramManager, monkeypatch: pytest.MonkeyPatch) -> Watch:
    w = Watch(manager)
    monkeypatch.setattr(manager, "seal_file", w.seal_file)
    return w


def _file(i: int) -> str:
    return f"model-{i:05d}-of-{SHARDS:05d}.safetensors"


def test_shards_sealed_at_once_give_the_attestation_of_one_at_a_time(
    manager: VramManager, tmp_path: Path
) -> None:
    root = write_shards(tmp_path / "m")
    one = manager.seal_dir(root, parallel=1)
    for shard in one.shards:
        manager.deallocate(shard)
    many = manager.seal_dir(root, parallel=4)
    assert list(many.files) == list(one.files) == [_file(i) for i in range(1, SHARDS + 1)]
    assert [(s.shard_id, s.digest, s.tensors) for s in many.shards] == [
        (s.shard_id, s.digest, s.tensors) for s in one.shards
    ]
    manager.verify_model(many)
    assert sorted(s.shard_id for s in manager.shards()) == sorted(s.shard_id for s in many.shards)


def test_parallel_shards_really_overlap_and_never_exceed_the_width(
    manager: VramManager, watch: Watch, tmp_path: Path
) -> None:
    root = write_shards(tmp_path / "m")
    together = threading.Barrier(3, timeout=20)  # the first three must be in flight at once
    for i in (1, 2, 3):
        watch.before[_file(i)] = together.wait
    sealed = manager.seal_dir(root, parallel=3)
    assert watch.most == 3 and len(sealed.files) == SHARDS
    assert sorted(watch.started) == sorted(sealed.files)


def test_one_at_a_time_never_overlaps(manager: VramManager, watch: Watch, tmp_path: Path) -> None:
    manager.seal_dir(write_shards(tmp_path / "m"), parallel=1)
    assert watch.most == 1 and watch.started == [_file(i) for i in range(1, SHARDS + 1)]


def test_a_failed_shard_releases_all_and_no_further_shard_starts(
    manager: VramManager, backend: mock_plugin.MockBackend, watch: Watch, tmp_path: Path
) -> None:
    root = write_shards(tmp_path / "m")
    failed = threading.Event()

    def fail() -> None:
        failed.set()
        raise AllocationFailed("copy lost by the driver")

    def finish_after_the_failure() -> None:
        assert failed.wait(20)
        time.sleep(0.3)  # the failing worker marks the seal stopped right after raising

    watch.before[_file(1)] = finish_after_the_failure
    watch.before[_file(2)] = fail
    with pytest.raises(AllocationFailed, match="copy lost"):
        manager.seal_dir(root, parallel=2)
    assert sorted(watch.started) == [_file(1), _file(2)]  # shards 3..6 never started
    assert manager.shards() == [] and backend.live_allocations == 0


def test_the_error_is_the_first_failed_shard_in_file_order(
    manager: VramManager, backend: mock_plugin.MockBackend, watch: Watch, tmp_path: Path
) -> None:
    root = write_shards(tmp_path / "m")
    later_failed = threading.Event()

    def fail_late() -> None:
        later_failed.set()
        raise AllocationFailed("the later shard failed first in time")

    def fail_early() -> None:
        assert later_failed.wait(20)
        raise AllocationFailed("the earlier shard failed last in time")

    watch.before[_file(2)] = fail_early
    watch.before[_file(3)] = fail_late
    with pytest.raises(AllocationFailed, match="earlier shard"):
        manager.seal_dir(root, parallel=3)
    assert manager.shards() == [] and backend.live_allocations == 0


def test_an_interrupt_in_a_shard_releases_everything(
    manager: VramManager, backend: mock_plugin.MockBackend, watch: Watch, tmp_path: Path
) -> None:
    root = write_shards(tmp_path / "m")

    def interrupt() -> None:
        raise KeyboardInterrupt

    watch.before[_file(4)] = interrupt
    with pytest.raises(KeyboardInterrupt):
        manager.seal_dir(root, parallel=3)
    assert manager.shards() == [] and backend.live_allocations == 0


def test_a_shard_finishing_after_a_second_interrupt_deallocates_itself(
    manager: VramManager,
    backend: mock_plugin.MockBackend,
    watch: Watch,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C twice: the first ends the wait for the shards, the second the wait for the ones
    under way. The call has let go of everything by then; a shard that finishes afterwards
    must not stay allocated until the manager closes."""
    import concurrent.futures

    root = write_shards(tmp_path / "m")
    started, go = threading.Event(), threading.Event()

    def slow() -> None:
        started.set()
        assert go.wait(20)

    watch.before[_file(1)] = slow

    class Interrupted(concurrent.futures.ThreadPoolExecutor):
        def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
            super().shutdown(wait=False, cancel_futures=True)
            raise KeyboardInterrupt  # the second Ctrl-C, while waiting for shard 1

    def first_interrupt(*_args: Any, **_kwargs: Any) -> None:
        assert started.wait(20)
        raise KeyboardInterrupt

    monkeypatch.setattr(concurrent.futures, "ThreadPoolExecutor", Interrupted)
    monkeypatch.setattr(concurrent.futures, "wait", first_interrupt)
    with pytest.raises(KeyboardInterrupt):
        manager.seal_dir(root, parallel=2)
    go.set()  # shard 1's seal now finishes, after the call gave up
    for thread in threading.enumerate():
        if thread.name.startswith("vramcore-seal-dir"):
            thread.join(20)
    assert manager.shards() == [] and backend.live_allocations == 0


@pytest.mark.slow
def test_a_tampered_shard_among_many_is_named_and_nothing_stays(
    tmp_path: Path,
) -> None:
    root = write_shards(tmp_path / "m")
    private, public = publisher_keypair(tmp_path)
    sign_model_dir(root, private, tmp_path / "m.sig")
    target = root / _file(5)
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01
    target.write_bytes(bytes(data))
    backend = mock_plugin.MockBackend()
    with VramManager(TEST_TOKEN, allocator=backend, audit="disabled") as manager:
        with pytest.raises(IntegrityViolation, match=_file(5)) as info:
            manager.seal_dir(root, signature=tmp_path / "m.sig", public_key=public, parallel=4)
        assert info.value.reason == "sha256_mismatch"
        assert "\n" not in str(info.value)
        assert manager.shards() == [] and backend.live_allocations == 0


def test_each_shards_audit_events_keep_their_order(
    tmp_path: Path, make_plugin_manager: Any
) -> None:
    sink = CapturingSink()
    pm = make_plugin_manager(mock_plugin, CapturePlugin(sink))
    with VramManager(TEST_TOKEN, allocator="mock", plugin_manager=pm) as manager:
        sealed = manager.seal_dir(write_shards(tmp_path / "m"), parallel=4)
    events = [e for e in sink.events if e.event_type in {"vram.allocated", "vram.sealed"}]
    for shard in sealed.shards:
        mine = [e.event_type for e in events if e.shard_id == shard.shard_id]
        assert mine == ["vram.allocated", "vram.sealed"]
    types = [e.event_type for e in sink.events]
    last_sealed = max(i for i, t in enumerate(types) if t == "vram.sealed")
    assert types.index("vram.model_sealed") > last_sealed


@pytest.mark.parametrize("bad", [0, -1, MAX_PARALLEL + 1, True, 1.5, "2", None.__class__])
def test_a_bad_width_is_refused_before_anything_is_sealed(
    manager: VramManager, watch: Watch, tmp_path: Path, bad: object
) -> None:
    root = write_shards(tmp_path / "m")
    with pytest.raises(InvalidInput, match="parallel must be a whole number") as info:
        manager.seal_dir(root, parallel=bad)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
    assert watch.started == [] and manager.shards() == []


def test_check_parallel_accepts_the_range() -> None:
    assert [check_parallel(n) for n in (1, 2, MAX_PARALLEL)] == [1, 2, MAX_PARALLEL]


@pytest.mark.parametrize(("cpus", "width"), [(1, 1), (2, 1), (3, 1), (8, 2), (16, 4), (96, 4)])
def test_the_default_width_is_one_shard_per_four_cpus(
    monkeypatch: pytest.MonkeyPatch, cpus: int, width: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cpus)))
    assert default_parallel_shards() == width
    assert 1 <= default_parallel_shards() <= DEFAULT_MAX_PARALLEL


@pytest.mark.parametrize(("cpus", "width"), [(1, 1), (2, 2), (3, 2), (8, 2), (12, 3), (96, 4)])
def test_a_signed_seal_runs_at_least_two_sha256_streams(
    monkeypatch: pytest.MonkeyPatch, cpus: int, width: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cpus)))
    assert default_parallel_shards(signed=True) == width


def test_by_default_two_cpus_seal_signed_shards_two_at_once_and_unsigned_one(
    monkeypatch: pytest.MonkeyPatch, manager: VramManager, watch: Watch, tmp_path: Path
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    root = write_shards(tmp_path / "m")
    unsigned = manager.seal_dir(root)
    assert watch.most == 1
    for shard in unsigned.shards:
        manager.deallocate(shard)
    private, public = publisher_keypair(tmp_path)
    sign_model_dir(root, private, tmp_path / "m.sig")
    together = threading.Barrier(2, timeout=20)  # the first two must be in flight at once
    for i in (1, 2):
        watch.before[_file(i)] = together.wait
    signed = manager.seal_dir(root, signature=tmp_path / "m.sig", public_key=public)
    assert watch.most == 2 and list(signed.files) == list(unsigned.files)
    assert [s.digest for s in signed.shards] == [s.digest for s in unsigned.shards]


# -- vramcore seal DIR --parallel N -----------------------------------------------------------


def test_cli_seals_shards_at_once(cli: Any, tmp_path: Path) -> None:
    root = write_shards(tmp_path / "m")
    code, out, _ = cli("seal", str(root), "--parallel", "3", "--json")
    assert code == 0
    data = json.loads(out)
    files = [s["file"] for s in data["model_attestation"]["shards"]]
    assert files == [_file(i) for i in range(1, SHARDS + 1)]
    assert [v["file"] for v in data["verified"]] == files


@pytest.mark.parametrize(
    "value", ["0", "-2", "x", "1.5", str(MAX_PARALLEL + 1), "", "\u00b2", "\u0663", "9" * 5000]
)
def test_cli_refuses_a_bad_width_with_one_line(cli: Any, tmp_path: Path, value: str) -> None:
    root = write_shards(tmp_path / "m")
    code, out, err = cli("seal", str(root), "--parallel", value)
    assert code == 2 and out == ""
    (line,) = [x for x in err.splitlines() if x.startswith("vramcore: error")]
    assert "--parallel must be a whole number" in line


def test_cli_refuses_parallel_for_one_file(cli: Any, tmp_path: Path) -> None:
    root = write_shards(tmp_path / "m")
    code, _, err = cli("seal", str(root / _file(1)), "--parallel", "2")
    assert code == 2
    assert "--parallel is for a model directory" in err
