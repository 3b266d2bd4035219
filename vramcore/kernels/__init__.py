"""The device digest's CUDA source and the orchestration both GPU backends share.

``merkle_sha256.cu`` (shipped in the core wheel, read with :func:`kernel_source`) holds two
kernels that compute ``rfc6962-sha256`` (:mod:`vramcore.digest`) on the GPU, bit for bit:

* :data:`LEAF_KERNEL` ``vramcore_leaf_hashes(data, nbytes, leaf_size, first_leaf, count, out)``
  -- ``out[32*i : 32*i+32] = SHA-256(0x00 || leaf first_leaf+i)``, one leaf per thread, the
  last leaf of the buffer possibly shorter;
* :data:`LEVEL_KERNEL` ``vramcore_merkle_level(in, n, out)`` -- one tree level: neighbours
  paired with ``SHA-256(0x01 || left || right)``, an odd last node copied up; ``out`` holds
  ``ceil(n/2)`` nodes.

Every ``unsigned long long`` argument is a 64-bit unsigned integer (``numpy.uint64``); the
pointers are device addresses. Both kernels are grid-stride loops without shared memory, so
any geometry is correct; :func:`launch_geometry` picks the one they are tuned for.

A backend (CuPy, PyCUDA) does not repeat the tree logic: it implements the four small
operations of :class:`KernelOps` (scratch allocation, the two launches, a device-to-host read)
and calls :func:`device_merkle`, which runs leaves then levels, checks arguments and frees its
scratch memory on every path. This module imports nothing from a GPU library.

The same source compiles as host C++ (``host_shim.h`` + ``host_launch.cpp``, see
:data:`HOST_FILES`) so tests check the kernels against :mod:`hashlib` without a GPU.
"""

from __future__ import annotations

import importlib.resources
import shutil
import subprocess
from pathlib import Path
from typing import Protocol, TypeVar

from vramcore.backend import DeviceDigest
from vramcore.digest import leaf_count
from vramcore.errors import InvalidInput

__all__ = [
    "DEFAULT_BLOCK",
    "HOST_FILES",
    "KERNEL_FILE",
    "KERNEL_NAMES",
    "LEAF_KERNEL",
    "LEVEL_KERNEL",
    "MAX_GRID",
    "NVRTC_OPTIONS",
    "HostBuildError",
    "KernelOps",
    "build_host_library",
    "device_merkle",
    "kernel_file_text",
    "kernel_source",
    "launch_geometry",
]

#: The CUDA source file, inside this package.
KERNEL_FILE = "merkle_sha256.cu"
#: Host-build companions of :data:`KERNEL_FILE` (shim header, launch wrappers), same package.
HOST_FILES = ("host_shim.h", "host_launch.cpp")
#: Kernel computing packed leaf hashes.
LEAF_KERNEL = "vramcore_leaf_hashes"
#: Kernel computing one Merkle tree level.
LEVEL_KERNEL = "vramcore_merkle_level"
#: Every ``extern "C"`` kernel of :data:`KERNEL_FILE` (``name_expressions`` / ``get_function``).
KERNEL_NAMES = (LEAF_KERNEL, LEVEL_KERNEL)
#: Threads per block: SHA-256 with an unrolled schedule needs many registers per thread, and
#: 128-thread blocks keep several blocks resident per SM while a leaf count that is not a
#: multiple of a large block wastes little.
DEFAULT_BLOCK = 128
#: Upper bound on blocks per launch (the kernels stride over whatever exceeds it).
MAX_GRID = 65535
#: NVRTC options both backends compile with (the architecture is added per device).
NVRTC_OPTIONS = ("--std=c++17",)

S = TypeVar("S")


def kernel_file_text(name: str) -> str:
    """The text of one file shipped in this package (:data:`KERNEL_FILE` or a host file)."""
    if name != KERNEL_FILE and name not in HOST_FILES:
        raise InvalidInput(f"no kernel file named {name!r}")
    return importlib.resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def kernel_source() -> str:
    """The CUDA source of the device digest (:data:`KERNEL_FILE`), for NVRTC or nvcc."""
    return kernel_file_text(KERNEL_FILE)


class HostBuildError(RuntimeError):
    """The host C++ build of the kernels failed (the compiler's output is the message)."""


def build_host_library(directory: Path, compiler: str | None = None) -> Path:
    """Build the kernels as a host shared library in ``directory`` (tests without a GPU).

    The library exports ``vc_host_leaf_hashes(grid, block, <kernel args>)`` and
    ``vc_host_merkle_level(grid, block, <kernel args>)``, which run the kernels over a
    simulated launch (``host_shim.h``). ``compiler`` defaults to the first of ``g++``,
    ``c++``, ``clang++`` on the path.

    :raises HostBuildError: no compiler, or the build failed (warnings are errors).
    """
    cxx = compiler or next(
        (p for p in map(shutil.which, ("g++", "c++", "clang++")) if p is not None), None
    )
    if cxx is None:
        raise HostBuildError("no C++ compiler (g++, c++ or clang++) on the path")
    directory.mkdir(parents=True, exist_ok=True)
    for name in (KERNEL_FILE, *HOST_FILES):
        (directory / name).write_text(kernel_file_text(name), encoding="utf-8")
    out = directory / "libvramcore_kernels_host.so"
    cmd = [cxx, "-O2", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC"]
    cmd += ["-include", "host_shim.h", "host_launch.cpp", "-o", str(out)]
    done = subprocess.run(cmd, cwd=directory, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise HostBuildError(f"host build of the kernels failed:\n{done.stderr[-4000:]}")
    return out


def launch_geometry(items: int, block: int = DEFAULT_BLOCK) -> tuple[int, int]:
    """``(grid, block)`` for a one-item-per-thread launch over ``items`` work items.

    The grid covers every item when it can (one leaf per thread) and is capped at
    :data:`MAX_GRID`; the kernels' grid-stride loops cover the rest. Never returns a zero grid.
    """
    if isinstance(items, bool) or not isinstance(items, int) or items < 0:
        raise InvalidInput("items must be a non-negative integer")
    if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= 1024:
        raise InvalidInput("block must be an integer from 1 to 1024")
    return max(1, min(MAX_GRID, -(-items // block))), block


class KernelOps(Protocol[S]):
    """What a backend provides so that :func:`device_merkle` can run the kernels.

    ``S`` is the backend's scratch-buffer type (a CuPy array, a PyCUDA allocation). The
    backend binds the digested buffer itself: :meth:`leaf_hashes` always reads it. Launches may
    be asynchronous as long as they run in order on one stream and :meth:`read` returns only
    once the bytes are on the host. Each method raises a :class:`~vramcore.errors.VramError`.
    """

    def alloc(self, nbytes: int) -> S:
        """Allocate ``nbytes`` of device scratch memory."""

    def free(self, scratch: S) -> None:
        """Release scratch memory from :meth:`alloc` (called on every path, errors included)."""

    def leaf_hashes(
        self,
        nbytes: int,
        leaf_size: int,
        first_leaf: int,
        count: int,
        out: S,
        geometry: tuple[int, int],
    ) -> None:
        """Launch :data:`LEAF_KERNEL` over the bound buffer with these arguments."""

    def merkle_level(self, src: S, n: int, dst: S, geometry: tuple[int, int]) -> None:
        """Launch :data:`LEVEL_KERNEL` from ``n`` nodes in ``src`` into ``dst``."""

    def read(self, scratch: S, nbytes: int) -> bytes:
        """Copy the first ``nbytes`` of ``scratch`` to the host, after every earlier launch."""


def _check_range(n: int, leaf_range: tuple[int, int] | None) -> tuple[int, int]:
    if leaf_range is None:
        return 0, n
    first, stop = leaf_range
    for v in (first, stop):
        if isinstance(v, bool) or not isinstance(v, int):
            raise InvalidInput("leaf_range must hold two integers")
    if not 0 <= first < stop <= n:
        raise InvalidInput(f"leaf range ({first}, {stop}) is not within the {n} leaves")
    return first, stop


def device_merkle(
    ops: KernelOps[S],
    nbytes: int,
    leaf_size: int,
    leaf_range: tuple[int, int] | None = None,
    *,
    block: int = DEFAULT_BLOCK,
) -> DeviceDigest:
    """The device digest of an ``nbytes`` buffer, run through a backend's :class:`KernelOps`.

    With ``leaf_range`` ``None``: every leaf hash and the root (a tree level per launch,
    ping-ponging between two scratch buffers of ``32*n`` and ``32*ceil(n/2)`` bytes). With
    ``(first, stop)``: the hashes of those leaves only, ``root=None``. Scratch memory is freed
    whether or not a step fails; the error propagates unchanged.

    :raises InvalidInput: empty buffer, bad leaf size or a range outside the leaves.
    """
    for name, v in (("nbytes", nbytes), ("leaf_size", leaf_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise InvalidInput(f"{name} must be a positive integer")
    n = leaf_count(nbytes, leaf_size)
    first, stop = _check_range(n, leaf_range)
    count = stop - first
    held: list[S] = []
    try:
        leaves_buf = ops.alloc(32 * count)
        held.append(leaves_buf)
        ops.leaf_hashes(nbytes, leaf_size, first, count, leaves_buf, launch_geometry(count, block))
        leaves = ops.read(leaves_buf, 32 * count)
        if leaf_range is not None:
            return DeviceDigest(root=None, leaves=leaves, first_leaf=first)
        if count == 1:
            return DeviceDigest(root=leaves, leaves=leaves, first_leaf=0)
        other = ops.alloc(32 * ((count + 1) // 2))
        held.append(other)
        src, dst, level = leaves_buf, other, count
        while level > 1:
            ops.merkle_level(src, level, dst, launch_geometry((level + 1) // 2, block))
            src, dst, level = dst, src, (level + 1) // 2
        return DeviceDigest(root=ops.read(src, 32), leaves=leaves, first_leaf=0)
    finally:
        _free_all(ops, held)


def _free_all(ops: KernelOps[S], held: list[S]) -> None:
    """Free every scratch buffer even if one free fails; then raise the first failure."""
    failure: BaseException | None = None
    for scratch in reversed(held):
        try:
            ops.free(scratch)
        except BaseException as exc:  # keep freeing the rest, report after
            failure = failure or exc
    if failure is not None:
        raise failure
