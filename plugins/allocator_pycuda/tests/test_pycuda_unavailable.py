"""Without PyCUDA, or without a driver, the plugin loads and says exactly why it cannot run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import vramcore_allocator_pycuda
from vramcore_allocator_pycuda import PyCudaBackend, _api

from vramcore.errors import BackendUnavailable
from vramcore.plugins import collect_backends, get_plugin_manager

NO_LIBCUDA = "libcuda.so.1: cannot open shared object file: No such file or directory"


@pytest.fixture(autouse=True)
def fresh_probe() -> Iterator[None]:
    """The probe caches its answer per process: start and end each test without one."""
    _api._load.cache_clear()
    yield
    _api._load.cache_clear()


def _pretend(monkeypatch: pytest.MonkeyPatch, *, installed: bool = True, **modules: Any) -> None:
    """Make ``find_spec('pycuda')`` and ``import_module`` answer as given."""
    monkeypatch.setattr(
        _api.importlib.util, "find_spec", lambda name: object() if installed else None
    )

    def import_module(name: str) -> Any:
        value = modules.get(name)
        if isinstance(value, BaseException):
            raise value
        if value is None:
            raise ImportError(f"No module named {name!r}")
        return value

    monkeypatch.setattr(_api.importlib, "import_module", import_module)


def _driver(*, init_error: str | None = None, count: int = 1) -> types.SimpleNamespace:
    class Error(Exception):
        pass

    def init() -> None:
        if init_error is not None:
            raise Error(init_error)

    device = types.SimpleNamespace(count=lambda: count)
    return types.SimpleNamespace(init=init, Device=device, Error=Error)


def test_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    _pretend(monkeypatch, installed=False)
    reason = vramcore_allocator_pycuda.unavailable_reason()
    assert reason is not None
    assert reason.startswith("PyCUDA is not installed")
    assert "./plugins/allocator_pycuda[pycuda]" in reason
    assert "scripts/build-pycuda-wheel" in reason


def test_installed_without_a_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    _pretend(monkeypatch, **{"pycuda.driver": ImportError(NO_LIBCUDA)})
    assert vramcore_allocator_pycuda.unavailable_reason() == (
        "PyCUDA is installed but the CUDA driver library (libcuda.so.1) cannot be loaded: "
        "no NVIDIA driver on this machine"
    )


def test_a_broken_pycuda_build(monkeypatch: pytest.MonkeyPatch) -> None:
    _pretend(monkeypatch, **{"pycuda.driver": ImportError("undefined symbol: cuMemAlloc_v9")})
    reason = vramcore_allocator_pycuda.unavailable_reason()
    assert reason == "PyCUDA does not import: ImportError: undefined symbol: cuMemAlloc_v9"


def test_a_driver_that_does_not_start(monkeypatch: pytest.MonkeyPatch) -> None:
    driver = _driver(init_error="cuInit failed: system not yet initialized\x1b[31m")
    _pretend(monkeypatch, **{"pycuda.driver": driver, "pycuda.compiler": object()})
    reason = vramcore_allocator_pycuda.unavailable_reason()
    assert reason is not None
    assert reason.startswith("the CUDA driver does not start: cuInit failed")
    assert "\x1b" not in reason, "driver text reaches the CLI scrubbed"


def test_a_driver_without_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    _pretend(monkeypatch, **{"pycuda.driver": _driver(count=0), "pycuda.compiler": object()})
    assert vramcore_allocator_pycuda.unavailable_reason() == "the CUDA driver reports no device"


def test_the_factory_raises_the_reason_as_backend_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _pretend(monkeypatch, installed=False)
    with pytest.raises(BackendUnavailable, match="PyCUDA is not installed"):
        PyCudaBackend()


def test_the_probe_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode() -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(_api, "_load", explode)
    assert vramcore_allocator_pycuda.unavailable_reason() == (
        "PyCUDA probe failed: RuntimeError: boom"
    )


def test_the_spec_reports_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    _pretend(monkeypatch, installed=False)
    pm = get_plugin_manager([vramcore_allocator_pycuda], load_entrypoints=False, env={})
    spec = collect_backends(pm)["pycuda"]
    assert spec.priority == vramcore_allocator_pycuda.PRIORITY
    reason = spec.why_not()
    assert reason is not None
    assert reason.startswith("PyCUDA is not installed")


# -- the CLI, in a process of its own ----------------------------------------------------

_FAKE_PYCUDA = {
    "pycuda/__init__.py": "",
    # What the real wheel from scripts/build-pycuda-wheel does on a machine with no driver.
    "pycuda/driver.py": f"raise ImportError({NO_LIBCUDA!r})\n",
}


def _cli(args: list[str], tmp_path: Path, *, shadow: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRAMCORE_")}
    env["VRAMCORE_ALLOCATOR"] = "pycuda"
    if shadow:  # a PyCUDA that is installed but finds no driver, ahead of any real one
        for name, text in _FAKE_PYCUDA.items():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(text)
        env["PYTHONPATH"] = str(tmp_path)
        code = "import sys; from vramcore._cli.cli import main; sys.exit(main(sys.argv[1:]))"
    else:  # PyCUDA hidden, whether or not this environment has it
        code = (
            "import sys\n"
            "sys.modules['pycuda'] = None  # import fails, find_spec answers None\n"
            "from vramcore._cli.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n"
        )
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("shadow", "expected"),
    [
        (False, "PyCUDA is not installed"),
        (True, "PyCUDA is installed but the CUDA driver library (libcuda.so.1) cannot be loaded"),
    ],
    ids=["no-pycuda", "no-driver"],
)
def test_cli_plugins_and_devices_say_why(tmp_path: Path, shadow: bool, expected: str) -> None:
    listed = _cli(["plugins", "--json"], tmp_path, shadow=shadow)
    assert listed.returncode == 0, listed.stderr
    assert "Traceback" not in listed.stdout + listed.stderr
    (backend,) = [b for b in json.loads(listed.stdout)["backends"] if b["name"] == "pycuda"]
    assert backend["viable"] is False
    assert backend["reason"].startswith(expected)

    text = _cli(["plugins"], tmp_path, shadow=shadow)
    assert "not viable: " + expected in text.stdout

    devices = _cli(["devices"], tmp_path, shadow=shadow)
    assert devices.returncode == 2
    assert "Traceback" not in devices.stdout + devices.stderr
    assert expected in devices.stderr


# -- vramcore doctor: PyCUDA and the driver, one line each ---------------------------------

DRIVER = "CUDA driver and GPU"


def _checks() -> list[tuple[str, bool, str, bool]]:
    return [(c.what, c.ok, c.detail, c.install) for c in vramcore_allocator_pycuda.diagnose()]


def test_diagnose_pycuda_not_installed_and_no_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    _pretend(monkeypatch, installed=False)
    monkeypatch.setattr(_api, "_find_libcuda", lambda: None)
    assert _checks() == [
        ("PyCUDA", False, "not installed", True),
        (
            DRIVER,
            False,
            "no CUDA driver found (libcuda is not on this machine: no NVIDIA GPU or driver)",
            False,
        ),
    ]


def test_diagnose_pycuda_not_installed_on_a_machine_with_a_driver(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _pretend(monkeypatch, installed=False)
    monkeypatch.setattr(_api, "_find_libcuda", lambda: "libcuda.so.1")
    (pycuda, gpu) = _checks()
    assert pycuda == ("PyCUDA", False, "not installed", True)
    assert gpu[1] is True and gpu[2].startswith("driver library found (libcuda.so.1)")


def test_diagnose_pycuda_installed_without_a_driver_is_not_an_install_problem(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _pretend(monkeypatch, **{"pycuda.driver": ImportError(NO_LIBCUDA)})
    monkeypatch.setattr(_api, "_pycuda_version", lambda: "2026.1")
    assert _checks() == [
        ("PyCUDA", True, "installed (2026.1)", False),
        (
            DRIVER,
            False,
            "PyCUDA is installed but the CUDA driver library (libcuda.so.1) cannot be loaded: "
            "no NVIDIA driver on this machine",
            False,
        ),
    ]


def test_diagnose_a_broken_pycuda_build_is_an_install_problem(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _pretend(monkeypatch, **{"pycuda.driver": ImportError("undefined symbol: cuMemAlloc_v9")})
    monkeypatch.setattr(_api, "_find_libcuda", lambda: "libcuda.so.1")
    (pycuda, gpu) = _checks()
    assert pycuda == (
        "PyCUDA",
        False,
        "does not import: ImportError: undefined symbol: cuMemAlloc_v9",
        True,
    )
    assert gpu[1] is True


def test_diagnose_a_driver_without_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    _pretend(monkeypatch, **{"pycuda.driver": _driver(count=0), "pycuda.compiler": object()})
    monkeypatch.setattr(_api, "_pycuda_version", lambda: "2026.1")
    assert _checks() == [
        ("PyCUDA", True, "installed (2026.1)", False),
        (DRIVER, False, "the CUDA driver reports no device", False),
    ]


def test_diagnose_everything_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    class LibCuda:
        pointer_kind = staticmethod(lambda ptr: None)
        device_uuid = staticmethod(lambda ordinal: None)

    driver = _driver(count=2)
    driver.module_from_buffer = lambda image: None
    _pretend(monkeypatch, **{"pycuda.driver": driver, "pycuda.gpuarray": object()})
    monkeypatch.setattr(_api, "_LibCuda", LibCuda)
    monkeypatch.setattr(_api, "_pycuda_version", lambda: "2026.1")
    assert _checks() == [
        ("PyCUDA", True, "installed (2026.1)", False),
        (DRIVER, True, "2 GPU(s) visible", False),
    ]


def test_diagnose_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode() -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(_api, "_load", explode)
    assert _checks() == [("PyCUDA", False, "probe failed: RuntimeError: boom", False)]


@pytest.mark.slow
def test_doctor_on_a_machine_with_pycuda_and_no_driver(tmp_path: Path) -> None:
    # Before, the doctor printed the install hint here: installing PyCUDA is not the fix.
    done = _cli(["doctor", "--json"], tmp_path, shadow=True)
    assert done.returncode == 0, done.stderr
    (row,) = [b for b in json.loads(done.stdout)["backends"] if b["name"] == "pycuda"]
    assert [(c["what"], c["ok"]) for c in row["checks"]] == [("PyCUDA", True), (DRIVER, False)]
    assert row["install"] is None
    text = _cli(["doctor"], tmp_path, shadow=True).stdout
    assert "PyCUDA: ok: installed (" in text
    assert f"{DRIVER}: missing: PyCUDA is installed but the CUDA driver library" in text
