"""``vramcore doctor`` tells "CuPy is not installed" from "no driver or GPU", one line each.

The cupy plugin's :func:`~vramcore_allocator_cupy.diagnose` checks the two apart (CuPy, then
the CUDA driver and GPU); the doctor prints one line per check and the install hint only when
installing the package would fix a failed check. Before, a machine with CuPy and no driver was
told to install CuPy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import vramcore_allocator_cupy as plugin
from vramcore_allocator_cupy import diagnose, why_not
from vramcore_allocator_cupy._cuda import CudaError
from vramcore_allocator_cupy.testing import FakeCuda

from vramcore._cli.cli import main
from vramcore.backend import ProbeCheck

DRIVER = "CUDA driver and GPU"


def _no_driver_api() -> FakeCuda:
    class Api(FakeCuda):
        def device_count(self) -> int:
            raise CudaError(35, "cudaErrorInsufficientDriver", "cudaGetDeviceCount")

        def driver_version(self) -> int:
            return 0

    return Api(None)


def _cupy(version: str = "14.2.0") -> Any:
    class Module:
        __version__ = version

    return Module


def _missing() -> Any:
    raise ModuleNotFoundError("No module named 'cupy'", name="cupy")


def test_cupy_missing_and_no_driver_are_two_failed_checks() -> None:
    cupy, gpu = diagnose(import_cupy=_missing, find_libcuda=lambda: None)
    assert cupy == ProbeCheck(what="CuPy", ok=False, detail="not installed", install=True)
    assert gpu.what == DRIVER and not gpu.ok and not gpu.install
    assert gpu.detail.startswith("no CUDA driver found (libcuda is not on this machine")


def test_cupy_missing_on_a_machine_with_a_driver() -> None:
    cupy, gpu = diagnose(import_cupy=_missing, find_libcuda=lambda: "libcuda.so.1")
    assert not cupy.ok and cupy.install
    assert gpu.ok and gpu.detail.startswith("driver library found (libcuda.so.1)")


def test_cupy_installed_without_a_driver_is_not_an_install_problem() -> None:
    cupy, gpu = diagnose(import_cupy=_cupy, make_api=_no_driver_api)
    assert cupy == ProbeCheck(what="CuPy", ok=True, detail="installed (14.2.0)")
    assert gpu == ProbeCheck(
        what=DRIVER,
        ok=False,
        detail="no CUDA driver found (no NVIDIA GPU or driver on this machine)",
    )


def test_everything_in_place() -> None:
    checks = diagnose(import_cupy=_cupy, make_api=lambda: FakeCuda(None, devices=2))
    assert [(c.what, c.ok, c.detail) for c in checks] == [
        ("CuPy", True, "installed (14.2.0)"),
        (DRIVER, True, "2 GPU(s) visible"),
    ]


def test_a_cupy_that_does_not_import_says_why() -> None:
    def broken() -> Any:
        raise ImportError("libcudart.so.12: cannot open shared object file")

    cupy, _gpu = diagnose(import_cupy=broken, find_libcuda=lambda: None)
    assert not cupy.ok and cupy.install
    assert cupy.detail == (
        "installed but does not import: ImportError: libcudart.so.12: cannot open shared "
        "object file"
    )


def test_a_broken_driver_check_never_raises() -> None:
    def boom() -> str | None:
        raise OSError("ldconfig failed")

    _cupy_check, gpu = diagnose(import_cupy=_missing, find_libcuda=boom)
    assert not gpu.ok and "no CUDA driver found" in gpu.detail


# -- the doctor, in-process, with the cupy plugin installed in this workspace ---------------


@pytest.fixture
def doctor(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """Run ``vramcore doctor`` with only the cupy plugin and no configuration file."""
    for name in list(os.environ):
        if name.startswith("VRAMCORE_"):
            monkeypatch.delenv(name)
    (tmp_path / "vramcore.toml").write_text("")
    monkeypatch.setenv("VRAMCORE_CONFIG", str(tmp_path / "vramcore.toml"))
    monkeypatch.setenv("VRAMCORE_PLUGINS", "cupy")
    monkeypatch.chdir(tmp_path)

    def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
        code = main(["doctor", *argv])
        return code, capsys.readouterr().out

    return run


def _machine(
    monkeypatch: pytest.MonkeyPatch, import_cupy: Any, make_api: Any, libcuda: str | None
) -> None:
    """Make the plugin's probe and diagnosis see this machine (the spec is built per call)."""
    monkeypatch.setattr(plugin, "why_not", lambda: why_not(import_cupy, make_api))
    monkeypatch.setattr(
        plugin, "diagnose", lambda: diagnose(import_cupy, make_api, lambda: libcuda)
    )


def test_doctor_says_cupy_is_not_installed(
    doctor: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _machine(monkeypatch, _missing, _no_driver_api, None)
    code, out = doctor(capsys, "--json")
    assert code == 0
    (row,) = json.loads(out)["backends"]
    assert row["checks"] == [
        {"what": "CuPy", "ok": False, "detail": "not installed"},
        {
            "what": DRIVER,
            "ok": False,
            "detail": "no CUDA driver found (libcuda is not on this machine: no NVIDIA GPU or "
            "driver)",
        },
    ]
    assert "pip install" in row["install"]
    code, out = doctor(capsys)
    assert f"  {'':<14} CuPy: missing: not installed\n" in out
    assert f"  {'':<14} {DRIVER}: missing: no CUDA driver found (libcuda" in out
    assert f"  {'':<14} install: from a clone of the vramcore repository" in out


def test_doctor_says_the_driver_is_missing_not_cupy(
    doctor: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _machine(monkeypatch, _cupy, _no_driver_api, None)
    code, out = doctor(capsys, "--json")
    assert code == 0
    (row,) = json.loads(out)["backends"]
    assert row["reason"] == "no CUDA driver found (no NVIDIA GPU or driver on this machine)"
    assert row["checks"] == [
        {"what": "CuPy", "ok": True, "detail": "installed (14.2.0)"},
        {
            "what": DRIVER,
            "ok": False,
            "detail": "no CUDA driver found (no NVIDIA GPU or driver on this machine)",
        },
    ]
    assert row["install"] is None, "CuPy is installed: installing it is not the fix"
    code, out = doctor(capsys)
    assert f"  {'':<14} CuPy: ok: installed (14.2.0)\n" in out
    assert f"  {'':<14} {DRIVER}: missing: no CUDA driver found (no NVIDIA GPU" in out
    assert "install:" not in out


def test_doctor_on_a_gpu_machine(
    doctor: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _machine(monkeypatch, _cupy, lambda: FakeCuda(None), "libcuda.so.1")
    code, out = doctor(capsys)
    assert code == 0
    assert "cupy           can run\n" in out
    assert f"  {'':<14} {DRIVER}: ok: 1 GPU(s) visible\n" in out
    assert "install:" not in out
