"""``python -m vramcore`` and ``vramcore --version`` (the core's and each plugin's version)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

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
