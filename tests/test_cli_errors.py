"""Every CLI command against bad input: one line (one JSON object under --json), the right exit
code, a message naming what the user typed, no traceback and no raw escape sequence.

Exit codes: 2 for usage, configuration and unreadable input; 1 for integrity, policy and audit
failures. The table below is the one in the issue's report (input -> code -> message).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import vramcore._cli.cli
from vramcore import AuditSink, hookimpl
from vramcore._cli.cli import main
from vramcore.plugins import get_plugin_manager
from vramcore.safetensors import write_safetensors

TOKEN = "yvoA-d1ALCA0axPrw0XNgX8W1Lmzy7H7pbOSG6WGghY"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VRAMCORE_WORKER_TOKEN", TOKEN)
    monkeypatch.setenv("VRAMCORE_AUDIT_LOG", str(tmp_path / "audit"))
    monkeypatch.setenv("VRAMCORE_MOCK_VRAM", "1GiB")
    monkeypatch.setenv("VRAMCORE_ALLOCATOR", "mock")  # the mock is used only when named
    for name in ("VRAMCORE_PLUGINS", "VRAMCORE_DISABLE_PLUGINS"):
        monkeypatch.delenv(name, raising=False)


def _model(tmp_path: Path) -> Path:
    path = tmp_path / "m.safetensors"
    with path.open("wb") as fh:
        write_safetensors(fh, {"w": ("U8", [4096], os.urandom(4096))})
    return path


def _raw_safetensors(tmp_path: Path, header: bytes, data: bytes = b"\0" * 8) -> Path:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


Setup = Callable[[Path, pytest.MonkeyPatch], list[str]]


def _seal(*extra: str) -> Setup:
    def setup(tmp_path: Path, _mp: pytest.MonkeyPatch) -> list[str]:
        return ["seal", str(_model(tmp_path)), "--no-audit", *extra]

    return setup


def _seal_path(make: Callable[[Path], Path | str]) -> Setup:
    def setup(tmp_path: Path, _mp: pytest.MonkeyPatch) -> list[str]:
        return ["seal", str(make(tmp_path)), "--no-audit"]

    return setup


def _unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    # Tests run as root in CI, where chmod 000 still reads: simulate EACCES at open instead.
    path = _model(tmp_path)
    real_open = os.open

    def deny(p: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if os.fspath(p) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(p, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    return ["seal", str(path), "--no-audit"]


def _unreadable_audit_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """An audit log the auditor may not read (EACCES simulated: tests run as root in CI)."""
    import builtins

    log = tmp_path / "audit"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["seal", str(_model(tmp_path))]) == 0  # writes the log (VRAMCORE_AUDIT_LOG)
    key = log / "auditor-initial.key"

    def guard(real: Any) -> Any:
        def opener(target: Any, *args: Any, **kwargs: Any) -> Any:
            name = os.fspath(target) if not isinstance(target, int) else ""
            if name.startswith(str(log)) and name != str(key):
                raise PermissionError(13, "Permission denied", name)
            return real(target, *args, **kwargs)

        return opener

    monkeypatch.setattr(os, "open", guard(os.open))
    monkeypatch.setattr(builtins, "open", guard(builtins.open))
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: guard(builtins.open)(self, *a, **k))
    return ["audit", "verify", str(log), "--key-file", str(key)]


def _fifo(tmp_path: Path) -> Path:
    path = tmp_path / "pipe.safetensors"
    os.mkfifo(path)
    return path


def _dir_with_escape(tmp_path: Path) -> Path:
    path = tmp_path / "evil\x1b[2Jname"
    path.mkdir()
    return path


def _nested(tmp_path: Path) -> Path:
    return _raw_safetensors(tmp_path, b'{"t":' + b"[" * 100_000 + b"]" * 100_000 + b"}")


def _overlapping(tmp_path: Path) -> Path:
    header = json.dumps(
        {
            "a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
            "b": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]},
        }
    ).encode()
    return _raw_safetensors(tmp_path, header)


def _trailing(tmp_path: Path) -> Path:
    header = json.dumps({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}).encode()
    return _raw_safetensors(tmp_path, header, b"\0" * 8)


def _env_token(value: str) -> Setup:
    def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        monkeypatch.setenv("VRAMCORE_WORKER_TOKEN", value)
        return ["seal", str(_model(tmp_path))]

    return setup


def _log_without_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.delenv("VRAMCORE_WORKER_TOKEN")
    return ["seal", str(_model(tmp_path))]


def _plain(*argv: str) -> Setup:
    return lambda _tmp, _mp: list(argv)


def _hostile_allocator(_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setenv("VRAMCORE_ALLOCATOR", "x\x1b]0;owned\x07")
    return ["devices"]


class _ExitingSink(AuditSink):
    name = "exiting"

    def emit(self, event: Any) -> None:
        raise SystemExit(3)


class _ExitingSinkPlugin:
    @hookimpl
    def vramcore_audit_sinks(self, context: Any) -> list[AuditSink]:
        return [_ExitingSink()]


def _exiting_sink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setattr(
        vramcore._cli.cli, "get_plugin_manager", lambda: get_plugin_manager([_ExitingSinkPlugin()])
    )
    return ["seal", str(_model(tmp_path))]


# (case id, setup -> argv, exit code, message fragment)
CASES: list[tuple[str, Setup, int, str]] = [
    ("missing file", _seal_path(lambda t: t / "nope.bin"), 2, "PATH"),
    ("directory without a model", _seal_path(lambda t: t), 2, "holds no *.safetensors file"),
    ("/dev/null", _seal_path(lambda _t: "/dev/null"), 2, "not a regular file"),
    ("FIFO", _seal_path(_fifo), 2, "not a regular file"),
    ("empty file", _seal_path(lambda t: (t / "e.bin").write_bytes(b"") or t / "e.bin"), 2, "empty"),
    ("unreadable (EACCES)", _unreadable, 2, "permission denied"),
    ("name over 255 bytes", _seal_path(lambda t: t / ("n" * 300)), 2, "at most 255 bytes"),
    ("path with NUL", _seal_path(lambda t: f"{t}/a\0b"), 2, "NUL"),
    ("escape in a path", _seal_path(_dir_with_escape), 2, "evil\\x1b[2Jname"),
    ("nested JSON header", _seal_path(_nested), 1, "not a valid safetensors file"),
    ("overlapping tensors", _seal_path(_overlapping), 1, "overlaps the tensor before it"),
    ("bytes after the last tensor", _seal_path(_trailing), 1, "the tensors cover 4 data bytes"),
    ("bad --expect-sha256", _seal("--expect-sha256", "xyz"), 2, "--expect-sha256 must be 64"),
    ("wrong --expect-sha256", _seal("--expect-sha256", "0" * 64), 1, "SHA-256 mismatch"),
    ("bad --shard-id", _seal("--shard-id", "../x"), 2, "--shard-id '../x'"),
    ("--device -1", _seal("--device", "-1"), 2, "--device: must be 0 or more"),
    ("--device 7", _seal("--device", "7"), 2, "--device 7: device 7 does not exist"),
    ("token of spaces", _env_token(" " * 20), 2, "VRAMCORE_WORKER_TOKEN is only whitespace"),
    ("token one char", _env_token("a" * 32), 2, "VRAMCORE_WORKER_TOKEN is one character"),
    ("short token", _env_token("short"), 2, "VRAMCORE_WORKER_TOKEN is too short"),
    ("log without token", _log_without_token, 2, "VRAMCORE_WORKER_TOKEN is not"),
    ("bench --repeat 0", _plain("bench", "--repeat", "0", "--no-audit"), 2, "--repeat"),
    ("bench --size 1e15", _plain("bench", "--size", "1e15", "--no-audit"), 2, "--size"),
    ("bench --size nan", _plain("bench", "--size", "nan", "--no-audit"), 2, "--size"),
    ("bench --size -1", _plain("bench", "--size", "-1", "--no-audit"), 2, "--size"),
    ("unknown --allocator", _plain("devices", "--allocator", "nope"), 2, "--allocator 'nope'"),
    ("hostile VRAMCORE_ALLOCATOR", _hostile_allocator, 2, "VRAMCORE_ALLOCATOR"),
    ("unknown command", _plain("frobnicate"), 2, "invalid choice"),
    ("unknown option", _plain("plugins", "--frob"), 2, "unrecognized arguments"),
    ("unreadable audit log", _unreadable_audit_log, 2, "Permission denied"),
    ("audit verify, no key", _plain("audit", "verify", "/nonexistent/log"), 2, "--key-file"),
    ("sink raising SystemExit", _exiting_sink, 1, ""),
]


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("setup", "code", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_one_clear_line(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    setup: Setup,
    code: int,
    fragment: str,
) -> None:
    argv = setup(tmp_path, monkeypatch)
    got, out, err = _run(capsys, argv)
    errors = [line for line in err.splitlines() if line.startswith("vramcore: error:")]
    assert got == code, err
    assert len(errors) == 1, err
    assert fragment in errors[0]
    assert "Traceback" not in out + err
    assert "\x1b" not in out + err and "\x07" not in out + err
    assert TOKEN not in out + err


@pytest.mark.parametrize(
    ("setup", "code"),
    [(c[1], c[2]) for c in CASES if c[0] != "unknown option"],
    ids=[c[0] for c in CASES if c[0] != "unknown option"],
)
def test_bad_input_under_json_is_one_json_object(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    setup: Setup,
    code: int,
) -> None:
    argv = [*setup(tmp_path, monkeypatch), "--json"]
    got, out, err = _run(capsys, argv)
    assert got == code
    doc = json.loads(out)
    assert doc["error"]["exit_code"] == code
    assert "\n" not in doc["error"]["message"]
    assert "Traceback" not in out + err


def _write_plugin_module(tmp_path: Path, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(body)


@pytest.mark.parametrize("raised", ["SystemExit(4)", "KeyboardInterrupt()", "GeneratorExit()"])
def test_plugin_raising_base_exception_at_import_is_isolated(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    raised: str,
) -> None:
    import importlib.metadata

    import vramcore.plugins

    module = f"vc_exiting_{abs(hash(raised))}"
    _write_plugin_module(tmp_path, module, f"raise {raised}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real = importlib.metadata.entry_points

    def with_exiting(**kwargs: Any) -> Any:
        found = list(real(**kwargs))
        found.append(importlib.metadata.EntryPoint("exiting", module, "vramcore"))
        return found

    monkeypatch.setattr(vramcore.plugins.importlib.metadata, "entry_points", with_exiting)
    code, out, _err = _run(capsys, ["plugins", "--json"])
    sys.modules.pop(module, None)
    assert code == 0
    data = json.loads(out)
    (failure,) = data["failures"]
    assert failure["name"] == "exiting"
    assert failure["error"].startswith(raised.split("(")[0])
    assert "mock" in {p["name"] for p in data["plugins"]}


@pytest.mark.slow
def test_plugins_json_into_a_closed_pipe_is_quiet() -> None:
    """``vramcore plugins --json | head -1``: the reader is gone before the first write."""
    env = {**os.environ, "VRAMCORE_WORKER_TOKEN": TOKEN}
    read_end, write_end = os.pipe()
    os.close(read_end)  # closed before the process starts: its first write gets EPIPE
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "vramcore._cli.cli", "plugins", "--json"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            env=env,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write_end)
    err = proc.stderr.decode()
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert "Exception ignored" not in err, err
    assert proc.returncode == 1


def test_console_error_in_json_mode_when_stdout_is_a_broken_pipe() -> None:
    # The same path in-process: a stdout that raises BrokenPipeError on write.
    class Broken:
        def write(self, _text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    real = sys.stdout
    sys.stdout = Broken()  # type: ignore[assignment]
    try:
        code = main(["plugins", "--json"])
    finally:
        sys.stdout = real
    assert code == 1


def test_rates_for_small_files_are_readable() -> None:
    from vramcore._cli.support import rate

    assert rate(4096, 0.001) == "3.9 MiB/s"
    assert rate(2 << 30, 1.0) == "2.00 GiB/s"


def test_cli_command_is_absolute_under_uv_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from vramcore._cli.support import cli_command

    monkeypatch.setenv("UV_RUN_RECURSION_DEPTH", "1")
    command = cli_command()
    assert command != "vramcore"
    assert os.path.isabs(command.split()[0].strip("'"))


@pytest.mark.parametrize(
    ("raised", "code", "kind"),
    [
        (RuntimeError("boom\x1b[31m"), 3, "internal"),
        (KeyboardInterrupt(), 130, "interrupted"),
        (RecursionError(), 3, "internal"),
        (PermissionError(13, "Permission denied", "/var/log/x"), 2, "unreadable_input"),
    ],
)
def test_unexpected_errors_are_one_line_too(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    raised: BaseException,
    code: int,
    kind: str,
) -> None:
    def explode(*_args: Any) -> int:
        raise raised

    monkeypatch.setattr(vramcore._cli.cli, "cmd_plugins", explode)
    got, out, err = _run(capsys, ["plugins", "--json"])
    assert got == code
    assert json.loads(out)["error"]["kind"] == kind
    assert "\x1b" not in out and "Traceback" not in out + err


def test_vramcore_debug_shows_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*_args: Any) -> int:
        raise RuntimeError("boom")

    monkeypatch.setattr(vramcore._cli.cli, "cmd_plugins", explode)
    monkeypatch.setenv("VRAMCORE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        main(["plugins"])
