"""scripts/build-pycuda-wheel without the three-minute build: arguments, preflight, and the
patchelf step (on a synthetic wheel, and on a real ELF library when patchelf and gcc exist)."""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.machinery
import importlib.util
import io
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "build-pycuda-wheel"
DRIVER = "pycuda/_driver.cpython-312-x86_64-linux-gnu.so"
RECORD = "pycuda-2026.1.dist-info/RECORD"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("build_pycuda_wheel", str(SCRIPT))
    spec = importlib.util.spec_from_loader("build_pycuda_wheel", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_pycuda_wheel"] = module  # dataclasses look their module up
    loader.exec_module(module)
    return module


# -- arguments -----------------------------------------------------------------------------


def test_defaults(script: ModuleType) -> None:
    opts = script.parse_args([])
    assert opts.python_version == "3.12"
    assert opts.pycuda_version == "2026.1"
    assert opts.out == SCRIPT.parent.parent / "dist" / "gpu-wheels"
    assert opts.with_deps
    assert opts.skip_deps == ("numpy", "markupsafe", "typing_extensions")
    assert not opts.check_only


def test_options(script: ModuleType, tmp_path: Path) -> None:
    sdist = tmp_path / "pycuda-2026.1.tar.gz"
    sdist.write_bytes(b"")
    opts = script.parse_args(
        ["--check", "--no-deps", "--carry-all", "--sdist", str(sdist), "--out", str(tmp_path)]
    )
    assert opts.check_only
    assert not opts.with_deps
    assert opts.skip_deps == ()
    assert opts.sdist == sdist
    assert opts.out == tmp_path


@pytest.mark.parametrize(
    "argv",
    [
        ["--python-version", "3"],
        ["--python-version", "three.twelve"],
        ["--pycuda-version", "latest"],
        ["--sdist", "/nonexistent/pycuda.tar.gz"],
        ["--frobnicate"],
    ],
)
def test_bad_arguments_exit_2(
    script: ModuleType, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        script.parse_args(argv)
    assert info.value.code == 2
    assert "build-pycuda-wheel" in capsys.readouterr().err


# -- preflight -----------------------------------------------------------------------------


def test_pyenv_versions_newest_patch_first(script: ModuleType, tmp_path: Path) -> None:
    for name in ("3.12.1", "3.12.10", "3.11.7", "3.12.3-debug"):
        (tmp_path / "versions" / name / "bin").mkdir(parents=True)
    found = script.python_candidates("3.12", {"PYENV_ROOT": str(tmp_path), "PATH": ""})
    assert [p.parent.parent.name for p in found] == ["3.12.10", "3.12.1"]


def test_cuda_root_from_the_environment(script: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda.h").write_text("")
    assert script.find_cuda_root(None, {"CUDA_HOME": str(tmp_path), "PATH": ""}) == tmp_path


def test_missing_prerequisites_are_all_named(
    script: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing_python = str(tmp_path / "no-python")
    code = script.main(
        ["--check", "--python", missing_python, "--cuda-root", str(tmp_path / "no-cuda")]
    )
    out = capsys.readouterr().out
    assert code == 2
    assert f"MISSING: --python {missing_python} does not run" in out
    assert "MISSING: CUDA toolkit headers (include/cuda.h) not found" in out
    assert "--cuda-root" in out
    assert "cannot build" in out


def test_a_python_of_the_wrong_version_is_named(
    script: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert script.main(["--check", "--python", sys.executable, "--python-version", "2.7"]) == 2
    here = "{}.{}".format(*sys.version_info[:2])
    assert f"is Python {here}, not 2.7" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs a C compiler")
def test_check_passes_when_everything_is_there(
    script: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda.h").write_text("")
    here = "{}.{}".format(*sys.version_info[:2])
    argv = ["--check", "--python", sys.executable, "--python-version", here]
    assert script.main([*argv, "--cuda-root", str(tmp_path)]) == 0
    assert "everything the build needs is here" in capsys.readouterr().out


def test_configure_disables_curand_and_links_the_stub(script: ModuleType) -> None:
    args = script.configure_args(Path("/opt/cuda"), Path("/tmp/stub"))
    assert args == [
        "--cuda-root=/opt/cuda",
        "--no-cuda-enable-curand",
        "--cudadrv-lib-dir=/tmp/stub",
    ]


def test_carried_dependencies_skip_what_the_image_has(script: ModuleType) -> None:
    skip = script.IMAGE_HAS
    assert script.skip_dependency("typing_extensions-4.16.0-py3-none-any.whl", skip)
    assert script.skip_dependency("MarkupSafe-3.0.4-cp312-cp312-manylinux2014_x86_64.whl", skip)
    assert script.skip_dependency("numpy-2.4.6-cp312-cp312-manylinux_2_28_x86_64.whl", skip)
    assert not script.skip_dependency("pytools-2026.1.1-py3-none-any.whl", skip)
    assert not script.skip_dependency("siphash24-1.9-cp312-cp312-manylinux2014_x86_64.whl", skip)


def test_import_outcomes(script: ModuleType) -> None:
    assert script.classify_import(0, "pycuda (2026, 1)") is None
    missing = "ImportError: libcuda.so.1: cannot open shared object file: No such file"
    assert script.classify_import(1, "Traceback ...\n" + missing) is None
    assert (
        script.classify_import(1, "Traceback ...\nImportError: undefined symbol: _ZN5boost")
        == "ImportError: undefined symbol: _ZN5boost"
    )
    assert script.classify_import(1, "") == "exit 1 with no output"


# -- the patchelf step on a synthetic wheel ------------------------------------------------


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    rows = [[name, _record_hash(data), str(len(data))] for name, data in members.items()]
    rows.append([RECORD, "", ""])
    record = io.StringIO()
    csv.writer(record, lineterminator="\n").writerows(rows)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr(RECORD, record.getvalue())
    return path


class FakePatchelf:
    """``needed``/``add_needed`` over a marker appended to the file, like a new DT_NEEDED."""

    def __init__(self, works: bool = True) -> None:
        self.works = works
        self.added: list[str] = []

    def needed(self, path: Path) -> list[str]:
        return ["libstdc++.so.6"] + (
            ["libcuda.so.1"] if b"NEEDS:libcuda" in path.read_bytes() else []
        )

    def add_needed(self, path: Path, lib: str) -> None:
        self.added.append(path.name)
        if self.works:
            path.write_bytes(path.read_bytes() + b"NEEDS:libcuda")


def _check_record(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        rows = list(csv.reader(io.StringIO(zf.read(RECORD).decode())))
        for name, digest, size in rows:
            if digest:
                data = zf.read(name)
                assert digest == _record_hash(data), f"RECORD hash of {name} is stale"
                assert int(size) == len(data)
        return zf.namelist()


def test_the_driver_extension_gets_libcuda(script: ModuleType, tmp_path: Path) -> None:
    members = {
        "pycuda/__init__.py": b"VERSION = (2026, 1)\n",
        DRIVER: b"\x7fELF driver",
        "pycuda/_pvt_struct.cpython-312-x86_64-linux-gnu.so": b"\x7fELF struct",
    }
    wheel = _wheel(tmp_path / "pycuda-2026.1-cp312-cp312-linux_x86_64.whl", members)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    tools = FakePatchelf()
    assert script.ensure_libcuda_needed(wheel, tools.needed, tools.add_needed, scratch) == [DRIVER]
    assert tools.added == [Path(DRIVER).name], "only the driver extension is patched"
    names = _check_record(wheel)
    assert names == [*members, RECORD], "member order changed"
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read(DRIVER).endswith(b"NEEDS:libcuda")
        assert zf.read("pycuda/__init__.py") == members["pycuda/__init__.py"]
    # A second run finds the dependency and changes nothing.
    before = wheel.read_bytes()
    assert script.ensure_libcuda_needed(wheel, tools.needed, tools.add_needed, scratch) == []
    assert wheel.read_bytes() == before


def test_a_patch_that_does_not_take_is_an_error(script: ModuleType, tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "w.whl", {DRIVER: b"\x7fELF"})
    tools = FakePatchelf(works=False)
    with pytest.raises(script.BuildError, match=r"did not add libcuda\.so\.1"):
        script.ensure_libcuda_needed(wheel, tools.needed, tools.add_needed, tmp_path)


def test_a_wheel_without_the_driver_is_an_error(script: ModuleType, tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "w.whl", {"pycuda/__init__.py": b""})
    tools = FakePatchelf()
    with pytest.raises(script.BuildError, match="no pycuda/_driver"):
        script.ensure_libcuda_needed(wheel, tools.needed, tools.add_needed, tmp_path)


def test_record_rewrite_refuses_unlisted_members(script: ModuleType) -> None:
    with pytest.raises(script.BuildError, match="does not list"):
        script.rewrite_record("a.py,sha256=x,1\n", {"b.so": b"new"})


@pytest.mark.parametrize(
    ("member", "expected"),
    [
        (DRIVER, True),
        ("pycuda/_driver.so", True),
        ("pycuda/_pvt_struct.cpython-312-x86_64-linux-gnu.so", False),
        ("pycuda/gl/_driver.so", False),
        ("pycuda/_driver.py", False),
    ],
)
def test_which_members_are_the_driver(script: ModuleType, member: str, expected: bool) -> None:
    assert script.is_driver_extension(member) is expected


# -- the patchelf step on a real library ---------------------------------------------------


def _patchelf() -> str | None:
    beside = Path(sys.executable).parent / "patchelf"
    return str(beside) if beside.is_file() else shutil.which("patchelf")


@pytest.mark.skipif(
    _patchelf() is None or shutil.which("gcc") is None, reason="needs patchelf and gcc"
)
def test_real_elf_linked_against_an_empty_stub(script: ModuleType, tmp_path: Path) -> None:
    stub = script.make_stub_libcuda(shutil.which("gcc"), tmp_path / "stub")
    src = tmp_path / "driver.c"
    src.write_text("int pycuda_driver_marker(void) { return 42; }\n")
    lib = tmp_path / "_driver.cpython-312-x86_64-linux-gnu.so"
    link = ["gcc", "-shared", "-fPIC", "-Wl,--as-needed", "-o", str(lib), str(src)]
    subprocess.run([*link, f"-L{stub}", "-lcuda"], check=True)
    patchelf = _patchelf()
    assert patchelf is not None
    needed, add_needed = script.patchelf_tools(patchelf)
    assert "libcuda.so.1" not in needed(lib), "the linker kept the empty stub after all"
    wheel = _wheel(tmp_path / "w.whl", {"pycuda/" + lib.name: lib.read_bytes()})
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    assert script.ensure_libcuda_needed(wheel, needed, add_needed, scratch) == [
        "pycuda/" + lib.name
    ]
    _check_record(wheel)
    with zipfile.ZipFile(wheel) as zf:
        (tmp_path / "out.so").write_bytes(zf.read("pycuda/" + lib.name))
    assert "libcuda.so.1" in needed(tmp_path / "out.so")


def test_newest_symbol_versions(script: ModuleType) -> None:
    listing = """
0000000000000000      DF *UND*  0000000000000000 (GLIBC_2.2.5) free
0000000000000000      DF *UND*  0000000000000000 (GLIBC_2.34) __libc_start_main
0000000000000000      DF *UND*  0000000000000000 (GLIBC_2.14) memcpy
0000000000000000      DF *UND*  0000000000000000 (GLIBCXX_3.4.9) _ZdlPv
0000000000000000      DF *UND*  0000000000000000 (GLIBCXX_3.4.29) _ZNSt7__cxx11
0000000000000000      DF *UND*  0000000000000000 (GLIBCXX_3.4.21) _ZNSs
0000000000000000      DF *UND*  0000000000000000 (CXXABI_1.3.9) _ZTVN10__cxxabiv
"""
    assert script.newest_symbol_versions(listing) == {
        "CXXABI": "1.3.9",
        "GLIBC": "2.34",
        "GLIBCXX": "3.4.29",
    }
    assert script.newest_symbol_versions("no versions here") == {}


def test_a_new_wheel_replaces_other_versions_only(script: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for name in (
        "pytools-2025.1-py3-none-any.whl",
        "pycuda-2025.1-cp312-cp312-linux_x86_64.whl",
        "vramcore_allocator_pycuda-0.1.0-py3-none-any.whl",
    ):
        (out / name).write_bytes(b"old")
    new = tmp_path / "pycuda-2026.1-cp312-cp312-linux_x86_64.whl"
    new.write_bytes(b"new")
    assert script.replace_wheel(new, out) == out / new.name
    assert sorted(p.name for p in out.iterdir()) == [
        "pycuda-2026.1-cp312-cp312-linux_x86_64.whl",
        "pytools-2025.1-py3-none-any.whl",
        "vramcore_allocator_pycuda-0.1.0-py3-none-any.whl",
    ]
    assert script.dist_name("Mako") == script.dist_name("mako-1.4.3-py3-none-any.whl")
