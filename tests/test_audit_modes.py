"""Audit modes: ``required`` fails closed, ``best_effort`` never stops an operation, ``disabled``.

``best_effort`` is for telemetry-only deployments: every event still reaches every sink (the
tracing sink included), a sink's failure is logged and reported through
``vramcore_audit_failure`` like any other, and no sink failure, on a critical event either,
stops the operation.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from vramcore import hookimpl
from vramcore._cli.cli import main
from vramcore.audit import AUDIT_MODES, AuditSink, AuditTrail, PluginKeys
from vramcore.errors import AuditError, InvalidInput
from vramcore.events import AuditEvent, VramDeallocated, VramSealed
from vramcore.seal import WorkerToken
from vramcore.testing import TEST_TOKEN, CapturePlugin, CapturingSink, FailingSink


class Telemetry(CapturingSink):
    """A narration-only sink (like the tracing plugin's): not durable."""

    name = "telemetry"
    durable = False


class FailureRecorder:
    """Records what ``vramcore_audit_failure`` reports."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, str]] = []

    @hookimpl
    def vramcore_audit_failure(
        self, sink_name: str, event: AuditEvent, error: BaseException
    ) -> None:
        self.reports.append((sink_name, event.event_type))


def _context() -> PluginKeys:
    return PluginKeys(WorkerToken(TEST_TOKEN), worker_id="w", device=0)


def _sealed() -> VramSealed:
    return VramSealed(
        worker_id="w",
        shard_id="s",
        device=0,
        nbytes=1,
        digest="0" * 64,
        digest_alg="rfc6962-sha256",
        leaf_size=65536,
        backend="mock",
    )


def _trail(make_plugin_manager: Any, mode: Any, *sinks: AuditSink) -> tuple[AuditTrail, Any]:
    recorder = FailureRecorder()
    trail = AuditTrail(make_plugin_manager(CapturePlugin(*sinks), recorder), 5.0, mode=mode)
    trail.start(_context())
    return trail, recorder


def test_the_modes() -> None:
    assert AUDIT_MODES == ("required", "best_effort", "disabled")


def test_best_effort_delivers_to_every_sink_and_never_fails_closed(
    make_plugin_manager: Any, caplog: pytest.LogCaptureFixture
) -> None:
    telemetry = Telemetry()
    trail, recorder = _trail(make_plugin_manager, "best_effort", FailingSink(), telemetry)
    event = _sealed()
    assert event.critical
    with caplog.at_level(logging.WARNING, logger="vramcore.audit"):
        trail.emit(event)  # no AuditError: no sink can stop the operation
    assert telemetry.events == [event]
    assert recorder.reports == [("failing", "vram.sealed")]
    assert "audit mode best_effort" in caplog.text
    trail.close()


def test_required_fails_closed_on_the_same_failure(make_plugin_manager: Any) -> None:
    trail, recorder = _trail(make_plugin_manager, "required", FailingSink(), CapturingSink())
    with pytest.raises(AuditError, match="fail closed"):
        trail.emit(_sealed())
    assert recorder.reports == [("failing", "vram.sealed")]
    trail.close()


def test_best_effort_starts_with_telemetry_only(make_plugin_manager: Any) -> None:
    telemetry = Telemetry()
    trail, _ = _trail(make_plugin_manager, "best_effort", telemetry)
    assert trail.sinks == (telemetry,)
    with pytest.raises(AuditError, match="best_effort"):
        _trail(make_plugin_manager, "required", Telemetry())  # no durable sink
    trail.close()


def test_disabled_collects_no_sink(make_plugin_manager: Any) -> None:
    trail, _ = _trail(make_plugin_manager, "disabled", CapturingSink())
    assert not trail.enabled
    assert trail.sinks == ()


def test_best_effort_non_critical_failures_are_reported_too(make_plugin_manager: Any) -> None:
    trail, recorder = _trail(make_plugin_manager, "best_effort", FailingSink())
    event = VramDeallocated(worker_id="w", shard_id="s", device=0, nbytes=1)
    trail.emit(event)
    assert recorder.reports == [("failing", "vram.deallocated")]
    trail.close()


@pytest.mark.parametrize("mode", ["best-effort", "Required", "", None, 1])
def test_an_unknown_mode_is_refused(make_plugin_manager: Any, mode: Any) -> None:
    with pytest.raises(InvalidInput, match="audit must be one of required, best_effort, disabled"):
        AuditTrail(make_plugin_manager(), mode=mode)


# -- the manager ----------------------------------------------------------------------------


def test_a_manager_in_best_effort_seals_through_a_failing_sink(
    new_manager: Any, mock_backend: Any
) -> None:
    telemetry = Telemetry()
    recorder = FailureRecorder()
    manager = new_manager(
        mock_backend, CapturePlugin(FailingSink(), telemetry), recorder, audit="best_effort"
    )
    shard = manager.seal_model(b"w" * 70_000)  # vram.sealed is critical: required would refuse
    manager.verify_sealed(shard)
    manager.deallocate(shard)
    assert telemetry.types() == [
        "vram.allocated",
        "vram.sealed",
        "seal.verified",
        "vram.deallocated",
    ]
    assert ("failing", "vram.sealed") in recorder.reports
    assert mock_backend.live_allocations == 0


def test_the_same_manager_in_required_mode_refuses_the_seal(
    new_manager: Any, mock_backend: Any
) -> None:
    manager = new_manager(mock_backend, CapturePlugin(FailingSink(), CapturingSink()))
    with pytest.raises(AuditError, match="fail closed"):
        manager.seal_model(b"w" * 70_000)
    assert mock_backend.live_allocations == 0


def test_best_effort_starts_with_telemetry_only_and_required_does_not(
    new_manager: Any, mock_backend: Any
) -> None:
    telemetry = Telemetry()
    manager = new_manager(mock_backend, CapturePlugin(telemetry), audit="best_effort")
    assert manager.sinks == (telemetry,)
    with pytest.raises(AuditError, match="no durable audit sink"):
        new_manager(mock_backend, CapturePlugin(Telemetry()))


# -- the CLI --------------------------------------------------------------------------------


@pytest.fixture
def telemetry_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A worker with the mock and the tracing plugin only: no durable sink."""
    for name in list(os.environ):
        if name.startswith("VRAMCORE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("VRAMCORE_CONFIG", str(tmp_path / "none.toml"))
    (tmp_path / "none.toml").write_text("")
    monkeypatch.setenv("VRAMCORE_PLUGINS", "mock,audit_tracing")
    monkeypatch.setenv("VRAMCORE_ALLOCATOR", "mock")
    monkeypatch.setenv("VRAMCORE_WORKER_TOKEN", TEST_TOKEN)
    model = tmp_path / "m.bin"
    model.write_bytes(b"m" * 70_000)
    return model


def test_the_cli_seals_telemetry_only_in_best_effort(
    telemetry_only: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["seal", str(telemetry_only)]) == 2
    assert "no durable audit sink" in capsys.readouterr().err
    monkeypatch.setenv("VRAMCORE_AUDIT_MODE", "best_effort")
    assert main(["seal", str(telemetry_only), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["attestation"]["vram_bytes"] == 70_000


def test_the_cli_refuses_disabled_as_an_audit_mode(
    telemetry_only: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VRAMCORE_AUDIT_MODE", "disabled")
    assert main(["seal", str(telemetry_only)]) == 2
    err = capsys.readouterr().err
    assert "VRAMCORE_AUDIT_MODE='disabled' must be required or best_effort" in err
