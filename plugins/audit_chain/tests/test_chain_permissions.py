"""An auditor who cannot read the files (copied from the worker with 0600, read as another
user) gets exit 2 and one line naming the file, from ``audit verify`` and ``audit show``, with
and without ``--json``: never exit 3 ("a bug").

The tests run as root, which file permissions do not stop: the command then runs in a forked
child that gave up root (``setuid(65534)``) after the parent imported everything it needs.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vramcore_audit_chain import FileWitness
from vramcore_audit_chain import _format as fmt

from vramcore._cli.cli import main

NOBODY = 65534

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _run_unprivileged(argv: list[str]) -> tuple[int, str, str]:
    """``vramcore ARGV`` in a forked child without root's rights (a user's already have
    none): exit code, stdout, stderr."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child exits with the command's code
        code = 99
        try:
            os.close(out_r)
            os.close(err_r)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            sys.stdout = os.fdopen(1, "w", closefd=False)
            sys.stderr = os.fdopen(2, "w", closefd=False)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            code = main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    os.close(out_w)
    os.close(err_w)
    out = _read_all(out_r)
    err = _read_all(err_r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out, err


def _read_all(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode()


@contextlib.contextmanager
def _traversable(path: Path) -> Iterator[None]:
    """Let other users traverse (not list) ``path``'s ancestors up to the temp root, as a
    shared audit volume would; restored afterwards."""
    changed: list[tuple[Path, int]] = []
    for parent in [path, *path.parents]:
        if parent == Path(parent.anchor):
            break
        mode = parent.stat().st_mode & 0o777
        if mode & 0o001 == 0:
            changed.append((parent, mode))
            parent.chmod(mode | 0o001)
    try:
        yield
    finally:
        for parent, mode in changed:
            parent.chmod(mode)


@pytest.fixture
def copied_log(tmp_path: Path, chain: Any) -> Iterator[dict[str, Path]]:
    """A closed log with a witness, as an auditor receives it: files 0600 owned by root in
    directories anyone may enter."""
    log = tmp_path / "log"
    witness_dir = tmp_path / "witness"
    witness_dir.mkdir()
    witness = witness_dir / "heads.ndjson"
    from vramcore_audit_chain import ChainConfig, ChainSink

    sink = ChainSink(ChainConfig(directory=log), chain.context(), witnesses=[FileWitness(witness)])
    for event in chain.sample_events(5):
        sink.emit(event)
    sink.close()
    # The parent runs everything once, so the child imports nothing it could not read.
    key = log / fmt.INITIAL_KEY_NAME
    assert (
        main(["audit", "verify", str(log), "--key-file", str(key), "--anchor", str(witness)]) == 0
    )
    assert main(["audit", "show", str(log), "--json"]) == 0
    for path in (log, witness_dir):
        path.chmod(0o755)
    with _traversable(tmp_path):
        yield {"log": log, "key": key, "witness": witness, "file": fmt.log_files(log)[0][1]}


def _check(argv: list[str], named: Path) -> None:
    for extra in ([], ["--json"]):
        code, out, err = _run_unprivileged([*argv, *extra])
        assert code == 2, (argv, extra, code, out, err)
        assert "Traceback" not in out + err and "bug" not in out + err
        if extra:
            message = json.loads(out)["error"]["message"]
        else:
            assert err.count("\n") == 1, err
            message = err
        assert str(named) in message, message


def test_an_unreadable_log_file_is_exit_2_naming_it(copied_log: dict[str, Path]) -> None:
    log, key, file = copied_log["log"], copied_log["key"], copied_log["file"]
    key.chmod(0o644)  # the auditor has the key; only the log file is 0600
    file.chmod(0o600)
    _check(["audit", "verify", str(log), "--key-file", str(key)], file)
    _check(["audit", "show", str(log)], file)


def test_an_unlistable_log_directory_is_exit_2_naming_it(copied_log: dict[str, Path]) -> None:
    log, key = copied_log["log"], copied_log["key"]
    key.chmod(0o644)
    log.chmod(0o700)
    _check(["audit", "verify", str(log), "--public-key", "0" * 64], log)
    _check(["audit", "show", str(log)], log)


def test_an_unreadable_anchor_or_key_file_is_exit_2_naming_it(
    copied_log: dict[str, Path],
) -> None:
    log, key, witness = copied_log["log"], copied_log["key"], copied_log["witness"]
    for path in fmt.log_files(log):
        path[1].chmod(0o644)
    key.chmod(0o644)
    witness.chmod(0o600)
    _check(["audit", "verify", str(log), "--key-file", str(key), "--anchor", str(witness)], witness)
    witness.chmod(0o644)
    key.chmod(0o600)
    _check(["audit", "verify", str(log), "--key-file", str(key), "--anchor", str(witness)], key)
