"""The device digest kernel compiles with NVRTC for sm_80 and sm_90 (no GPU needed).

NVRTC is the compiler CuPy's ``RawModule`` uses; NVIDIA ships it as a pip package
(``nvidia-cuda-nvrtc-cu12``, in the dev group), and it runs without a driver. A syntax or type
error in device code therefore fails here, in CI, not in a scarce GPU session. The compiles go
through the loader that ships (:mod:`vramcore.kernels._nvrtc`, which the GPU backends use when
CuPy's compiler is missing), so the code tested is the code a GPU machine runs; it does not
depend on CuPy.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from vramcore import kernels
from vramcore.kernels import _nvrtc

ARCHES = ["sm_80", "sm_90"]


@pytest.fixture(scope="module")
def nvrtc_version() -> tuple[int, int]:
    """The version of the NVRTC the production loader finds (skipped, saying what to install,
    when it finds none)."""
    try:
        return _nvrtc.nvrtc_version()
    except _nvrtc.KernelCompileError as exc:
        pytest.skip(f"NVRTC not found: install nvidia-cuda-nvrtc-cu12 (in the dev group): {exc}")


def _compile(source: str, arch: str, *extra: str) -> tuple[bytes, str]:
    return _nvrtc.nvrtc_compile(source, arch, (*kernels.NVRTC_OPTIONS, *extra))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHES)
def test_kernel_compiles_for(nvrtc_version: tuple[int, int], arch: str) -> None:
    cubin, log = _compile(kernels.kernel_source(), arch)
    assert cubin.startswith(b"\x7fELF"), f"NVRTC {nvrtc_version} gave no cubin for {arch}"
    for name in kernels.KERNEL_NAMES:  # extern "C": the symbols keep their names
        assert name.encode() + b"\x00" in cubin
    assert "warning" not in log.lower(), log


def test_a_device_code_error_fails_the_compile(nvrtc_version: tuple[int, int]) -> None:
    broken = kernels.kernel_source().replace("vc_sha256_compress(s, w);", "vc_sha256_compress(s);")
    with pytest.raises(_nvrtc.KernelCompileError, match="could not compile") as info:
        _compile(broken, "sm_90")
    assert "vc_sha256_compress" in str(info.value), "the compiler's log is the message"


@pytest.mark.parametrize("arch", ARCHES)
def test_leaf_kernels_fit_their_launch_bound_without_spills(
    nvrtc_version: tuple[int, int], arch: str
) -> None:
    # A spill in the hashing loop puts the message schedule in local memory: the launch
    # bound (kernels.MAX_BLOCK threads) must leave the registers the loop needs.
    _cubin, log = _compile(kernels.kernel_source(), arch, "-Xptxas=-v")
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


def test_a_launch_bound_too_large_for_the_registers_spills(
    nvrtc_version: tuple[int, int],
) -> None:
    # The check above can fail: at 768 threads the loop no longer fits 80 registers.
    source = kernels.kernel_source().replace(
        f"#define VC_MAX_BLOCK {kernels.MAX_BLOCK}", "#define VC_MAX_BLOCK 768"
    )
    _cubin, log = _compile(source, "sm_90", "-Xptxas=-v")
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


def test_kernel_image_is_nvrtcs_cubin_when_nvrtc_loads(nvrtc_version: tuple[int, int]) -> None:
    image = _nvrtc.kernel_image(kernels.kernel_source(), "sm_90", kernels.NVRTC_OPTIONS)
    assert image.kind == "cubin" and image.data.startswith(b"\x7fELF")
    assert image.origin == f"NVRTC {nvrtc_version[0]}.{nvrtc_version[1]} sm_90"
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


def _tiny(tag: str) -> str:
    return f'// {tag}\nextern "C" __global__ void tiny(int *x) {{ *x = 1; }}\n'


def test_a_compile_is_kept_per_source_and_options_but_not_a_failure(
    nvrtc_version: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    import secrets

    loaded = _nvrtc._nvrtc()
    calls: list[str] = []
    real = _nvrtc._Nvrtc._compile

    def counted(self: Any, source: str, options: list[str], ptx: bool) -> tuple[bytes, str]:
        calls.append(source)
        return real(self, source, options, ptx)

    monkeypatch.setattr(_nvrtc._Nvrtc, "_compile", counted)
    source = _tiny(secrets.token_hex(8))
    first = _nvrtc.nvrtc_compile(source, "sm_90")
    assert _nvrtc.nvrtc_compile(source, "sm_90") == first and len(calls) == 1
    _nvrtc.nvrtc_compile(source, "sm_80")  # another architecture is another compile
    _nvrtc.nvrtc_compile(source + " ", "sm_90")  # so is any other source text
    assert len(calls) == 3
    broken = source.replace("*x = 1;", "*x = ;")
    for _ in range(2):
        with pytest.raises(_nvrtc.KernelCompileError, match="could not compile"):
            _nvrtc.nvrtc_compile(broken, "sm_90")
    assert calls.count(broken) == 2  # a failure is compiled (and reported) every time
    for i in range(_nvrtc._MAX_COMPILED + 2):
        _nvrtc.nvrtc_compile(_tiny(f"{secrets.token_hex(4)} {i}"), "sm_90")
    assert len(loaded._compiled) <= _nvrtc._MAX_COMPILED
