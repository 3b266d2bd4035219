"""A trace says what the core did: the attribute names are the core's own, none dropped."""

from __future__ import annotations

from typing import Any

import vramcore_allocator_mock
from vramcore_audit_tracing import _attributes

from vramcore import VramManager, events, narration
from vramcore.plugins import get_plugin_manager
from vramcore.testing import TEST_TOKEN


def test_a_sampled_verification_span_says_it_was_sampled_and_how_many_leaves(
    telemetry: Any,
) -> None:
    backend = vramcore_allocator_mock.MockBackend(devices=1, capacity=1 << 30)
    pm = get_plugin_manager([vramcore_allocator_mock, telemetry.plugin], load_entrypoints=False)
    manager = VramManager(TEST_TOKEN, allocator=backend, plugin_manager=pm, audit="disabled")
    with manager:
        shard = manager.seal_model(b"s" * (40 * 65536), shard_id="sampled")
        manager.verify_sealed(shard, sample=5)
        manager.verify_sealed(shard)
    sampled, full = (s.attributes or {} for s in telemetry.spans() if s.name.endswith("verify"))
    assert sampled["vramcore.mode"] == "sampled"
    assert sampled["vramcore.leaves_checked"] == 5
    assert full["vramcore.mode"] == "full"
    assert full["vramcore.leaves_checked"] == 40


def test_the_allowlists_are_the_cores_definitions() -> None:
    assert _attributes.OPERATION_ATTRIBUTES is narration.OPERATION_ATTRIBUTES
    assert _attributes.EVENT_FIELDS is events.EVENT_FIELDS
    verified = events.SealVerified(
        worker_id="w",
        shard_id="s",
        device=0,
        nbytes=1,
        digest="ab" * 32,
        mode="sampled",
        leaves_checked=3,
    )
    exported = _attributes.event_attributes(verified)
    assert exported["vramcore.mode"] == "sampled"
    assert exported["vramcore.leaves_checked"] == 3
