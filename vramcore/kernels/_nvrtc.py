"""The digest kernels as a loadable image, without ``nvcc``: NVRTC, else the shipped PTX.

A GPU machine need not have the CUDA toolkit. :func:`kernel_image` compiles the kernel source
with NVRTC (loaded with :mod:`ctypes`, from the ``nvidia-cuda-nvrtc`` wheel, CuPy's CUDA, or
the system's; no GPU needed) into a cubin for the device's architecture. Where no NVRTC
loads or it fails, it returns the PTX shipped in this package (:data:`PTX_FILE`, built for
``compute_80`` by ``scripts/build-kernel-ptx``), which the driver compiles for any GPU from
sm_80 up when the module is loaded (``cuModuleLoadData``: PyCUDA's ``module_from_buffer``,
CuPy's ``RawModule(path=...)``).

Nothing here imports a GPU library; NVRTC is opened only when a backend asks for an image.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import hashlib
import importlib.resources
import importlib.util
import os
import re
import threading
from pathlib import Path

import attrs

__all__ = [
    "PTX_ARCH",
    "PTX_FILE",
    "KernelCompileError",
    "KernelImage",
    "find_nvrtc",
    "kernel_image",
    "nvrtc_compile",
    "ptx_text",
    "shipped_ptx",
    "source_digest",
]

#: PTX shipped in the package (text), for GPUs whose machine has no NVRTC.
PTX_FILE = "merkle_sha256.ptx"
#: The virtual architecture of :data:`PTX_FILE`: every GPU from Ampere (sm_80) up JIT-compiles it.
PTX_ARCH = "compute_80"
_SOURCE_LINE = "// vramcore kernel source sha256: "
_NVRTC_LINE = "// built by NVRTC "


class KernelCompileError(RuntimeError):
    """The kernels could not be compiled or found (the message says why; no pointer in it)."""


@attrs.frozen(kw_only=True)
class KernelImage:
    """A module image the CUDA driver loads.

    :attr data: the cubin (ELF) or PTX text as bytes (PTX is NUL-terminated, as
        ``cuModuleLoadData`` wants).
    :attr kind: ``"cubin"`` or ``"ptx"``.
    :attr origin: where it came from, for logs and reports (``"NVRTC 12.9 sm_90"``, ``"shipped
        PTX compute_80"``).
    :attr nvrtc_failure: why NVRTC was not used, when the image is the shipped PTX.
    """

    data: bytes
    kind: str
    origin: str
    nvrtc_failure: str | None = None


def source_digest(source: str) -> str:
    """SHA-256 (hex) of the kernel source, recorded in the shipped PTX to detect staleness."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def _wheel_candidates() -> list[str]:
    found: list[str] = []
    spec = importlib.util.find_spec("nvidia")
    for root in list(spec.submodule_search_locations or []) if spec else []:
        for sub in ("cuda_nvrtc/lib", "cu13/lib", "cu12/lib"):
            found += sorted(glob.glob(os.path.join(root, sub, "libnvrtc.so*")))
    return found


def _system_candidates() -> list[str]:
    found: list[str] = []
    name = ctypes.util.find_library("nvrtc")
    if name:
        found.append(name)
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            found += sorted(glob.glob(os.path.join(root, "lib64", "libnvrtc.so*")))
    return found


def find_nvrtc() -> list[str]:
    """Candidate NVRTC libraries, best first: ``$VRAMCORE_NVRTC``, the pip wheels, the system."""
    explicit = os.environ.get("VRAMCORE_NVRTC")
    candidates = [explicit] if explicit else []
    candidates += _wheel_candidates() + _system_candidates()
    return [
        c
        for c in dict.fromkeys(candidates)
        if "builtins" not in Path(c).name and ".alt." not in Path(c).name
    ]


#: Compiles an NVRTC library keeps (each ~100 KiB): a backend made again in the same process
#: (a manager closed and opened, every test on a fake driver) does not compile again.
_MAX_COMPILED = 16


class _Nvrtc:
    """The few NVRTC calls a compile needs, through ctypes; each compile's output is kept,
    keyed by the whole source text, the options and the output kind (errors are not kept)."""

    def __init__(self, path: str) -> None:
        self._compiled: dict[tuple[str, tuple[str, ...], bool], tuple[bytes, str]] = {}
        self._compiled_lock = threading.Lock()
        self.lib = ctypes.CDLL(path)
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "version")
        self.version = (major.value, minor.value)

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            text = self.lib.nvrtcGetErrorString(status) or b"unknown error"
            raise KernelCompileError(f"NVRTC {what}: {text.decode(errors='replace')}")

    def compile(self, source: str, options: list[str], ptx: bool) -> tuple[bytes, str]:
        key = (source, tuple(options), ptx)
        with self._compiled_lock:
            done = self._compiled.get(key)
        if done is not None:
            return done
        done = self._compile(source, options, ptx)
        with self._compiled_lock:
            if len(self._compiled) >= _MAX_COMPILED:
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[key] = done
        return done

    def _compile(self, source: str, options: list[str], ptx: bool) -> tuple[bytes, str]:
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
            self._check(self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "log size")
            log = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetProgramLog(prog, log), "log")
            text = log.value.decode(errors="replace")
            if status != 0:
                raise KernelCompileError(f"NVRTC {self.version} could not compile:\n{text[-2000:]}")
            get_size, get = (
                (self.lib.nvrtcGetPTXSize, self.lib.nvrtcGetPTX)
                if ptx
                else (self.lib.nvrtcGetCUBINSize, self.lib.nvrtcGetCUBIN)
            )
            self._check(get_size(prog, ctypes.byref(size)), "output size")
            out = ctypes.create_string_buffer(size.value)
            self._check(get(prog, out), "output")
            return out.raw, text
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


_LOADED: dict[str, _Nvrtc] = {}
_LOCK = threading.Lock()


def _nvrtc() -> _Nvrtc:
    failures = []
    with _LOCK:
        for path in find_nvrtc():
            if path in _LOADED:
                return _LOADED[path]
            try:
                _LOADED[path] = _Nvrtc(path)
                return _LOADED[path]
            except (OSError, AttributeError, KernelCompileError) as exc:
                failures.append(f"{Path(path).name}: {type(exc).__name__}: {str(exc)[:120]}")
    why = "; ".join(failures) if failures else "no libnvrtc found (pip install nvidia-cuda-nvrtc)"
    raise KernelCompileError(f"NVRTC is not available: {why}")


def nvrtc_compile(source: str, arch: str, options: tuple[str, ...] = ()) -> tuple[bytes, str]:
    """Compile ``source`` with NVRTC: a cubin for ``sm_XY``, PTX for ``compute_XY``.

    :return: ``(image, log)``; a PTX image is NUL-terminated.
    :raises KernelCompileError: no NVRTC loads, or the compile failed (its log is the message).
    """
    if not re.fullmatch(r"(sm|compute)_\d{2,3}[a-z]?", arch):
        raise KernelCompileError(f"not a CUDA architecture: {arch!r}")
    nvrtc = _nvrtc()
    return nvrtc.compile(source, [f"-arch={arch}", *options], ptx=arch.startswith("compute_"))


def nvrtc_version() -> tuple[int, int]:
    """The version of the NVRTC :func:`nvrtc_compile` uses (raises if there is none)."""
    return _nvrtc().version


def ptx_text(source: str, options: tuple[str, ...]) -> str:
    """The text of :data:`PTX_FILE` for ``source``: NVRTC's PTX with a provenance header."""
    image, _log = nvrtc_compile(source, PTX_ARCH, options)
    major, minor = nvrtc_version()
    body = image.rstrip(b"\0").decode("ascii")
    header = f"{_SOURCE_LINE}{source_digest(source)}\n{_NVRTC_LINE}{major}.{minor} for {PTX_ARCH}\n"
    return header + body


def shipped_ptx() -> tuple[str, str | None]:
    """``(text, source sha256 recorded in it)`` of the PTX shipped in this package."""
    text = importlib.resources.files(__package__).joinpath(PTX_FILE).read_text(encoding="ascii")
    first = text.split("\n", 1)[0]
    recorded = first[len(_SOURCE_LINE) :].strip() if first.startswith(_SOURCE_LINE) else None
    return text, recorded


def kernel_image(source: str, arch: str, options: tuple[str, ...]) -> KernelImage:
    """The kernels for a GPU of architecture ``arch`` (``"sm_90"``), ready for the driver.

    NVRTC's cubin when NVRTC is here and compiles; else the shipped PTX when it was built from
    this very source; else :class:`KernelCompileError` saying both reasons.
    """
    try:
        cubin, _log = nvrtc_compile(source, arch, options)
        major, minor = nvrtc_version()
        return KernelImage(data=cubin, kind="cubin", origin=f"NVRTC {major}.{minor} {arch}")
    except KernelCompileError as exc:
        nvrtc_failure = str(exc)[:300]
    try:
        text, recorded = shipped_ptx()
    except OSError as exc:
        raise KernelCompileError(f"{nvrtc_failure}; and no shipped PTX: {exc}") from None
    if recorded != source_digest(source):
        raise KernelCompileError(
            f"{nvrtc_failure}; and the shipped PTX was built from another kernel source "
            "(run scripts/build-kernel-ptx)"
        )
    return KernelImage(
        data=text.encode("ascii") + b"\0",
        kind="ptx",
        origin=f"shipped PTX {PTX_ARCH}",
        nvrtc_failure=nvrtc_failure,
    )
