"""The shared ``rfc6962-sha256`` kernels (``vramcore.kernels``) run through PyCUDA.

The source is compiled with ``SourceModule`` (nvcc; PyCUDA also keeps the cubin in its disk
cache) once per device context and kept until the backend closes. The tree logic is the
core's :func:`vramcore.kernels.device_merkle`; this module supplies only its four
operations. When the kernels cannot be compiled here (no ``nvcc``), the backend answers
``None`` and the core hashes on the host, after one warning that says why.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from vramcore.backend import DeviceDigest
from vramcore.digest import leaf_count
from vramcore.errors import AllocationFailed, InsufficientVram, InvalidInput, VramError
from vramcore.kernels import (
    LEAF_KERNEL,
    LEVEL_KERNEL,
    NVRTC_OPTIONS,
    device_merkle,
    kernel_source,
)
from vramcore.validation import check_leaf_size, scrub_text

from ._api import DriverApi

__all__ = ["KernelCache", "check_leaf_range", "digest_allocation", "find_nvcc"]

log = logging.getLogger("vramcore.allocator_pycuda")


def find_nvcc(env: dict[str, str] | None = None) -> str | None:
    """``nvcc`` for ``SourceModule``: ``$VRAMCORE_PYCUDA_NVCC``, PATH, then the toolkit's."""
    env = dict(os.environ) if env is None else env
    explicit = env.get("VRAMCORE_PYCUDA_NVCC")
    if explicit:
        return explicit
    found = shutil.which("nvcc", path=env.get("PATH"))
    if found:
        return found
    for root in (env.get("CUDA_HOME"), env.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def check_leaf_range(nbytes: int, leaf_size: int, leaf_range: tuple[int, int] | None) -> None:
    """Refuse a bad leaf size or a range outside the buffer's leaves (``InvalidInput``)."""
    n = leaf_count(nbytes, check_leaf_size(leaf_size))
    if leaf_range is None:
        return
    try:
        first, stop = leaf_range
    except (TypeError, ValueError):
        raise InvalidInput("leaf_range must be a pair (first, stop)") from None
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (first, stop)):
        raise InvalidInput("leaf_range must hold two integers")
    if not 0 <= first < stop <= n:
        raise InvalidInput(f"leaf range ({first}, {stop}) is not within the {n} leaves")


class KernelCache:
    """The compiled module of one device context, and why it could not be built, if so."""

    def __init__(self, api: DriverApi) -> None:
        self._api = api
        self._lock = threading.Lock()
        self._module: Any = None
        self._functions: tuple[Any, Any] | None = None
        self.failure: str | None = None

    def functions(self, device: int) -> tuple[Any, Any] | None:
        """``(leaf, level)`` kernels (context current), compiled on first use; ``None`` when
        they cannot be (the reason is in :attr:`failure`, logged once)."""
        with self._lock:
            if self._functions is None and self.failure is None:
                self._compile(device)
            return self._functions

    def _compile(self, device: int) -> None:
        nvcc = find_nvcc()
        if nvcc is None:
            self.failure = "nvcc not found (set VRAMCORE_PYCUDA_NVCC or put it on PATH)"
        else:
            try:
                module = self._api.source_module(
                    kernel_source(), nvcc=nvcc, options=list(NVRTC_OPTIONS), no_extern_c=True
                )
                self._functions = (
                    module.get_function(LEAF_KERNEL),
                    module.get_function(LEVEL_KERNEL),
                )
                self._module = module
            except Exception as exc:  # CompileError, ExecError, driver errors
                self.failure = f"{type(exc).__name__}: {scrub_text(str(exc))[:300]}"
        if self.failure is not None:
            log.warning(
                "pycuda backend: the device digest kernels do not compile on GPU %d (%s); "
                "digests are computed on the host instead",
                device,
                self.failure,
            )

    def close(self) -> None:
        """Drop the module (context current, so PyCUDA unloads it here)."""
        with self._lock:
            self._functions = None
            self._module = None


class _Ops:
    """:class:`vramcore.kernels.KernelOps` over one PyCUDA allocation (context current)."""

    def __init__(self, api: DriverApi, functions: tuple[Any, Any], data: Any, device: int):
        import numpy as np

        self._np = np
        self._drv = api.driver
        self._leaf, self._level = functions
        self._data = data
        self._device = device

    def _fail(self, what: str, exc: BaseException) -> VramError:
        return AllocationFailed(
            f"device digest on GPU {self._device}: {what}: "
            f"{type(exc).__name__}: {scrub_text(str(exc))[:200]}"
        )

    def alloc(self, nbytes: int) -> Any:
        try:
            return self._drv.mem_alloc(nbytes)
        except self._drv.MemoryError:
            free, _ = self._drv.mem_get_info()
            raise InsufficientVram(nbytes, int(free), device=self._device) from None
        except self._drv.Error as exc:
            raise self._fail("scratch allocation", exc) from None

    def free(self, scratch: Any) -> None:
        try:
            scratch.free()
        except self._drv.Error as exc:
            raise self._fail("scratch free", exc) from None

    def leaf_hashes(
        self,
        nbytes: int,
        leaf_size: int,
        first_leaf: int,
        count: int,
        out: Any,
        geometry: tuple[int, int],
    ) -> None:
        u64 = self._np.uint64
        grid, block = geometry
        try:
            self._leaf(
                self._data,
                u64(nbytes),
                u64(leaf_size),
                u64(first_leaf),
                u64(count),
                out,
                block=(block, 1, 1),
                grid=(grid, 1),
            )
        except self._drv.Error as exc:
            raise self._fail(LEAF_KERNEL, exc) from None

    def merkle_level(self, src: Any, n: int, dst: Any, geometry: tuple[int, int]) -> None:
        grid, block = geometry
        try:
            self._level(src, self._np.uint64(n), dst, block=(block, 1, 1), grid=(grid, 1))
        except self._drv.Error as exc:
            raise self._fail(LEVEL_KERNEL, exc) from None

    def read(self, scratch: Any, nbytes: int) -> bytes:
        out = bytearray(nbytes)
        try:
            self._drv.memcpy_dtoh(out, scratch)  # the default stream: after every launch
        except self._drv.Error as exc:
            raise self._fail("reading the result", exc) from None
        return bytes(out)


def digest_allocation(
    api: DriverApi,
    cache: KernelCache,
    device: int,
    allocation: Any,
    nbytes: int,
    leaf_size: int,
    leaf_range: tuple[int, int] | None,
) -> DeviceDigest | None:
    """Root and leaves of ``allocation`` on the device (context current), or ``None``."""
    functions = cache.functions(device)
    if functions is None:
        return None
    return device_merkle(_Ops(api, functions, allocation, device), nbytes, leaf_size, leaf_range)
