"""Background scrubbing: finds corruption within a pass, at its budget; stops with the manager."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from vramcore.errors import InvalidInput, SealVerificationFailed
from vramcore.manager import VramManager
from vramcore.testing import CapturingSink

LEAF = 65536


def test_scrubber_finds_a_bit_flip_within_one_pass_and_quarantines_the_shard(
    new_manager: Callable[..., VramManager], mock_backend: Any, pattern: Any
) -> None:
    sink = CapturingSink()
    manager = new_manager(mock_backend, sink=sink)
    good = manager.seal_model(pattern(8 * LEAF, 1), shard_id="good")
    bad = manager.seal_model(pattern(8 * LEAF, 2), shard_id="bad")
    with manager.verified(bad) as buf:
        mock_backend.flip_bit(buf, 6 * LEAF + 9)
    budget = 64 * LEAF  # 4 MiB/s: one pass over the 1 MiB resident takes about 0.25 s
    scrubber = manager.scrub(budget, slice_seconds=0.02)
    assert scrubber.wait_for_passes(1, timeout=10)
    stats = scrubber.stats()
    assert stats.corrupted == ("bad",)
    # The budget held: a pass read 16 leaves at 64 leaves/s, so it took at least ~0.2 s.
    assert stats.last_pass_seconds is not None
    assert stats.last_pass_seconds >= 0.8 * (16 * LEAF) / budget
    failed = sink.of_type("seal.verification_failed")
    assert [e.shard_id for e in failed] == ["bad"]  # type: ignore[attr-defined]
    assert failed[0].byte_ranges == ((6 * LEAF, 7 * LEAF),)  # type: ignore[attr-defined]
    with pytest.raises(SealVerificationFailed) as info, manager.verified(bad):
        pass
    assert info.value.reason == "quarantined"
    manager.verify_sealed(good)  # the clean shard is unaffected
    # Resealing clears it: deallocate and seal again.
    manager.deallocate(bad)
    fresh = manager.seal_model(pattern(8 * LEAF, 2), shard_id="bad")
    manager.verify_sealed(fresh)
    scrubber.stop()
    assert not scrubber.running


def test_closing_the_manager_stops_the_scrubber_without_leaks_or_hangs(
    make_plugin_manager: Any, mock_backend: Any, pattern: Any
) -> None:
    manager = VramManager(
        "b1B2QBTc3OsGQsJHexAZ5FzLGTQVjFLJShMr0tgoiq8",
        allocator=mock_backend,
        plugin_manager=make_plugin_manager(),
        audit="disabled",
    )
    for i in range(3):
        manager.seal_model(pattern(4 * LEAF, i), shard_id=f"s{i}")
    scrubber = manager.scrub(10 * LEAF, slice_seconds=0.01)  # slow: still mid-pass at close
    time.sleep(0.05)
    assert scrubber.running
    started = time.monotonic()
    manager.close()
    assert time.monotonic() - started < 5
    assert not scrubber.running
    assert mock_backend.live_allocations == 0
    assert not any(t.name == "vramcore-scrub" and t.is_alive() for t in threading.enumerate())


def test_scrubber_skips_shards_deallocated_under_it(
    new_manager: Callable[..., VramManager], mock_backend: Any, pattern: Any
) -> None:
    manager = new_manager(mock_backend, audit="disabled")
    shards = [manager.seal_model(pattern(2 * LEAF, i), shard_id=f"d{i}") for i in range(4)]
    scrubber = manager.scrub(256 * LEAF, slice_seconds=0.005)
    for shard in shards[:3]:
        manager.deallocate(shard)
    assert scrubber.wait_for_passes(2, timeout=10)
    assert scrubber.stats().corrupted == ()


@pytest.mark.parametrize("budget", [0, 100, -1, True, 1.5e6, "1MiB"])
def test_bad_budgets_are_refused(mock_manager: VramManager, budget: object) -> None:
    with pytest.raises(InvalidInput, match="bytes_per_second"):
        mock_manager.scrub(budget)  # type: ignore[arg-type]


def test_only_one_scrubber_at_a_time(mock_manager: VramManager) -> None:
    first = mock_manager.scrub(LEAF * 100)
    with pytest.raises(InvalidInput, match="already runs"):
        mock_manager.scrub(LEAF * 100)
    first.stop()
    mock_manager.scrub(LEAF * 100).stop()
