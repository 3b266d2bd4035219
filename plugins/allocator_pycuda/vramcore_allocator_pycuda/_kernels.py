"""The shared ``rfc6962-sha256`` kernels (``vramcore.kernels``) run through PyCUDA.

No ``nvcc`` is needed: the kernels are compiled by NVRTC for the device's architecture (from
the ``nvidia-cuda-nvrtc`` wheel, CuPy's CUDA or the system's) or, where no NVRTC loads, taken
from the PTX shipped in the core wheel (the driver compiles it when it loads it), and loaded
with ``module_from_buffer`` (``cuModuleLoadData``) once per device context, kept until the
backend closes. The tree logic is the core's :func:`vramcore.kernels.device_merkle`; this
module supplies only its operations.

Every failure to build, load or launch the kernels, or to get their scratch memory, is a
:class:`PyCudaDigestUnavailable` (a :class:`~vramcore.errors.DeviceDigestUnavailable`): the
core then hashes on the host with an audited warning. A load failure is remembered (logged
once), so later digests fail fast with the same reason.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from vramcore.backend import DeviceDigest
from vramcore.digest import leaf_count
from vramcore.errors import DeviceDigestUnavailable, InvalidInput
from vramcore.kernels import (
    INDEX_KERNEL,
    LEAF_KERNEL,
    LEVEL_KERNEL,
    NVRTC_OPTIONS,
    check_leaf_indices,
    device_leaves_at,
    device_merkle,
    kernel_source,
)
from vramcore.kernels._nvrtc import KernelCompileError, KernelImage, kernel_image
from vramcore.validation import check_leaf_size, scrub_text

from ._api import DriverApi

__all__ = [
    "KernelCache",
    "PyCudaDigestUnavailable",
    "check_leaf_range",
    "digest_allocation",
]

log = logging.getLogger("vramcore.allocator_pycuda")


class PyCudaDigestUnavailable(DeviceDigestUnavailable):
    """The pycuda backend cannot digest on the GPU this time: the kernels do not build or
    load, a launch or a copy failed, or there is no scratch memory (the reason, without a
    pointer, is the message). The core hashes on the host instead."""


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


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {scrub_text(str(exc))[:300]}"


class KernelCache:
    """The loaded module of one device context, and why it could not be built, if so."""

    def __init__(self, api: DriverApi) -> None:
        self._api = api
        self._lock = threading.Lock()
        self._module: Any = None
        self._functions: tuple[Any, Any, Any] | None = None
        self.failure: str | None = None
        #: Where the loaded image came from ("NVRTC 12.9 sm_90", "shipped PTX compute_80").
        self.origin: str | None = None

    def functions(self, device: int) -> tuple[Any, Any, Any]:
        """``(leaf, index, level)`` kernels (context current), built on first use.

        :raises PyCudaDigestUnavailable: they cannot be built or loaded here (the reason is
            kept in :attr:`failure` and logged once).
        """
        with self._lock:
            if self._functions is None and self.failure is None:
                self._load(device)
            if self._functions is None:
                raise PyCudaDigestUnavailable(
                    f"pycuda backend: the digest kernels do not load on GPU {device}: "
                    f"{self.failure}"
                )
            return self._functions

    def _image(self) -> KernelImage:
        major, minor = self._api.driver.Context.get_device().compute_capability()
        return kernel_image(kernel_source(), f"sm_{major}{minor}", NVRTC_OPTIONS)

    def _load(self, device: int) -> None:
        try:
            image = self._image()
            module = self._api.module_from_buffer(image.data)
            self._functions = (
                module.get_function(LEAF_KERNEL),
                module.get_function(INDEX_KERNEL),
                module.get_function(LEVEL_KERNEL),
            )
            self._module = module
            self.origin = image.origin
            if image.nvrtc_failure:
                log.info("pycuda backend: loaded the shipped PTX (%s)", image.nvrtc_failure)
        except KernelCompileError as exc:
            self.failure = scrub_text(str(exc))[:600]
        except Exception as exc:  # pycuda.driver.Error and whatever a stand-in raises
            self.failure = _describe(exc)
        if self.failure is not None:
            log.warning(
                "pycuda backend: the device digest kernels do not load on GPU %d (%s); "
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
    """:class:`vramcore.kernels.KernelOps` over one PyCUDA allocation (context current).

    Every driver failure becomes a :class:`PyCudaDigestUnavailable`.
    """

    def __init__(
        self, api: DriverApi, functions: tuple[Any, Any, Any], data: Any, device: int
    ) -> None:
        import numpy as np

        self._np = np
        self._drv = api.driver
        self._leaf, self._index, self._level = functions
        self._data = data
        self._device = device

    def _fail(self, what: str, exc: BaseException) -> PyCudaDigestUnavailable:
        return PyCudaDigestUnavailable(
            f"device digest on GPU {self._device}: {what}: {_describe(exc)}"
        )

    def alloc(self, nbytes: int) -> Any:
        try:
            return self._drv.mem_alloc(nbytes)
        except Exception as exc:  # MemoryError (no room for the scratch) and every other
            raise self._fail(f"{nbytes}-byte scratch allocation", exc) from None

    def free(self, scratch: Any) -> None:
        try:
            scratch.free()
        except Exception as exc:
            raise self._fail("scratch free", exc) from None

    def _launch(self, name: str, fn: Any, args: Sequence[Any], geometry: tuple[int, int]) -> None:
        grid, block = geometry
        try:
            fn(*args, block=(block, 1, 1), grid=(grid, 1))
        except Exception as exc:  # LaunchError, LogicError, a bad argument type
            raise self._fail(name, exc) from None

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
        args = (self._data, u64(nbytes), u64(leaf_size), u64(first_leaf), u64(count), out)
        self._launch(LEAF_KERNEL, self._leaf, args, geometry)

    def leaf_hashes_at(
        self,
        nbytes: int,
        leaf_size: int,
        indices: Any,
        count: int,
        out: Any,
        geometry: tuple[int, int],
    ) -> None:
        u64 = self._np.uint64
        args = (self._data, u64(nbytes), u64(leaf_size), indices, u64(count), out)
        self._launch(INDEX_KERNEL, self._index, args, geometry)

    def merkle_level(self, src: Any, n: int, dst: Any, geometry: tuple[int, int]) -> None:
        self._launch(LEVEL_KERNEL, self._level, (src, self._np.uint64(n), dst), geometry)

    def write(self, scratch: Any, data: bytes) -> None:
        try:
            self._drv.memcpy_htod(scratch, data)  # synchronous: before every later launch
        except Exception as exc:
            raise self._fail("writing the leaf indices", exc) from None

    def read(self, scratch: Any, nbytes: int) -> bytes:
        out = bytearray(nbytes)
        try:
            self._drv.memcpy_dtoh(out, scratch)  # the default stream: after every launch
        except Exception as exc:
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
    leaf_indices: Sequence[int] | None = None,
) -> DeviceDigest:
    """Root and leaves of ``allocation`` on the device (context current), or the listed
    leaves (``leaf_indices``, by :func:`vramcore.kernels.sampled_plan`).

    :raises PyCudaDigestUnavailable: the kernels cannot run here this time.
    """
    if leaf_indices is not None:
        check_leaf_indices(leaf_count(nbytes, leaf_size), leaf_indices)
    ops = _Ops(api, cache.functions(device), allocation, device)
    if leaf_indices is not None:
        return device_leaves_at(ops, nbytes, leaf_size, leaf_indices)
    return device_merkle(ops, nbytes, leaf_size, leaf_range)
