"""``scripts/gpu-check`` cannot rot: its dry run runs here, on the fake CUDA runtime.

The dry run takes every step of a GPU run (environment, carried wheels, the preflight,
``vramcore devices``, the kernel's NVRTC build report, the ``vramcore_gpu`` tests from a copy
outside the source tree, the PyCUDA backend on its stand-in driver, the benchmark) and writes
the same report after every step; only the runtime is fake and nothing is installed.
"""

from __future__ import annotations

import datetime as dt
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu-check"
#: GPU tests allowed to fail in the dry run, with why (none: the fake device reports HMM like
#: an H100, and the policy reports it rather than refusing, as DESIGN says).
KNOWN_FAILURES: dict[str, str] = {}


def _script() -> Any:
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _complete_wheels(folder: Path) -> None:
    """Stand-in wheels of everything a GPU run carries, built (BUILD-INFO) from HEAD."""
    gc = _script()
    _wheel(
        folder,
        "vramcore-0.1.0-py3-none-any.whl",
        [f"vramcore/kernels/{f}" for f in gc.KERNEL_FILES],
    )
    for name in ("vramcore_allocator_mock", "vramcore_allocator_cupy", "vramcore_allocator_pycuda"):
        _wheel(folder, f"{name}-0.1.0-py3-none-any.whl", [])
    for dep in (*gc.EXTRA_WHEELS, *gc.TEST_WHEELS, "pycuda"):
        _wheel(folder, f"{dep}-1.0-py3-none-any.whl", [])
    (folder / "BUILD-INFO.json").write_text(json.dumps({"commit": gc._git("rev-parse", "HEAD")}))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("gpu-check")
    wheels = tmp_path_factory.mktemp("gpu-wheels")
    _complete_wheels(wheels)
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler: the fake runtime needs the host-built kernels")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--wheels", str(wheels)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    report = json.loads((out / "gpu-report.json").read_text())
    return done.returncode, report, out


@pytest.mark.slow  # the dry run builds and runs the whole GPU check (about 15 s)
def test_dry_run_takes_every_step(dry_run: tuple[int, dict[str, Any], Path]) -> None:
    code, report, out = dry_run
    assert report["dry_run"] is True
    assert report["mode"] == "dry-run"
    assert set(report["steps"]) == {"install", "preflight", "devices", "kernel", "tests", "bench"}
    assert report["steps"]["install"]["status"] == "skipped"
    assert report["steps"]["preflight"]["status"] == "ok"
    assert report["preflight"]["kernel"] in ("shipped PTX", "CuPy NVRTC")
    assert report["preflight"]["imports"]["hypothesis"]
    assert report["finished"] is True
    assert report["steps"]["devices"]["status"] == "ok"
    assert report["steps"]["kernel"]["status"] in ("ok", "skipped")
    assert report["steps"]["bench"]["status"] == "ok"
    assert {p.name for p in out.iterdir()} == {
        "gpu-report.json",
        "gpu-check.log",
        "gpu-junit.xml",
        "gpu-bench.json",
    }
    assert code == (0 if report["passed"] else 1)
    if report["steps"]["kernel"]["status"] == "ok":  # NVRTC here: the kernels built, no nvcc
        build = report["kernel"]["build"]
        assert build["exit"] == 0
        leaf = build["kernels"]["vramcore_leaf_hashes"]
        assert leaf["spill_stores"] == 0 and leaf["registers"] > 0


@pytest.mark.slow  # the dry run builds and runs the whole GPU check (about 15 s)
def test_dry_run_gpu_tests_ran_on_the_fake_runtime(
    dry_run: tuple[int, dict[str, Any], Path],
) -> None:
    _code, report, _out = dry_run
    cases = report["tests"]["cases"]
    passed = [c["id"] for c in cases if c["outcome"] == "passed"]
    assert len(passed) >= 40, report["tests"]["counts"]
    assert any("TestGpuBackendContract" in c and "[cupy" in c for c in passed)
    assert any("test_bit_flips" in c for c in passed)
    # The PyCUDA backend ran on its stand-in driver, its digest without nvcc.
    assert any("test_the_device_digest_needs_no_nvcc" in c for c in passed)
    assert any("test_pycuda_contract_fake" in c for c in passed)
    failed = {c["id"]: c.get("message", "") for c in cases if c["outcome"] in ("failed", "error")}
    unexpected = {k: v for k, v in failed.items() if k not in KNOWN_FAILURES}
    assert unexpected == {}


@pytest.mark.slow  # the dry run builds and runs the whole GPU check (about 15 s)
def test_dry_run_devices_say_why_without_a_traceback(
    dry_run: tuple[int, dict[str, Any], Path],
) -> None:
    _code, report, _out = dry_run
    for backend in ("cupy", "pycuda"):
        row = report["devices"][backend]
        assert not row.get("traceback")
        if row["exit"] != 0:  # no GPU here: a configuration error naming the reason
            assert row["exit"] == 2
            assert "cannot run here" in row["json"]["error"]["message"]


@pytest.mark.slow  # the dry run builds and runs the whole GPU check (about 15 s)
def test_dry_run_benchmark_is_marked_fake(dry_run: tuple[int, dict[str, Any], Path]) -> None:
    _code, report, _out = dry_run
    bench = report["benchmark"]
    assert bench["mode"] == "fake"
    assert bench["device_copy"] is None
    (cupy,) = [b for b in bench["backends"] if b["backend"] == "cupy"]
    assert cupy["verify"] and all(r["device_digest_gbps"] > 0 for r in cupy["verify"])
    # the signed model directory seal ran (signed by the test kit: no model_signing there)
    seal_dir = cupy["seal_dir"]
    assert seal_dir["unsigned_gbps"] > 0 and seal_dir["signed_gbps"] > 0
    target = cupy["targets"]["signed_seal_dir_over_unsigned"]
    assert target["at_most"] is True and target["measured"] == seal_dir["signed_over_unsigned"]


def _wheel(folder: Path, name: str, files: list[str]) -> None:
    with zipfile.ZipFile(folder / name, "w") as zf:
        for f in files:
            zf.writestr(f, "x")


def test_check_wheels_names_what_a_gpu_run_would_miss(tmp_path: Path) -> None:
    gc = _script()
    state = gc.check_wheels(tmp_path)
    assert "no vramcore wheel (scripts/gpu-check --build-wheels)" in state["problems"]
    assert any("PyCUDA" in p for p in state["problems"])
    _wheel(tmp_path, "vramcore-0.1.0-py3-none-any.whl", ["vramcore/kernels/merkle_sha256.cu"])
    for name in ("vramcore_allocator_mock", "vramcore_allocator_cupy", "vramcore_allocator_pycuda"):
        _wheel(tmp_path, f"{name}-0.1.0-py3-none-any.whl", [])
    for dep in (
        "cryptography-50.0-cp311-abi3-x.whl",
        "cffi-2.1-cp312-x.whl",
        "pycparser-3-py3.whl",
    ):
        _wheel(tmp_path, dep, [])
    assert (
        "no hypothesis wheel (scripts/gpu-check --build-wheels)"
        in gc.check_wheels(tmp_path)["problems"]
    )
    for dep in gc.TEST_WHEELS:
        _wheel(tmp_path, f"{dep}-1.0-py3-none-any.whl", [])
    _wheel(tmp_path, "pycuda-2026.1-cp312-cp312-linux_x86_64.whl", [])
    state = gc.check_wheels(tmp_path)
    assert state["problems"] == [
        "vramcore-0.1.0-py3-none-any.whl lacks vramcore/kernels/merkle_sha256.ptx",
        "vramcore-0.1.0-py3-none-any.whl lacks vramcore/kernels/host_shim.h",
        "vramcore-0.1.0-py3-none-any.whl lacks vramcore/kernels/host_launch.cpp",
    ]
    _wheel(tmp_path, "cffi-1.0-cp312-x.whl", [])
    assert any("2 wheels of cffi" in p for p in gc.check_wheels(tmp_path)["problems"])


def _table_module() -> Any:
    path = ROOT / "benchmarks" / "gpu" / "results_table.py"
    spec = importlib.util.spec_from_file_location("results_table", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # the dry run builds and runs the whole GPU check (about 15 s)
def test_results_table_refuses_a_dry_run(dry_run: tuple[int, dict[str, Any], Path]) -> None:
    _code, report, _out = dry_run
    table = _table_module()
    with pytest.raises(table.NotAGpuRun):
        table.render(report)


def test_results_table_from_a_gpu_report(tmp_path: Path) -> None:
    table = _table_module()
    gib = 1 << 30
    report = {
        "dry_run": False,
        "mode": "full",
        "started_utc": "2026-12-01T10:00:00+00:00",
        "environment": {
            "commit": "0123456789abcdef",
            "gpus": [{"name": "NVIDIA H100 80GB HBM3", "driver_version": "580.159.04"}],
        },
        "tests": {"counts": {"passed": 120, "skipped": 3}},
        "benchmark": {
            "mode": "full",
            "device_copy": {"copy_gbps": 1500.0},
            "backends": [
                {
                    "backend": "cupy",
                    "verify": [
                        {
                            "bytes": gib,
                            "device_digest_gbps": 150.0,
                            "host_path_gbps": 5.0,
                            "device_over_host": 30.0,
                        },
                        {"bytes": 4 * gib, "device_digest_gbps": 320.0},
                    ],
                    "h2d_gbps": 50.0,
                    "seal_file": {"bytes": 4 * gib, "seal_gbps": 42.0, "over_h2d": 0.84},
                    "targets": {"verify_gbps_at_1GiB": {"met": True}},
                },
                {"backend": "pycuda", "skipped": "PyCUDA is not installed"},
            ],
        },
    }
    text = table.render(report)
    assert "NVIDIA H100 80GB HBM3, driver 580.159.04, commit `0123456789ab`" in text
    assert "| cupy | device verify, 4 GiB | 320.0 GB/s (0.21x copy) | >= 300 GB/s |" in text
    assert "| cupy | host path, 1 GiB | 5.0 GB/s (device 30.0x) | device >= 20x |" in text
    assert "| pycuda | — | not measured: PyCUDA is not installed | — |" in text
    assert table.result_name(report) == "2026-12-01-nvidia-h100-80gb-hbm3.json"
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    assert table.main([str(path), "--save", str(tmp_path / "results")]) == 0
    assert (tmp_path / "results" / "2026-12-01-nvidia-h100-80gb-hbm3.json").is_file()


def test_kernel_check_pattern_matches_its_host_root() -> None:
    spec = importlib.util.spec_from_file_location(
        "kernel_check", ROOT / "benchmarks" / "gpu" / "kernel_check.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pytest.importorskip("numpy")
    words = [(k * 2654435761) % 2**32 for k in range(3)]
    expected = b"".join(w.to_bytes(4, "little") for w in words)[:9]
    assert module.pattern(9).tobytes() == expected
    assert len(module.host_root(65537)) == 64


@pytest.mark.parametrize("missing", ["vramcore_allocator_pycuda", "hypothesis"])
def test_dry_run_fails_when_a_wheel_or_test_dependency_is_missing(
    tmp_path: Path, missing: str
) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _complete_wheels(wheels)
    for w in wheels.glob(f"{missing}-*.whl"):
        w.unlink()
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--wheels", str(wheels)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    report = json.loads((out / "gpu-report.json").read_text())
    assert done.returncode == 1
    assert report["steps"]["install"]["status"] == "error"
    assert f"no {missing.replace('_', '-')} wheel" in report["steps"]["install"]["detail"]
    assert set(report["steps"]) == {"install"}, "nothing runs after a failed install check"


def test_step_limits_fit_the_device_call() -> None:
    gc = _script()
    assert sum(full for full, _ in gc.LIMITS.values()) <= 540
    assert sum(quick for _, quick in gc.LIMITS.values()) <= 270
    assert gc.LIMITS["preflight"] == (10, 10)


def test_the_report_is_rewritten_after_every_step(tmp_path: Path) -> None:
    gc = _script()
    run = gc.Run(tmp_path, quick=True, dry_run=True)
    run.step("install", "ok", 1.0)
    first = json.loads((tmp_path / "gpu-report.json").read_text())
    assert list(first["steps"]) == ["install"] and "finished" not in first
    run.step("tests", "failed", 2.0, "1 failed")
    second = json.loads((tmp_path / "gpu-report.json").read_text())
    assert list(second["steps"]) == ["install", "tests"] and second["passed"] is False
    assert run.finish() == 1
    assert json.loads((tmp_path / "gpu-report.json").read_text())["finished"] is True


def test_a_digest_not_on_the_device_is_reported_never_timed() -> None:
    table = _table_module()
    report = {
        "dry_run": False,
        "mode": "quick",
        "started_utc": "2026-12-01T10:00:00+00:00",
        "environment": {"commit": "0123456789abcdef", "gpus": [{"name": "NVIDIA H200"}]},
        "tests": {"counts": {"passed": 1}},
        "benchmark": {
            "mode": "quick",
            "device_copy": None,
            "backends": [
                {
                    "backend": "pycuda",
                    "verify": [{"bytes": 1 << 30, "not_on_device": "no NVRTC, stale PTX"}],
                    "h2d_gbps": 50.0,
                    "seal_file": {"bytes": 1 << 30, "seal_gbps": 40.0, "over_h2d": 0.8},
                    "targets": {},
                }
            ],
        },
    }
    assert "| pycuda | device verify, 1 GiB | not on device | >= 100 GB/s |" in table.render(report)


# -- --build-wheels ---------------------------------------------------------------------------


def _stand_in_dependency(folder: Path, name: str) -> None:
    """A minimal, valid pure-Python wheel named ``name`` (pip can download it offline)."""
    dist = f"{name.replace('-', '_')}-99.0"
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as zf:
        zf.writestr(
            f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 99.0\n"
        )
        zf.writestr(
            f"{dist}.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        zf.writestr(f"{dist}.dist-info/RECORD", "")


def _path_without_nvcc(folder: Path) -> str:
    """A ``PATH`` of one folder holding only what ``--build-wheels`` runs: git and python3."""
    folder.mkdir()
    for tool in ("git", "python3"):
        found = shutil.which(tool)
        assert found is not None, f"{tool} is needed to build the wheels"
        (folder / tool).symlink_to(found)
    return str(folder)


@pytest.mark.slow  # builds four wheels with uv and downloads from a local folder (about 15 s)
def test_build_wheels_fills_a_wheelhouse_without_nvcc_or_a_registry(tmp_path: Path) -> None:
    gc = _script()
    links = tmp_path / "links"
    links.mkdir()
    for dep in (*gc.EXTRA_WHEELS, *gc.TEST_WHEELS):
        _stand_in_dependency(links, dep)
    house = tmp_path / "house"
    env = {**os.environ, "PATH": _path_without_nvcc(tmp_path / "bin")}
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--build-wheels",
            "--wheels",
            str(house),
            "--find-links",
            str(links),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    pycuda_lines = [line for line in done.stdout.splitlines() if line.startswith("PyCUDA:")]
    assert pycuda_lines == [
        "PyCUDA: skipped: no nvcc on PATH (scripts/build-pycuda-wheel needs the CUDA toolkit); "
        "the PyCUDA GPU tests will skip on the GPU machine"
    ]
    wheels = sorted(p.name for p in house.glob("*.whl"))
    for package in gc.PACKAGES:
        version = tomllib.loads(_pyproject(package).read_text())["project"]["version"]
        assert f"{package.replace('-', '_')}-{version}-py3-none-any.whl" in wheels
    for dep in (*gc.EXTRA_WHEELS, *gc.TEST_WHEELS):
        assert f"{dep.replace('-', '_')}-99.0-py3-none-any.whl" in wheels, dep
    assert len(wheels) == len(gc.PACKAGES) + len(gc.EXTRA_WHEELS) + len(gc.TEST_WHEELS)
    core = next(w for w in wheels if w.startswith("vramcore-"))
    with zipfile.ZipFile(house / core) as zf:
        names = set(zf.namelist())
    assert {f"vramcore/kernels/{f}" for f in gc.KERNEL_FILES} <= names
    info = json.loads((house / "BUILD-INFO.json").read_text())
    assert info["commit"] == gc._git("rev-parse", "HEAD")
    assert isinstance(info["dirty"], bool)
    assert dt.datetime.fromisoformat(info["built_utc"]).tzinfo is not None
    assert gc.check_wheels(house)["problems"] == [
        "no PyCUDA wheel (scripts/build-pycuda-wheel): the pycuda tests will skip"
    ]


def _pyproject(package: str) -> Path:
    if package == "vramcore":
        return ROOT / "pyproject.toml"
    return ROOT / "plugins" / package.removeprefix("vramcore-").replace("-", "_") / "pyproject.toml"


def test_build_wheels_keeps_an_existing_pycuda_wheel_and_skips_without_nvcc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gc = _script()
    monkeypatch.setattr(gc.shutil, "which", lambda name: None)  # no nvcc
    line = gc.pycuda_wheel(tmp_path)
    assert line.startswith("PyCUDA: skipped: no nvcc on PATH")
    assert "\n" not in line
    _wheel(tmp_path, "pycuda-2026.1-cp312-cp312-linux_x86_64.whl", [])
    assert gc.pycuda_wheel(tmp_path) == (
        f"PyCUDA: keeping pycuda-2026.1-cp312-cp312-linux_x86_64.whl (already in {tmp_path})"
    )


def test_find_links_without_build_wheels_is_a_usage_error() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--find-links", "x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--find-links goes with --build-wheels" in done.stderr
    assert "Traceback" not in done.stderr
