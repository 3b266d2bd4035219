"""The ``dev`` script: where it gets uv, what ``--fast`` runs, and its temporary directory.

The script is copied into the test's directory and run there against stand-in ``python3`` and
``uv`` programs that record how they were called, so nothing is installed or downloaded.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: A stand-in ``python3``: ``-m uv`` fails (no uv anywhere), ``-m venv DIR`` makes a stand-in
#: environment whose python records its pip call and "installs" a recording uv.
FAKE_PYTHON = r"""#!/bin/sh
echo "python3 $*" >> "$LOG"
if [ "$1 $2" = "-m uv" ]; then exit 1; fi
if [ "$1 $2" = "-m venv" ]; then
    mkdir -p "$3/bin"
    cat > "$3/bin/python" <<EOF
#!/bin/sh
echo "$3/bin/python \$*" >> "\$LOG"
printf '#!/bin/sh\necho "uv \$* TMPDIR=\$TMPDIR" >> "\$LOG"\n' > "$3/bin/uv"
printf 'ls -d "\$TMPDIR" >> "\$LOG"\n' >> "$3/bin/uv"
chmod +x "$3/bin/uv"
EOF
    chmod +x "$3/bin/python"
    exit 0
fi
echo "unexpected python3 call" >&2
exit 99
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def sandbox(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of ``dev`` in its own directory and an environment without any uv."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "dev", repo / "dev")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "python3", FAKE_PYTHON)
    for tool in ("bash", "sed", "mktemp", "rm", "mkdir", "ls", "cat", "chmod", "dirname"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    active = tmp_path / "someone-elses-venv"
    env = {
        "PATH": str(bin_dir),
        "LOG": str(tmp_path / "calls.log"),
        "HOME": str(tmp_path),
        "VIRTUAL_ENV": str(active),  # an activated environment the script did not make
        "TMPDIR": str(tmp_path / "outer-tmp"),
    }
    return repo, env


def _calls(env: dict[str, str]) -> list[str]:
    return Path(env["LOG"]).read_text().splitlines()


def test_uv_goes_into_an_environment_of_its_own(sandbox: tuple[Path, dict[str, str]]) -> None:
    repo, env = sandbox
    subprocess.run(["bash", "./dev", "vramcore", "plugins"], cwd=repo, env=env, check=True)
    calls = _calls(env)
    assert "python3 -m venv .dev/tools" in calls
    assert ".dev/tools/bin/python -m pip install --quiet uv" in calls
    assert not any(c.startswith("python3 -m pip") for c in calls)  # never into another env
    assert not (Path(env["VIRTUAL_ENV"])).exists()
    # The second run finds its own uv and installs nothing.
    Path(env["LOG"]).unlink()
    subprocess.run(["bash", "./dev", "vramcore", "plugins"], cwd=repo, env=env, check=True)
    assert not any("pip" in c or "venv" in c for c in _calls(env))


def test_fast_leaves_out_the_slow_tests(sandbox: tuple[Path, dict[str, str]]) -> None:
    repo, env = sandbox
    subprocess.run(["bash", "./dev", "test", "--fast", "-q"], cwd=repo, env=env, check=True)
    uv = [c for c in _calls(env) if c.startswith("uv ")]
    assert uv[0].startswith("uv run --frozen --all-packages --quiet pytest -m not slow -q ")
    subprocess.run(["bash", "./dev", "test", "-q"], cwd=repo, env=env, check=True)
    uv = [c for c in _calls(env) if c.startswith("uv ")]
    assert uv[1].startswith("uv run --frozen --all-packages --quiet pytest -q ")


def test_the_demo_installs_only_the_demo_group(sandbox: tuple[Path, dict[str, str]]) -> None:
    repo, env = sandbox
    subprocess.run(["bash", "./dev", "demo"], cwd=repo, env=env, check=True)
    uv = [c for c in _calls(env) if c.startswith("uv ")]
    demo = "uv run --frozen --no-default-groups --group demo --quiet vramcore demo"
    assert uv[0].startswith(demo)


def test_each_job_has_a_temporary_directory_removed_after(
    sandbox: tuple[Path, dict[str, str]],
) -> None:
    repo, env = sandbox
    subprocess.run(["bash", "./dev", "vramcore", "plugins"], cwd=repo, env=env, check=True)
    calls = _calls(env)
    job_tmp = next(c for c in calls if c.startswith("uv ")).rsplit("TMPDIR=", 1)[1]
    assert job_tmp.startswith(str(repo / ".dev" / "tmp."))
    assert job_tmp in calls  # it existed while the job ran...
    assert not Path(job_tmp).exists()  # ...and is gone now
    assert not Path(env["TMPDIR"]).exists()  # the outer one was never written to


def test_an_unknown_job_prints_usage(sandbox: tuple[Path, dict[str, str]]) -> None:
    repo, env = sandbox
    proc = subprocess.run(
        ["bash", "./dev", "nope"], cwd=repo, env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2
    assert "./dev test [--fast] [ARGS]" in proc.stderr
    assert not os.path.exists(repo / ".dev")  # nothing installed for a mistake
