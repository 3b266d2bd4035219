"""``python -m vramcore`` and ``vramcore --version`` (the core's and each plugin's version)."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vramcore import __version__
from vramcore._cli.cli import main


def test_python_m_vramcore_runs_the_cli() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRAMCORE_")}
    proc = subprocess.run(
        [sys.executable, "-m", "vramcore", "--version"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"vramcore {__version__}"
    mock = importlib.metadata.version("vramcore-allocator-mock")
    chain = importlib.metadata.version("vramcore-audit-chain")
    assert f"  plugin mock: vramcore-allocator-mock {mock}" in lines
    assert f"  plugin audit_chain: vramcore-audit-chain {chain}" in lines


def test_version_lists_only_the_loaded_plugins(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VRAMCORE_PLUGINS", "mock")
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1:] == [
        f"  plugin mock: vramcore-allocator-mock "
        f"{importlib.metadata.version('vramcore-allocator-mock')}"
    ]


# -- logging --------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("VRAMCORE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("VRAMCORE_CONFIG", str(tmp_path / "none.toml"))
    (tmp_path / "none.toml").write_text("")
    yield
    for handler in list(logging.getLogger().handlers):
        if getattr(handler, "_vramcore_cli", False):
            logging.getLogger().removeHandler(handler)


@pytest.mark.usefixtures("clean_env")
def test_json_logs_are_one_object_per_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VRAMCORE_LOG_FORMAT", "json")
    assert main(["demo", "-v", "--no-audit", "--allocator", "mock"]) == 0
    # A plugin logging under its own module name reaches the same handler.
    logging.getLogger("vramcore_some_plugin").warning("plugin says \x1b[31mhi\u202e")
    logging.getLogger("urllib3").warning("not ours")
    err = capsys.readouterr().err
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    loggers = {r["logger"] for r in records}
    assert "vramcore" in loggers  # the manager's start, shown with -v
    assert "urllib3" not in loggers
    plugin = next(r for r in records if r["logger"] == "vramcore_some_plugin")
    assert plugin["level"] == "WARNING" and plugin["message"] == "plugin says \x1b[31mhi\u202e"
    assert "\x1b" not in err and "\u202e" not in err  # escaped on the way out
    assert set(plugin) == {"time", "level", "logger", "message"}


@pytest.mark.usefixtures("clean_env")
def test_without_v_only_warnings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--no-audit", "--allocator", "mock"]) == 0
    logging.getLogger("vramcore.narration").warning("narration is for -v")
    logging.getLogger("vramcore_some_plugin").info("an info line")
    logging.getLogger("vramcore_some_plugin").warning("a warning line")
    err = capsys.readouterr().err
    assert "vramcore: vramcore_some_plugin: a warning line" in err
    assert "an info line" not in err and "narration is for -v" not in err


@pytest.mark.usefixtures("clean_env")
def test_an_unknown_log_format_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VRAMCORE_LOG_FORMAT", "xml")
    assert main(["plugins"]) == 2
    err = capsys.readouterr().err
    assert err == "vramcore: error: VRAMCORE_LOG_FORMAT='xml' must be text or json\n"
