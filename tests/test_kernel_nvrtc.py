"""The device digest kernel compiles with NVRTC for sm_80 and sm_90 (no GPU needed).

NVRTC is the compiler CuPy's ``RawModule`` uses; NVIDIA ships it as a pip package
(``nvidia-cuda-nvrtc-cu12``, in the dev group), and it runs without a driver. A syntax or type
error in device code therefore fails here, in CI, not in a scarce GPU session. The library is
loaded with :mod:`ctypes` so the check does not depend on CuPy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import re
from pathlib import Path

import pytest

from vramcore import kernels
from vramcore.kernels import _nvrtc

ARCHES = ["sm_80", "sm_90"]


def _find_nvrtc() -> str | None:
    """The NVRTC shared library: from the pip package if installed, else the system's."""
    spec = importlib.util.find_spec("nvidia")
    for root in list(spec.submodule_search_locations or []) if spec else []:
        for candidate in sorted(Path(root, "cuda_nvrtc", "lib").glob("libnvrtc.so*")):
            if "builtins" not in candidate.name and "alt" not in candidate.name:
                return str(candidate)
    return ctypes.util.find_library("nvrtc")


class Nvrtc:
    """The few NVRTC calls a compile needs."""

    def __init__(self, path: str) -> None:
        self.lib = ctypes.CDLL(path)
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what}: {self.lib.nvrtcGetErrorString(status).decode()}")

    def version(self) -> tuple[int, int]:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "version")
        return major.value, minor.value

    def compile(self, source: str, options: list[str]) -> tuple[int, bytes, str]:
        """``(status, cubin, log)`` of compiling ``source``; cubin is empty on failure."""
        prog = ctypes.c_void_p()
        self._check(
            self.lib.nvrtcCreateProgram(
                ctypes.byref(prog), source.encode(), b"merkle_sha256.cu", 0, None, None
            ),
            "createProgram",
        )
        try:
            opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
            status = self.lib.nvrtcCompileProgram(prog, len(options), opts)
            size = ctypes.c_size_t()
            self._check(self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "logSize")
            log = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetProgramLog(prog, log), "getProgramLog")
            cubin = b""
            if status == 0:
                self._check(self.lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubinSize")
                buf = ctypes.create_string_buffer(size.value)
                self._check(self.lib.nvrtcGetCUBIN(prog, buf), "getCUBIN")
                cubin = buf.raw
            return status, cubin, log.value.decode(errors="replace")
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.fixture(scope="module")
def nvrtc() -> Nvrtc:
    """NVRTC through ctypes (skipped, saying what to install, when it is missing)."""
    path = _find_nvrtc()
    if path is None:
        pytest.skip("NVRTC not found: install nvidia-cuda-nvrtc-cu12 (in the dev group)")
    return Nvrtc(path)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHES)
def test_kernel_compiles_for(nvrtc: Nvrtc, arch: str) -> None:
    options = [f"-arch={arch}", *kernels.NVRTC_OPTIONS]
    status, cubin, log = nvrtc.compile(kernels.kernel_source(), options)
    assert status == 0, f"NVRTC {nvrtc.version()} failed for {arch}:\n{log}"
    assert cubin.startswith(b"\x7fELF")
    for name in kernels.KERNEL_NAMES:  # extern "C": the symbols keep their names
        assert name.encode() + b"\x00" in cubin
    assert "warning" not in log.lower(), log


def test_a_device_code_error_fails_the_compile(nvrtc: Nvrtc) -> None:
    broken = kernels.kernel_source().replace("vc_sha256_compress(s, w);", "vc_sha256_compress(s);")
    status, cubin, log = nvrtc.compile(broken, ["-arch=sm_90", *kernels.NVRTC_OPTIONS])
    assert status != 0
    assert cubin == b""
    assert "vc_sha256_compress" in log


@pytest.mark.parametrize("arch", ARCHES)
def test_leaf_kernels_fit_their_launch_bound_without_spills(nvrtc: Nvrtc, arch: str) -> None:
    # A spill in the hashing loop puts the message schedule in local memory: the launch
    # bound (kernels.MAX_BLOCK threads) must leave the registers the loop needs.
    options = [f"-arch={arch}", *kernels.NVRTC_OPTIONS, "-Xptxas=-v"]
    status, _cubin, log = nvrtc.compile(kernels.kernel_source(), options)
    assert status == 0, log
    for name in (kernels.LEAF_KERNEL, kernels.INDEX_KERNEL):
        found = re.search(
            rf"entry function '{name}'.*?(\d+) bytes spill stores, (\d+) bytes spill loads"
            rf".*?Used (\d+) registers",
            log,
            re.S,
        )
        assert found, log
        stores, loads, registers = map(int, found.groups())
        assert (stores, loads) == (0, 0), f"{name} spills on {arch}: {found.group(0)}"
        assert registers * kernels.MAX_BLOCK <= 65536, f"{name}: {registers} registers"


def test_a_launch_bound_too_large_for_the_registers_spills(nvrtc: Nvrtc) -> None:
    # The check above can fail: at 768 threads the loop no longer fits 80 registers.
    source = kernels.kernel_source().replace(
        f"#define VC_MAX_BLOCK {kernels.MAX_BLOCK}", "#define VC_MAX_BLOCK 768"
    )
    status, _cubin, log = nvrtc.compile(
        source, ["-arch=sm_90", *kernels.NVRTC_OPTIONS, "-Xptxas=-v"]
    )
    assert status == 0, log
    spills = re.search(
        rf"entry function '{kernels.LEAF_KERNEL}'.*?(\d+) bytes spill stores", log, re.S
    )
    assert spills and int(spills.group(1)) > 0


# -- the image a GPU machine loads: NVRTC's cubin, else the shipped PTX ------------------------


def test_shipped_ptx_was_built_from_this_kernel_source() -> None:
    text, recorded = _nvrtc.shipped_ptx()
    assert recorded == _nvrtc.source_digest(kernels.kernel_source()), (
        "vramcore/kernels/merkle_sha256.ptx is stale: run scripts/build-kernel-ptx"
    )
    for name in kernels.KERNEL_NAMES:
        assert f".visible .entry {name}(" in text
    assert f".target {_nvrtc.PTX_ARCH.replace('compute', 'sm')}" in text


def test_kernel_image_is_nvrtcs_cubin_when_nvrtc_loads(nvrtc: Nvrtc) -> None:
    image = _nvrtc.kernel_image(kernels.kernel_source(), "sm_90", kernels.NVRTC_OPTIONS)
    assert image.kind == "cubin" and image.data.startswith(b"\x7fELF")
    assert image.origin.startswith("NVRTC ") and image.origin.endswith("sm_90")
    assert image.nvrtc_failure is None


def test_kernel_image_falls_back_to_the_shipped_ptx_without_nvrtc(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_nvrtc, "find_nvrtc", lambda: [])
    monkeypatch.setattr(_nvrtc, "_LOADED", {})
    image = _nvrtc.kernel_image(kernels.kernel_source(), "sm_90", kernels.NVRTC_OPTIONS)
    assert image.kind == "ptx" and image.data.endswith(b"\0")
    assert image.nvrtc_failure is not None and "no libnvrtc" in image.nvrtc_failure
    assert b".visible .entry vramcore_leaf_hashes_at(" in image.data


def test_kernel_image_refuses_a_ptx_built_from_another_source(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_nvrtc, "find_nvrtc", lambda: [])
    monkeypatch.setattr(_nvrtc, "_LOADED", {})
    with pytest.raises(_nvrtc.KernelCompileError, match="another kernel source"):
        _nvrtc.kernel_image(kernels.kernel_source() + "\n", "sm_90", kernels.NVRTC_OPTIONS)


def test_a_broken_library_is_reported_not_raised_bare(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "libnvrtc.so.99"
    fake.write_bytes(b"not an ELF file")
    monkeypatch.setattr(_nvrtc, "find_nvrtc", lambda: [str(fake)])
    monkeypatch.setattr(_nvrtc, "_LOADED", {})
    with pytest.raises(_nvrtc.KernelCompileError, match=r"libnvrtc\.so\.99: OSError"):
        _nvrtc.nvrtc_compile(kernels.kernel_source(), "sm_90")
    with pytest.raises(_nvrtc.KernelCompileError, match="not a CUDA architecture"):
        _nvrtc.nvrtc_compile("", "90")
