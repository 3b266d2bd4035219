"""Attacks through the CLI: a silent fall back to host memory, plugin commands that break
the CLI or write to the terminal, garbage hook answers, tokens in tracebacks."""

from __future__ import annotations

import importlib.metadata
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import vramcore_allocator_mock as mock_plugin

from vramcore import VramManager, hookimpl
from vramcore._cli.cli import main
from vramcore.backend import BackendSpec
from vramcore.errors import InvalidInput, PolicyViolation, VramError
from vramcore.policy import VramPolicy
from vramcore.testing import TEST_TOKEN

GPU_REASON = "CUDA driver failed: CUDA_ERROR_NO_DEVICE (broken driver)"


class _Dist:
    def __init__(self, name: str) -> None:
        self.name = name
        self.version = "1.0"


class _EntryPoint:
    """An installed entry point, as importlib.metadata describes one."""

    def __init__(self, name: str, target: object, dist: str) -> None:
        self.name = name
        self.value = name
        self.group = "vramcore"
        self.dist = _Dist(dist)
        self._target = target

    def load(self) -> object:
        return self._target


def _plugin(name: str, **hooks: Any) -> ModuleType:
    module = ModuleType(name)
    for hook, function in hooks.items():
        setattr(module, hook, hookimpl(function))
    return module


def _installed(monkeypatch: pytest.MonkeyPatch, **plugins: ModuleType) -> None:
    """Installed plugins: the real mock plus ``plugins`` (name -> module), nothing else."""
    eps = [_EntryPoint("mock", mock_plugin, "vramcore-allocator-mock")]
    eps += [_EntryPoint(name, module, f"dist-{name}") for name, module in plugins.items()]

    def entry_points(**params: Any) -> list[_EntryPoint]:
        return [ep for ep in eps if params.get("name", ep.name) == ep.name]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def _broken_gpu() -> ModuleType:
    def vramcore_allocator_backends() -> Sequence[BackendSpec]:
        def factory() -> Any:
            raise AssertionError("a non-viable backend is never built")

        return [BackendSpec(name="fakegpu", priority=50, probe=lambda: GPU_REASON, factory=factory)]

    return _plugin("fakegpu", vramcore_allocator_backends=vramcore_allocator_backends)


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VRAMCORE_WORKER_TOKEN", TEST_TOKEN)
    for name in ("VRAMCORE_AUDIT_LOG", "VRAMCORE_PLUGINS", "VRAMCORE_DISABLE_PLUGINS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def mock_builds(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every MockBackend built (the mock's memory is host memory)."""
    built: list[object] = []
    original = mock_plugin.MockBackend.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        built.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(mock_plugin.MockBackend, "__init__", init)
    return built


def _model(tmp_path: Path) -> str:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"w" * 100_000)
    return str(path)


# -- never a silent mock ---------------------------------------------------------------------


def test_seal_with_no_viable_gpu_backend_exits_2_naming_each_backend_and_puts_nothing_in_memory(
    cli_env: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    mock_builds: list[object],
) -> None:
    monkeypatch.delenv("VRAMCORE_ALLOCATOR", raising=False)
    _installed(monkeypatch, fakegpu=_broken_gpu())
    code = main(["seal", _model(tmp_path), "--no-audit"])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    (line,) = err.strip().splitlines()
    assert f"fakegpu: {GPU_REASON}" in line
    assert "mock: host memory" in line and "--allocator mock" in line
    assert mock_builds == []  # no host-memory stand-in was even built


def test_the_manager_never_falls_back_to_the_mock(
    monkeypatch: pytest.MonkeyPatch, mock_builds: list[object]
) -> None:
    from vramcore.errors import BackendUnavailable
    from vramcore.plugins import get_plugin_manager

    monkeypatch.delenv("VRAMCORE_ALLOCATOR", raising=False)
    pm = get_plugin_manager([mock_plugin, _broken_gpu()], load_entrypoints=False, env={})
    with pytest.raises(BackendUnavailable, match="fakegpu: CUDA driver failed"):
        VramManager(TEST_TOKEN, plugin_manager=pm, audit="disabled")
    assert mock_builds == []


def test_a_named_mock_says_once_that_the_weights_are_in_host_memory(
    cli_env: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.delenv("VRAMCORE_ALLOCATOR", raising=False)
    _installed(monkeypatch)
    for argv in (
        ["seal", _model(tmp_path), "--allocator", "mock", "--no-audit"],
        ["devices", "--allocator", "mock"],
        ["demo", "--allocator", "mock", "--no-audit"],
    ):
        assert main(argv) == 0, argv
        err = capsys.readouterr().err
        assert err.count("keeps the weights in HOST memory, not in GPU memory") == 1, (argv, err)


def test_strict_host_isolation_refuses_the_mock(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(PolicyViolation, match="HOST memory"):
        VramManager(
            TEST_TOKEN,
            allocator="mock",
            audit="disabled",
            policy=VramPolicy(strict_host_isolation=True),
        )
    with VramManager(TEST_TOKEN, allocator="mock", audit="disabled"):
        pass
    notices = [r for r in caplog.records if "HOST memory" in r.getMessage()]
    assert len(notices) == 2  # once for each manager


# -- plugin commands ---------------------------------------------------------------------


def _commands(name: str, help: str = "a command", **options: Any) -> Any:
    def vramcore_add_commands(commands: Any) -> Any:
        parser = commands.add(name, help=help, handler=lambda args, console: 0)
        parser.add_argument("--level", help=options.get("arg_help", "a level"))
        if "fail" in options:
            raise options["fail"]
        return options.get("returns")

    return vramcore_add_commands


@pytest.mark.parametrize(
    "failure",
    [
        {"fail": RuntimeError("plugin bug")},
        {"fail": SystemExit(0)},
        {"returns": "garbage"},
    ],
    ids=["raises", "exits", "returns garbage"],
)
def test_a_failing_add_commands_removes_only_that_plugins_commands(
    cli_env: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    failure: dict[str, Any],
) -> None:
    _installed(
        monkeypatch,
        good=_plugin("good", vramcore_add_commands=_commands("good-cmd")),
        bad=_plugin("bad", vramcore_add_commands=_commands("bad-cmd", **failure)),
    )
    assert main(["good-cmd"]) == 0
    err = capsys.readouterr().err
    assert "plugin bad: its commands were removed (bad-cmd)" in err
    assert main(["bad-cmd"]) == 2  # gone: a usage error, never a crash
    assert main(["plugins"]) == 0  # the core commands are intact


def test_plugin_help_text_is_escaped_before_it_reaches_the_terminal(
    cli_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    hostile = "\x1b]0;owned\x07\x1b[2J\u202eevil"
    _installed(
        monkeypatch,
        loud=_plugin(
            "loud",
            vramcore_add_commands=_commands("loud", help=hostile, arg_help=hostile),
        ),
    )
    for argv in (["--help"], ["loud", "--help"]):
        main(argv)
        out, err = capsys.readouterr()
        assert "evil" in out
        for raw in ("\x1b", "\x07", "\u202e"):
            assert raw not in out + err


# -- hook answers of the wrong type ------------------------------------------------------


def test_a_probe_hook_answering_garbage_is_exit_2_naming_the_plugin(
    cli_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def vramcore_probe_devices(backend: Any) -> Any:
        return "gpu0"

    _installed(monkeypatch, liar=_plugin("liar", vramcore_probe_devices=vramcore_probe_devices))
    assert main(["devices", "--allocator", "mock"]) == 2
    assert "liar" in capsys.readouterr().err


def test_a_backend_factory_building_garbage_is_exit_2_naming_the_backend(
    cli_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def vramcore_allocator_backends() -> Sequence[BackendSpec]:
        return [BackendSpec(name="odd", priority=1, probe=lambda: None, factory=lambda: "x")]

    _installed(
        monkeypatch, odd=_plugin("odd", vramcore_allocator_backends=vramcore_allocator_backends)
    )
    assert main(["devices", "--allocator", "odd"]) == 2
    assert "odd" in capsys.readouterr().err


def test_a_viability_probe_answering_garbage_is_a_reason_not_a_crash(
    cli_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def vramcore_allocator_backends() -> Sequence[BackendSpec]:
        return [
            BackendSpec(name="odd", priority=1, probe=lambda: 42, factory=lambda: None)  # type: ignore[arg-type,return-value]
        ]

    monkeypatch.delenv("VRAMCORE_ALLOCATOR", raising=False)
    _installed(
        monkeypatch, odd=_plugin("odd", vramcore_allocator_backends=vramcore_allocator_backends)
    )
    assert main(["devices"]) == 2
    assert "odd: viability probe answered int" in capsys.readouterr().err


# -- tracebacks that capture local variables ---------------------------------------------

#: Refused by every version of vramcore (too short), and unlike any word in a message.
WEAK = "Q7xZ9kP2mW4vB8n"


#: The tokens below, by name: the test's own frame (part of the traceback) holds only names.
TOKENS = {"refused": WEAK, "good": TEST_TOKEN}


@pytest.mark.parametrize(
    ("which", "argv"),
    [
        ("refused", ["seal", "MODEL", "--allocator", "mock", "--no-audit"]),
        ("good", ["seal", "MODEL", "--allocator", "no-such-backend", "--no-audit"]),
    ],
    ids=["refused token", "failing command"],
)
def test_no_traceback_with_locals_on_the_cli_path_shows_the_token(
    cli_env: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    which: str,
    argv: list[str],
) -> None:
    monkeypatch.setenv("VRAMCORE_WORKER_TOKEN", TOKENS[which])
    monkeypatch.setenv("VRAMCORE_DEBUG", "1")  # the exception reaches us, as a reporter's hook
    model = _model(tmp_path)
    with pytest.raises(VramError) as info:
        main([model if a == "MODEL" else a for a in argv])
    assert isinstance(info.value, InvalidInput) or "no-such-backend" in str(info.value)
    text = "".join(
        traceback.TracebackException.from_exception(info.value, capture_locals=True).format()
    )
    assert TOKENS[which] not in text
