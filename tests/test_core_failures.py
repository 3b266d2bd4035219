"""Failures mid-seal leave nothing allocated; audit failures fail closed where they must."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from vramcore import VramManager
from vramcore.errors import (
    AllocationFailed,
    AuditError,
    InsufficientVram,
    IntegrityViolation,
    InvalidInput,
    SealVerificationFailed,
    VramError,
)
from vramcore.testing import TEST_TOKEN, CapturePlugin, CapturingSink, FailingSink

SIZE = 3 * 65536 + 11


@pytest.fixture
def model_file(tmp_path: Path, pattern: Any) -> Path:
    path = tmp_path / "weights.bin"
    path.write_bytes(pattern(SIZE))
    return path


def _seal(kind: str, manager: VramManager, model_file: Path, **kwargs: Any) -> Any:
    if kind == "model":
        return manager.seal_model(model_file.read_bytes(), shard_id="s", **kwargs)
    return manager.seal_file(model_file, shard_id="s", **kwargs)


@pytest.fixture(params=["model", "file"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


def test_allocation_failure_leaks_nothing(
    kind: str,
    mock_manager: VramManager,
    mock_backend: Any,
    audit_capture: CapturingSink,
    snapshot: Any,
    model_file: Path,
) -> None:
    mock_manager.seal_model(b"resident" * 100, shard_id="other")
    before = snapshot()
    audit_capture.events.clear()
    mock_backend.fail_next_allocation("device busy")
    with pytest.raises(AllocationFailed, match="device busy") as info:
        _seal(kind, mock_manager, model_file)
    assert info.value.retriable
    assert snapshot() == before
    assert audit_capture.types() == ["vram.allocation_failed"]
    (event,) = audit_capture.events
    assert event.shard_id == "s"  # type: ignore[attr-defined]
    assert event.nbytes == SIZE  # type: ignore[attr-defined]
    assert "device busy" in event.reason  # type: ignore[attr-defined]
    # the id is free again and the next seal works
    shard = _seal(kind, mock_manager, model_file)
    mock_manager.verify_sealed(shard)


def test_copy_failure_frees_the_buffer(
    kind: str,
    mock_manager: VramManager,
    mock_backend: Any,
    audit_capture: CapturingSink,
    snapshot: Any,
    model_file: Path,
) -> None:
    before = snapshot()
    mock_backend.fail_next_copy("PCIe link error")
    with pytest.raises(AllocationFailed, match="PCIe link error"):
        _seal(kind, mock_manager, model_file)
    assert snapshot() == before
    assert audit_capture.types() == [
        "vram.allocated",
        "vram.allocation_failed",
        "vram.deallocated",
    ]
    assert mock_backend.allocations == 1
    _seal(kind, mock_manager, model_file)
    assert mock_backend.live_allocations == before.live + 1


def test_copy_failure_on_a_later_chunk_frees_the_buffer(
    kind: str,
    new_manager: Any,
    mock_backend: Any,
    model_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sink = CapturingSink()
    manager = new_manager(mock_backend, sink=sink, chunk_bytes=65536)
    copies = []
    original = mock_backend.copy_in

    def copy_in(buf: Any, offset: int, data: Any) -> None:
        copies.append(offset)
        if len(copies) == 3:
            mock_backend.fail_next_copy("third chunk lost")
        original(buf, offset, data)

    monkeypatch.setattr(mock_backend, "copy_in", copy_in)
    with pytest.raises(AllocationFailed, match="third chunk lost"):
        _seal(kind, manager, model_file)
    assert copies == [0, 65536, 2 * 65536]
    assert mock_backend.live_allocations == 0
    assert manager.used_vram() == 0 == mock_backend.used_bytes()
    assert sink.types()[-1] == "vram.deallocated"


def test_a_backend_error_with_control_characters_is_still_cleaned_up(
    mock_manager: VramManager, mock_backend: Any, audit_capture: CapturingSink, snapshot: Any
) -> None:
    before = snapshot()
    mock_backend.fail_next_copy("driver said:\nline two \x1b[31m\u202e")
    with pytest.raises(AllocationFailed):
        mock_manager.seal_model(b"x" * 100, shard_id="s")
    assert snapshot() == before
    (event,) = audit_capture.of_type("vram.allocation_failed")
    assert "driver said:?line two ?[31m?" in event.reason  # type: ignore[attr-defined]


def test_insufficient_vram(new_manager: Any, audit_capture: CapturingSink) -> None:
    from vramcore_allocator_mock import MockBackend

    backend = MockBackend(capacity=1 << 20)
    manager = new_manager(backend, sink=audit_capture)
    with pytest.raises(InsufficientVram) as info:
        manager.seal_model(bytes((1 << 20) + 1), shard_id="big")
    assert info.value.retriable
    assert info.value.needed == (1 << 20) + 1
    assert info.value.available == 1 << 20
    assert info.value.device == 0
    assert "need 1048577 bytes, 1048576 available" in str(info.value)
    manager.seal_model(bytes(700_000), shard_id="a")
    with pytest.raises(InsufficientVram) as info:
        manager.seal_model(bytes(400_000), shard_id="b")
    assert info.value.available == (1 << 20) - 700_000
    assert manager.used_vram() == 700_000 == backend.used_bytes()
    assert backend.live_allocations == 1
    assert audit_capture.types().count("vram.allocation_failed") == 2
    manager.deallocate("a")
    manager.seal_model(bytes(400_000), shard_id="b")  # room again


def test_expected_sha256_mismatch_on_a_file_leaks_nothing(
    mock_manager: VramManager, audit_capture: CapturingSink, snapshot: Any, model_file: Path
) -> None:
    before = snapshot()
    wrong = hashlib.sha256(b"another file").hexdigest()
    with pytest.raises(IntegrityViolation, match="SHA-256 mismatch") as info:
        mock_manager.seal_file(model_file, expected_sha256=wrong)
    assert info.value.fatal
    assert snapshot() == before
    assert audit_capture.types() == [
        "vram.allocated",
        "vram.seal_refused",  # the input failed, not the device
        "vram.deallocated",
    ]
    refused = audit_capture.of_type("vram.seal_refused")[0]
    assert refused.reason == "sha256_mismatch"  # type: ignore[attr-defined]
    assert mock_manager.shards() == []


def test_expected_sha256_mismatch_on_bytes_leaves_nothing_allocated(
    mock_manager: VramManager, mock_backend: Any, audit_capture: CapturingSink
) -> None:
    # The hash is computed while the bytes are copied (not in a serial pass before), and
    # checked before sealing: the allocation is undone and audited.
    with pytest.raises(IntegrityViolation, match="SHA-256 mismatch"):
        mock_manager.seal_model(b"data", expected_sha256="0" * 64)
    assert mock_backend.live_allocations == 0
    assert mock_manager.used_vram() == 0
    assert mock_manager.shards() == []
    assert audit_capture.types() == [
        "vram.allocated",
        "vram.seal_refused",
        "vram.deallocated",
    ]
    with pytest.raises(InvalidInput, match="64 hexadecimal digits"):
        mock_manager.seal_model(b"data", expected_sha256="not-hex")


def test_expected_sha256_right(mock_manager: VramManager, model_file: Path) -> None:
    sha = hashlib.sha256(model_file.read_bytes()).hexdigest()
    shard = mock_manager.seal_file(model_file, expected_sha256=sha.upper())
    assert shard.file_sha256 == sha
    assert '"file_sha256":"' + sha in shard.to_json()
    other = mock_manager.seal_model(model_file.read_bytes(), shard_id="m", expected_sha256=sha)
    assert other.file_sha256 == sha
    assert other.digest == shard.digest
    assert mock_manager.seal_model(b"x", shard_id="n").file_sha256 is None


# -- audit sinks ----------------------------------------------------------------------------


def test_sink_failing_on_sealed_fails_the_seal_and_frees_the_buffer(
    new_manager: Any, mock_backend: Any
) -> None:
    capture = CapturingSink()
    manager = new_manager(mock_backend, CapturePlugin(capture, FailingSink(["vram.sealed"])))
    with pytest.raises(AuditError, match=r"failing.*vram\.sealed") as info:
        manager.seal_model(b"x" * 1000, shard_id="s")
    assert isinstance(info.value.__cause__, OSError)
    assert mock_backend.live_allocations == 0
    assert manager.used_vram() == 0
    assert manager.shards() == []
    assert capture.types() == [
        "vram.allocated",
        "vram.sealed",  # the capturing sink got it; the failing one did not
        "vram.allocation_failed",
        "vram.deallocated",
    ]


def test_sink_failing_on_a_non_critical_event_does_not_fail_the_seal(
    new_manager: Any, mock_backend: Any
) -> None:
    capture = CapturingSink()
    failing = FailingSink(["vram.allocated", "seal.verified", "vram.deallocated"])
    manager = new_manager(mock_backend, CapturePlugin(failing, capture))
    shard = manager.seal_model(b"x" * 1000, shard_id="s")
    manager.verify_sealed(shard)
    manager.deallocate(shard)
    assert capture.types() == ["vram.allocated", "vram.sealed", "seal.verified", "vram.deallocated"]
    assert mock_backend.live_allocations == 0


def test_sink_failing_on_verification_failure_still_refuses(
    new_manager: Any, mock_backend: Any
) -> None:
    manager = new_manager(mock_backend, CapturePlugin(FailingSink(["seal.verification_failed"])))
    shard = manager.seal_model(b"x" * 1000, shard_id="s")
    with manager.verified(shard) as buf:
        mock_backend.flip_bit(buf, 10)
    with pytest.raises(AuditError):
        manager.verify_sealed(shard)
    with pytest.raises((AuditError, SealVerificationFailed)), manager.verified(shard):
        pytest.fail("a corrupted shard must not be handed out")


def test_audit_required_without_a_sink_refuses_to_start(
    make_plugin_manager: Any, mock_backend: Any
) -> None:
    with pytest.raises(AuditError, match="no durable audit sink") as info:
        VramManager(TEST_TOKEN, allocator=mock_backend, plugin_manager=make_plugin_manager())
    assert "audit='disabled'" in str(info.value)
    with pytest.raises(AuditError):
        VramManager(
            TEST_TOKEN,
            allocator=mock_backend,
            plugin_manager=make_plugin_manager(CapturePlugin()),
            audit="required",
        )


def test_audit_disabled_works_without_a_sink(make_plugin_manager: Any, mock_backend: Any) -> None:
    plugin = CapturePlugin(CapturingSink())
    with VramManager(
        TEST_TOKEN,
        allocator=mock_backend,
        plugin_manager=make_plugin_manager(plugin),
        audit="disabled",
    ) as manager:
        shard = manager.seal_model(b"x" * 100)
        manager.verify_sealed(shard)
        assert manager.sinks == ()
    assert plugin.contexts == []  # no sink was even asked for
    assert mock_backend.live_allocations == 0


@pytest.mark.parametrize("audit", ["optional", "", None, "DISABLED", True])
def test_invalid_audit_value(make_plugin_manager: Any, mock_backend: Any, audit: Any) -> None:
    with pytest.raises(InvalidInput, match="audit must be"):
        VramManager(
            TEST_TOKEN, allocator=mock_backend, plugin_manager=make_plugin_manager(), audit=audit
        )


def test_a_sink_failing_to_close_is_reported_after_cleanup(
    new_manager: Any, mock_backend: Any
) -> None:
    class BadClose(CapturingSink):
        name = "bad-close"

        def close(self) -> None:
            raise OSError("fsync failed")

    capture = CapturingSink()
    manager = new_manager(mock_backend, CapturePlugin(BadClose(), capture))
    manager.seal_model(b"x" * 100, shard_id="s")
    with pytest.raises(AuditError, match="fsync failed"):
        manager.close()
    assert capture.closed
    assert mock_backend.live_allocations == 0
    manager.close()  # idempotent, and quiet the second time
    with pytest.raises(VramError, match="closed"):
        manager.seal_model(b"x")


def test_only_non_durable_sinks_do_not_satisfy_audit_required(
    make_plugin_manager: Any, mock_backend: Any
) -> None:
    class TraceOnly(CapturingSink):
        name = "trace-only"
        durable = False

    trace = TraceOnly()
    with pytest.raises(AuditError, match=r"sinks: trace-only"):
        VramManager(
            TEST_TOKEN,
            allocator=mock_backend,
            plugin_manager=make_plugin_manager(CapturePlugin(trace)),
        )
    assert trace.closed
    durable = CapturingSink()
    with VramManager(
        TEST_TOKEN,
        allocator=mock_backend,
        plugin_manager=make_plugin_manager(CapturePlugin(TraceOnly(), durable)),
    ) as manager:
        manager.seal_model(b"x")
    assert durable.types() == ["vram.allocated", "vram.sealed", "vram.deallocated"]


@pytest.mark.parametrize("step", ["allocate", "copy", "digest"])
def test_a_narration_wrapper_raising_after_a_step_leaks_nothing(
    new_manager: Any, mock_backend: Any, step: str
) -> None:
    from vramcore import hookimpl

    class BrokenTracer:
        @hookimpl(wrapper=True)
        def vramcore_operation(self, op: Any) -> Any:
            result = yield
            if op.name == step:
                raise RuntimeError("tracer broke after the step")
            return result

    sink = CapturingSink()
    manager = new_manager(mock_backend, BrokenTracer(), sink=sink)
    with pytest.raises(RuntimeError, match="tracer broke"):
        manager.seal_model(b"x" * 70000, shard_id="s")
    assert mock_backend.live_allocations == 0
    assert mock_backend.used_bytes() == 0 == manager.used_vram()
    assert sink.types()[-2:] == ["vram.allocation_failed", "vram.deallocated"]
    assert manager.shards() == []
