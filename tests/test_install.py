"""Every ``pip install`` line of every Markdown file works, exactly as written, from a clone.

The lines are read from the repository's ``*.md`` files (fenced blocks and inline code), so a
README cannot advise a line this test does not know about. Fast checks, on every line: each
requirement is a folder of this repository (with extras it defines) or a third-party package
on the allowlist below; no line names a ``vramcore`` distribution as if it were on a package
index (it is not: anyone could register the name). Slow checks (marked ``slow``): each line
runs in a fresh virtual environment of its own and the plugins it installs load; then the
root README's workflow runs in one environment: the demo, a seal and ``audit verify``, the
tracing plugin and the example sink.

A few lines cannot run here, and :data:`NOT_HERE` says why (each entry must still match a
line): PyCUDA's source build needs the CUDA toolkit (the tested route is
``scripts/build-pycuda-wheel``, see ``plugins/allocator_pycuda/tests``), and the GPU machine's
offline install takes the wheels that script writes.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tomllib
import venv
from pathlib import Path

import attrs
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TOKEN = "et8h4hLIDJS2e7q88ufhbsf3RajYt-XgFg9ZtSpiYz4"
#: Packages of other projects the docs may tell a reader to install (each one checked by hand).
THIRD_PARTY = {"opentelemetry-sdk", "opentelemetry-exporter-otlp", "opentelemetry-distro"}
#: Lines that cannot run on this machine, by a part of their text, and why.
NOT_HERE = {
    "allocator_pycuda[pycuda]": "builds PyCUDA from source: needs the CUDA toolkit and driver",
    "dist/gpu-wheels/": "the GPU machine's offline install of scripts/build-pycuda-wheel's wheels",
}
#: Folders never searched for documentation (environments, caches, build output).
_SKIP = {".venv", ".dev", ".git", "node_modules", "dist", "build", ".mypy_cache", ".ruff_cache"}


@attrs.frozen
class InstallLine:
    """One ``pip install`` line of one Markdown file."""

    doc: Path
    lineno: int
    text: str

    def __str__(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.lineno}"

    def __repr__(self) -> str:
        return f"{self}: {self.text}"

    @property
    def requirements(self) -> list[str]:
        """The requirement arguments (options left out)."""
        words = shlex.split(self.text, comments=True)
        assert words[:2] == ["pip", "install"], self
        return [w for w in words[2:] if not w.startswith("-")]

    @property
    def command(self) -> str:
        """The line without its comment, re-quoted for ``sh``."""
        return shlex.join(shlex.split(self.text, comments=True))

    @property
    def runnable_here(self) -> bool:
        """Whether this machine can run it (see :data:`NOT_HERE`)."""
        return not any(part in self.text for part in NOT_HERE)


def _docs() -> list[Path]:
    return sorted(
        path
        for path in ROOT.rglob("*.md")
        if not _SKIP.intersection(path.relative_to(ROOT).parts[:-1])
    )


def _install_lines() -> list[InstallLine]:
    lines = []
    for doc in _docs():
        fenced = False
        for lineno, raw in enumerate(doc.read_text().splitlines(), 1):
            if raw.lstrip().startswith("```"):
                fenced = not fenced
                continue
            texts = [raw.strip().removeprefix("$ ")] if fenced else re.findall(r"`([^`]+)`", raw)
            lines += [InstallLine(doc, lineno, t) for t in texts if t.startswith("pip install ")]
    return lines


LINES = _install_lines()
UNIQUE = sorted({line.command: line for line in LINES}.values(), key=str)


def test_the_docs_have_install_lines() -> None:
    docs = {line.doc.relative_to(ROOT).as_posix() for line in LINES}
    assert {
        "README.md",
        "plugins/allocator_mock/README.md",
        "plugins/allocator_cupy/README.md",
        "plugins/allocator_pycuda/README.md",
        "plugins/audit_chain/README.md",
        "plugins/audit_tracing/README.md",
        "examples/audit_sink_jsonl/README.md",
    } <= docs


def test_every_not_here_entry_matches_a_line() -> None:
    for part in NOT_HERE:
        assert any(part in line.text for line in LINES), f"stale NOT_HERE entry {part!r}"


def _extras(folder: Path) -> set[str]:
    project = tomllib.loads((folder / "pyproject.toml").read_text())["project"]
    return set(project.get("optional-dependencies", {}))


@pytest.mark.parametrize("line", LINES, ids=str)
def test_each_requirement_is_a_folder_here_or_an_allowed_package(line: InstallLine) -> None:
    assert line.requirements, repr(line)
    for requirement in line.requirements:
        if "/" not in requirement:
            assert not requirement.lower().startswith("vramcore"), (
                f"{line!r}: {requirement} is not on any package index (install from the clone)"
            )
            assert requirement in THIRD_PARTY, f"{line!r}: {requirement} is not on the allowlist"
            continue
        path, _, extras = requirement.partition("[")
        if "*" in path:  # built wheels: only the ones NOT_HERE explains
            assert not line.runnable_here, repr(line)
            continue
        folder = ROOT / path
        assert (folder / "pyproject.toml").is_file(), f"{line!r}: {path} is not a distribution here"
        wanted = {e.strip() for e in extras.rstrip("]").split(",") if e.strip()}
        assert wanted <= _extras(folder), f"{line!r}: unknown extras {wanted - _extras(folder)}"


def test_no_advice_to_install_an_unpublished_name() -> None:
    core = ROOT / "vramcore"
    sources = [*_docs(), core / "plugins.py", core / "_cli" / "support.py"]
    for path in sources:
        text = path.read_text()
        assert not re.search(r"pip install ['\"]?vramcore", text), f"{path}: unpublished name"


# -- slow: run them -------------------------------------------------------------------------


class Venv:
    """A fresh virtual environment and a clean environment to run its commands in.

    ``TMPDIR`` points into the test's own directory: nothing is left in the system one.
    """

    def __init__(self, path: Path) -> None:
        venv.create(path, with_pip=True, clear=True)
        self.bin = path / "bin"
        tmp = path.parent / f"{path.name}-tmp"
        tmp.mkdir(exist_ok=True)
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("VRAMCORE_", "UV_", "PYTHON", "VIRTUAL_ENV"))
        }
        self.env |= {
            "PATH": f"{self.bin}{os.pathsep}{self.env.get('PATH', '')}",
            "VIRTUAL_ENV": str(path),
            "TMPDIR": str(tmp),
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "VRAMCORE_CONFIG": str(path.parent / "no-config.toml"),
        }
        (path.parent / "no-config.toml").write_text("")
        #: The README install stages already run here.
        self.done: set[str] = set()

    def run(self, line: str, *, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
        """Run a docs line (``pip install ...``, ``vramcore ...``) from the repository root."""
        proc = subprocess.run(
            ["/bin/sh", "-c", line],
            cwd=ROOT,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if check:
            assert proc.returncode == 0, f"{line}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc


def _entry_points(line: InstallLine) -> set[str]:
    """The ``vramcore`` entry points of the folders a line installs."""
    names = set()
    for requirement in line.requirements:
        folder = ROOT / requirement.partition("[")[0]
        if (folder / "pyproject.toml").is_file():
            project = tomllib.loads((folder / "pyproject.toml").read_text())["project"]
            names |= set(project.get("entry-points", {}).get("vramcore", {}))
    return names


@pytest.mark.slow
@pytest.mark.parametrize("line", [line for line in UNIQUE if line.runnable_here], ids=str)
def test_each_line_installs_in_a_fresh_environment(line: InstallLine, tmp_path: Path) -> None:
    env = Venv(tmp_path / "venv")
    env.run(f"{line.command} --quiet")
    plugins = _entry_points(line)
    if plugins or "./" in line.requirements:
        proc = env.run("vramcore plugins --json")
        for name in plugins:
            assert f'"{name}"' in proc.stdout, f"{line!r}: plugin {name} did not load"
        assert '"failures": []' in proc.stdout


# -- slow: the README's workflow in one environment ------------------------------------------


def _readme_block(title: str) -> list[str]:
    """The ``pip install`` lines of the README's fenced block that follows ``title``."""
    start = README.index(title)
    begin = README.index("```sh", start)
    block = README[begin : README.index("```\n", begin + 5)]
    return [line.strip() for line in block.splitlines() if line.strip().startswith("pip install")]


#: The README's install subsections, in the order a reader follows them.
STAGES = [
    "### Core and the mock backend",
    "### The audit chain",
    "### Tracing",
    "### The example sink",
]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    return Venv(tmp_path_factory.mktemp("install") / "venv")


def _stage(env: Venv, title: str) -> None:
    """Install the README block ``title`` and every block before it, once each."""
    for earlier in STAGES[: STAGES.index(title) + 1]:
        if earlier not in env.done:
            for line in _readme_block(earlier):
                env.run(f"{shlex.join(shlex.split(line, comments=True))} --quiet")
            env.done.add(earlier)


def test_readme_gives_install_lines_from_the_clone_only() -> None:
    lines = _readme_block("### Core and the mock backend")
    assert lines == ["pip install ./ ./plugins/allocator_mock"]


@pytest.mark.slow
def test_core_and_mock(fresh: Venv) -> None:
    _stage(fresh, "### Core and the mock backend")
    proc = fresh.run("vramcore demo --allocator mock")  # the mock only when named
    assert "demo     OK" in proc.stdout
    assert "audit disabled" in proc.stderr  # no audit plugin yet, and it says how to add one
    assert "pip install ./plugins/audit_chain" in proc.stderr
    proc = fresh.run("vramcore plugins --json")
    assert '"mock"' in proc.stdout


@pytest.mark.slow
def test_audit_chain(fresh: Venv, tmp_path: Path) -> None:
    _stage(fresh, "### The audit chain")
    log = tmp_path / "audit"
    model = tmp_path / "model.bin"
    model.write_bytes(os.urandom(1 << 20))
    env = {"VRAMCORE_WORKER_TOKEN": TOKEN, "VRAMCORE_AUDIT_LOG": str(log)}
    proc = fresh.run(f"vramcore seal {model} --allocator mock", **env)
    assert "audit_chain" in proc.stdout
    key = log / "auditor-initial.key"
    proc = fresh.run(f"vramcore audit verify {log} --key-file {key}", **env)
    assert proc.stdout.startswith("OK")
    # The demo's hint runs as printed in this venv; the kept log is in the test's TMPDIR.
    proc = fresh.run("vramcore demo --allocator mock --keep-audit-log")
    hint = next(line for line in proc.stdout.splitlines() if "check it offline:" in line)
    command = hint.split("check it offline: ", 1)[1]
    assert fresh.env["TMPDIR"] in command
    assert fresh.run(command).stdout.startswith("OK")


@pytest.mark.slow
def test_tracing_and_the_example_sink(fresh: Venv, tmp_path: Path) -> None:
    _stage(fresh, "### The example sink")
    proc = fresh.run("vramcore plugins --json")
    for name in ('"audit_tracing"', '"example_jsonl"', '"audit_chain"', '"mock"'):
        assert name in proc.stdout
    events = tmp_path / "events.jsonl"
    fresh.run(
        "vramcore bench --size 1MiB --repeat 1 --allocator mock",
        VRAMCORE_WORKER_TOKEN=TOKEN,
        VRAMCORE_PLUGINS="mock,example_jsonl",
        VRAMCORE_EXAMPLE_JSONL=str(events),
    )
    assert '"vram.sealed"' in events.read_text()


@pytest.mark.slow
def test_the_installed_core_carries_its_licence(fresh: Venv) -> None:
    _stage(fresh, "### Core and the mock backend")
    proc = fresh.run(
        'python -c "import importlib.metadata as m; '
        "print(m.metadata('vramcore')['License-Expression'])\""
    )
    assert proc.stdout.strip() == "Apache-2.0"
