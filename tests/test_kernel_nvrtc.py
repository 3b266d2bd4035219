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
from pathlib import Path

import pytest

from vramcore import kernels

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
