"""The README's install lines work on a fresh virtual environment, exactly as written.

One venv, built once for the module: ``pip install ./ ./plugins/allocator_mock`` (core and
mock), then ``./plugins/audit_chain``, ``./plugins/audit_tracing`` and the example sink, each
followed by the commands the README says to run next. Slow (it builds five wheels and installs
their dependencies from the package index): marked ``slow``, and run by ``./dev test`` and CI
all the same; ``pytest -m "not slow"`` leaves it out of a quick local run.
"""

from __future__ import annotations

import os
import re
import subprocess
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TOKEN = "install-test-token-3b7e5a0c9d1f"
#: The README's install subsections, in the order a reader follows them.
STAGES = [
    "### Core and the mock backend",
    "### The audit chain",
    "### Tracing",
    "### The example sink",
]


def _install_block(title: str) -> list[str]:
    """The ``pip install`` lines of the README's fenced block that follows ``title``."""
    start = README.index(title)
    begin = README.index("```sh", start)
    block = README[begin : README.index("```\n", begin + 5)]
    return [line.strip() for line in block.splitlines() if line.strip().startswith("pip install")]


class Venv:
    """A fresh virtual environment and a clean environment to run its commands in."""

    def __init__(self, path: Path) -> None:
        venv.create(path, with_pip=True, clear=True)
        self.bin = path / "bin"
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("VRAMCORE_", "UV_", "PYTHON", "VIRTUAL_ENV"))
        }
        self.env["PATH"] = f"{self.bin}{os.pathsep}{self.env.get('PATH', '')}"
        self.env["VIRTUAL_ENV"] = str(path)
        self.done: set[str] = set()

    def stage(self, title: str) -> None:
        """Install the README block ``title`` and every block before it, once each."""
        for earlier in STAGES[: STAGES.index(title) + 1]:
            if earlier not in self.done:
                for line in _install_block(earlier):
                    self.run(f"{line} --quiet")
                self.done.add(earlier)

    def run(self, line: str, *, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
        """Run a README line (``pip install ...``, ``vramcore ...``) from the repository root."""
        proc = subprocess.run(
            ["/bin/sh", "-c", line],
            cwd=ROOT,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if check:
            assert proc.returncode == 0, f"{line}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    return Venv(tmp_path_factory.mktemp("install") / "venv")


def test_readme_gives_install_lines_from_the_clone_only() -> None:
    lines = _install_block("### Core and the mock backend")
    assert lines == ["pip install ./ ./plugins/allocator_mock"]
    # No advice anywhere to install a name this project does not publish on an index.
    for text in (README, (ROOT / "vramcore" / "plugins.py").read_text()):
        assert not re.search(r"pip install ['\"]?vramcore", text), "unpublished name advised"


def test_core_and_mock(fresh: Venv, tmp_path: Path) -> None:
    fresh.stage("### Core and the mock backend")
    proc = fresh.run("vramcore demo")
    assert "demo     OK" in proc.stdout
    assert "audit disabled" in proc.stderr  # no audit plugin yet, and it says how to add one
    assert "pip install ./plugins/audit_chain" in proc.stderr
    proc = fresh.run("vramcore plugins --json")
    assert '"mock"' in proc.stdout


def test_audit_chain(fresh: Venv, tmp_path: Path) -> None:
    fresh.stage("### The audit chain")
    log = tmp_path / "audit"
    model = tmp_path / "model.bin"
    model.write_bytes(os.urandom(1 << 20))
    env = {"VRAMCORE_WORKER_TOKEN": TOKEN, "VRAMCORE_AUDIT_LOG": str(log)}
    proc = fresh.run(f"vramcore seal {model}", **env)
    assert "audit_chain" in proc.stdout
    key = log / "auditor-initial.key"
    proc = fresh.run(f"vramcore audit verify {log} --key-file {key}", **env)
    assert proc.stdout.startswith("OK")
    # The demo's hint runs as printed in this venv.
    proc = fresh.run("vramcore demo --keep-audit-log")
    hint = next(line for line in proc.stdout.splitlines() if "check it offline:" in line)
    command = hint.split("check it offline: ", 1)[1]
    assert fresh.run(command).stdout.startswith("OK")


def test_tracing_and_the_example_sink(fresh: Venv, tmp_path: Path) -> None:
    fresh.stage("### The example sink")
    proc = fresh.run("vramcore plugins --json")
    for name in ('"audit_tracing"', '"example_jsonl"', '"audit_chain"', '"mock"'):
        assert name in proc.stdout
    events = tmp_path / "events.jsonl"
    fresh.run(
        "vramcore bench --size 1MiB --repeat 1",
        VRAMCORE_WORKER_TOKEN=TOKEN,
        VRAMCORE_PLUGINS="mock,example_jsonl",
        VRAMCORE_EXAMPLE_JSONL=str(events),
    )
    assert '"vram.sealed"' in events.read_text()


def test_the_installed_core_carries_its_licence(fresh: Venv) -> None:
    proc = fresh.run(
        'python -c "import importlib.metadata as m; '
        "print(m.metadata('vramcore')['License-Expression'])\""
    )
    assert proc.stdout.strip() == "Apache-2.0"
