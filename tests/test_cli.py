"""The vramcore CLI: every core command, --json, exit codes, no secret in any output."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vramcore._cli.cli import main
from vramcore.safetensors import write_safetensors

TOKEN = "khbCyG6BzWHsNBpH1TJFDmUWDUTwQLB1tmEqB7B1HUU"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VRAMCORE_WORKER_TOKEN", TOKEN)
    monkeypatch.setenv("VRAMCORE_AUDIT_LOG", str(tmp_path / "audit"))
    monkeypatch.setenv("VRAMCORE_MOCK_VRAM", "1GiB")
    monkeypatch.setenv("VRAMCORE_ALLOCATOR", "mock")  # the mock is used only when named
    monkeypatch.delenv("VRAMCORE_PLUGINS", raising=False)
    monkeypatch.delenv("VRAMCORE_DISABLE_PLUGINS", raising=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert TOKEN not in out + err
    return code, out, err


def model(tmp_path: Path) -> Path:
    path = tmp_path / "m.safetensors"
    with path.open("wb") as fh:
        write_safetensors(
            fh,
            {"a.weight": ("U8", [70000], os.urandom(70000)), "b.bias": ("U8", [300], b"x" * 300)},
        )
    return path


def test_plugins_lists_mock_backend_and_hooks(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "plugins", "--json")
    data = json.loads(out)
    assert code == 0
    names = {p["name"]: p for p in data["plugins"]}
    assert "vramcore_allocator_backends" in names["mock"]["hooks"]
    assert names["mock"]["distribution"] == "vramcore-allocator-mock"
    mock = next(b for b in data["backends"] if b["name"] == "mock")
    assert mock["viable"] is True and mock["reason"] is None
    assert data["failures"] == []


def test_plugins_human_output(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "plugins")
    assert code == 0
    assert "Allocator backends:" in out and "mock" in out


def test_devices_reports_policy_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "devices", "--json")
    data = json.loads(out)
    assert code == 0
    assert data["backend"] == "mock"
    assert data["devices"][0]["policy_ok"] is True
    assert data["devices"][0]["total_bytes"] == 1 << 30


def test_unknown_allocator_is_usage_error_listing_choices(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run(capsys, "devices", "--allocator", "nope")
    assert code == 2
    assert "unknown --allocator 'nope'" in err
    assert "mock" in err.split("choose one of:")[1]
    assert "Traceback" not in err


def test_seal_prints_attestation_without_signature(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = model(tmp_path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    code, out, _ = run(capsys, "seal", str(path), "--json", "--no-audit", "--expect-sha256", sha)
    data = json.loads(out)
    assert code == 0
    att = data["attestation"]
    assert att["file_sha256"] == sha
    assert att["vram_bytes"] == path.stat().st_size
    assert "signature" not in att
    assert [t[0] for t in att["tensors"]] == ["a.weight", "b.bias"]
    # Timings are reported, not judged: on a loaded machine a 70 kB seal rounds to 0.000 GiB/s.
    assert data["seal_seconds"] > 0 and data["verify_seconds"] > 0
    assert data["seal_throughput_gib_s"] >= 0 and data["verify_throughput_gib_s"] >= 0


def test_seal_wrong_sha256_is_integrity_failure(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(
        capsys, "seal", str(model(tmp_path)), "--no-audit", "--expect-sha256", "0" * 64
    )
    assert code == 1
    assert "SHA-256 mismatch" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["seal", "/nonexistent/file.bin", "--no-audit"], "no such file"),
        (["seal", "FILE", "--expect-sha256", "xyz", "--no-audit"], "--expect-sha256 must be 64"),
        (["seal", "FILE", "--device", "7", "--no-audit"], "--device 7: device 7 does not exist"),
        (["seal", "FILE", "--shard-id", "../etc", "--no-audit"], "--shard-id"),
    ],
)
def test_seal_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], message: str
) -> None:
    path = model(tmp_path)
    code, _, err = run(capsys, *[str(path) if a == "FILE" else a for a in args])
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_missing_audit_sink_is_configuration_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VRAMCORE_PLUGINS", "mock")  # no sink plugin loaded
    code, _, err = run(capsys, "seal", str(model(tmp_path)))
    assert code == 2
    assert "no durable audit sink" in err
    # The advice is the CLI's (flags, variables, a path in the clone), not the Python API's.
    assert "--no-audit" in err and "VRAMCORE_AUDIT_LOG" in err
    assert "pip install ./plugins/audit_chain" in err
    assert "audit='disabled'" not in err


def test_narration_only_sink_does_not_satisfy_required_audit(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VRAMCORE_PLUGINS", "mock,audit_tracing")
    code, _, err = run(capsys, "seal", str(model(tmp_path)))
    assert code == 2
    assert "no durable audit sink is configured" in err


def test_demo_detects_tamper_and_names_tensor(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "demo", "--json")
    data = json.loads(out)
    assert code == 0
    assert data["ok"] is True
    assert data["tamper"]["detected"] is True
    assert data["tamper"]["tensors"] == ["layers.1.mlp.up.weight"]
    start, end = data["tamper"]["byte_range"]
    assert start <= data["tamper"]["offset"] < end


def test_demo_without_audit_plugins_still_runs(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VRAMCORE_PLUGINS", "mock")
    monkeypatch.delenv("VRAMCORE_AUDIT_LOG")
    code, out, err = run(capsys, "demo")
    assert code == 0
    assert "demo     OK" in out
    assert "audit disabled" in err
    assert "pip install ./plugins/audit_chain" in err


def test_demo_removes_its_temporary_audit_log_unless_kept(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import tempfile

    monkeypatch.delenv("VRAMCORE_AUDIT_LOG")
    monkeypatch.delenv("VRAMCORE_WORKER_TOKEN")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code, out, _ = run(capsys, "demo")
    assert code == 0, out
    assert not list(tmp_path.glob("vramcore-demo-audit-*"))
    assert "VRAMCORE_AUDIT_LOG" not in os.environ
    code, out, _ = run(capsys, "demo", "--keep-audit-log")
    assert code == 0
    (kept,) = tmp_path.glob("vramcore-demo-audit-*")
    # The hint is a command that works as printed: run it.
    hint = next(line for line in out.splitlines() if "hint: check it offline:" in line)
    command = hint.split("check it offline: ", 1)[1].split()
    assert command[0] != "vramcore" or os.environ.get("PATH", "")  # absolute unless on PATH
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert str(kept) in hint


def test_bench_prints_ratios_against_baseline(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        "bench",
        "--size",
        "64KiB",
        "--size",
        "1MiB",
        "--workers",
        "2",
        "--repeat",
        "1",
        "--tensors",
        "2000",
        "--json",
        "--no-audit",
    )
    data = json.loads(out)
    assert code == 0
    rows = {(r["what"], r["size"]): r for r in data["results"]}
    assert rows[("sha256 (1 thread)", 1 << 20)]["vs_sha256"] == pytest.approx(1.0)
    for what in ("seal_model", "seal_file", "verify", "verify sampled 1%"):
        assert rows[(what, 1 << 20)]["workers"] == 2
        assert rows[(what, 65536)]["gib_s"] > 0
    assert data["fixed_verify_cost_us"] > 0
    assert data["header_parse"]["tensors"] == 2000


@pytest.mark.parametrize(
    "args",
    [
        ["--sample", "0"],
        ["--sample", "1.5"],
        ["--workers", "0"],
        ["--size", "x"],
        ["--tensors", "-1"],
    ],
)
def test_bench_bad_options_exit_2(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    code, _, err = run(capsys, "bench", *args, "--no-audit")
    assert code == 2
    assert "Traceback" not in err


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys)
    assert code == 2
    assert "usage: vramcore" in err


def test_unknown_command_exits_2_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "frobnicate")
    assert code == 2
    assert err.count("\n") == 1 and "invalid choice" in err and out == ""


@pytest.mark.slow
def test_console_script_runs_as_a_process(tmp_path: Path) -> None:
    env = {**os.environ, "VRAMCORE_WORKER_TOKEN": TOKEN, "VRAMCORE_AUDIT_LOG": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "vramcore._cli.cli", "demo", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"] is True
    assert TOKEN not in proc.stdout + proc.stderr


def test_plugins_reports_a_broken_plugin_and_keeps_going(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import importlib.metadata

    import vramcore.plugins

    (tmp_path / "broken_vramcore_plugin.py").write_text("raise ImportError('no CUDA here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real = importlib.metadata.entry_points

    def with_broken(**kwargs: Any) -> Any:
        found = list(real(**kwargs))
        if kwargs.get("group") == "vramcore":
            found.append(
                importlib.metadata.EntryPoint("broken", "broken_vramcore_plugin", "vramcore")
            )
        return found

    monkeypatch.setattr(vramcore.plugins.importlib.metadata, "entry_points", with_broken)
    code, out, _ = run(capsys, "plugins", "--json")
    data = json.loads(out)
    assert code == 0
    assert [f["name"] for f in data["failures"]] == ["broken"]
    assert "no CUDA here" in data["failures"][0]["error"]
    assert "mock" in {p["name"] for p in data["plugins"]}
    code, out, err = run(capsys, "plugins")
    assert "Failed plugins (skipped):" in out
    assert "no CUDA here" in out
    assert "vramcore: warning: plugin broken" in err


def test_unknown_backend_says_what_to_install_and_escapes_hostile_names(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VRAMCORE_ALLOCATOR", "nosuchbackend")
    code, _, err = run(capsys, "devices")
    assert code == 2
    assert "VRAMCORE_ALLOCATOR 'nosuchbackend'" in err
    assert "pip install vramcore-allocator-nosuchbackend" not in err  # a name nobody published
    monkeypatch.setenv("VRAMCORE_ALLOCATOR", "x\x1b[31m")
    code, _, err = run(capsys, "devices")
    assert code == 2
    assert "\x1b" not in err


def test_audit_chain_installed_but_unconfigured_says_which_variable(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VRAMCORE_AUDIT_LOG")
    code, _, err = run(capsys, "seal", str(model(tmp_path)))
    assert code == 2
    assert "the audit chain plugin is installed but VRAMCORE_AUDIT_LOG is not set" in err
    assert "pip install" not in err


def test_seal_without_expected_hash_says_it_was_not_computed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = run(capsys, "seal", str(model(tmp_path)), "--no-audit")
    assert code == 0
    assert "sha256 not computed (give --expect-sha256 to check it)" in out
    assert "None" not in out
