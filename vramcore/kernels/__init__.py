"""The device digest's CUDA source and the orchestration both GPU backends share.

``merkle_sha256.cu`` (shipped in the core wheel, read with :func:`kernel_source`) holds two
kernels that compute ``rfc6962-sha256`` (:mod:`vramcore.digest`) on the GPU, bit for bit:

* :data:`LEAF_KERNEL` ``vramcore_leaf_hashes(data, nbytes, leaf_size, first_leaf, count, out)``
  -- ``out[32*i : 32*i+32] = SHA-256(0x00 || leaf first_leaf+i)``, one leaf per thread, the
  last leaf of the buffer possibly shorter;
* :data:`INDEX_KERNEL` ``vramcore_leaf_hashes_at(data, nbytes, leaf_size, indices, count, out)``
  -- ``out[32*i : 32*i+32] = SHA-256(0x00 || leaf indices[i])``: a sampled check's leaves in
  one launch (``indices`` is a device array of ``count`` 64-bit leaf indices);
* :data:`LEVEL_KERNEL` ``vramcore_merkle_level(in, n, out)`` -- one tree level: neighbours
  paired with ``SHA-256(0x01 || left || right)``, an odd last node copied up; ``out`` holds
  ``ceil(n/2)`` nodes.

Every ``unsigned long long`` argument is a 64-bit unsigned integer (``numpy.uint64``); the
pointers are device addresses. Both kernels are grid-stride loops without shared memory, so
any geometry is correct; :func:`launch_geometry` picks the one they are tuned for.

A backend (CuPy, PyCUDA) does not repeat the tree logic: it implements the small operations
of :class:`KernelOps` (scratch allocation, the launches, copies) and calls
:func:`device_merkle` (leaves then levels) or :func:`device_leaves_at` (a sampled check, by the
cost model :func:`sampled_plan`), which check arguments and free scratch memory on every path.
This module imports nothing from a GPU library; :mod:`vramcore.kernels._nvrtc` loads NVRTC
with :mod:`ctypes` only when a backend asks it to compile.

The same source compiles as host C++ (``host_shim.h`` + ``host_launch.cpp``, see
:data:`HOST_FILES`) so tests check the kernels against :mod:`hashlib` without a GPU.
"""

from __future__ import annotations

import ctypes
import importlib.resources
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol, TypeVar

import attrs

from vramcore.backend import DeviceDigest
from vramcore.digest import leaf_count
from vramcore.errors import InvalidInput

__all__ = [
    "DEFAULT_BLOCK",
    "HOST_FILES",
    "INDEX_KERNEL",
    "KERNEL_FILE",
    "KERNEL_NAMES",
    "LEAF_KERNEL",
    "LEVEL_KERNEL",
    "MAX_BLOCK",
    "MAX_GRID",
    "NVRTC_OPTIONS",
    "HostBuildError",
    "KernelOps",
    "SampledPlan",
    "build_host_library",
    "check_leaf_indices",
    "device_leaves_at",
    "device_merkle",
    "kernel_file_text",
    "kernel_source",
    "launch_geometry",
    "load_host_library",
    "sampled_plan",
]

#: The CUDA source file, inside this package.
KERNEL_FILE = "merkle_sha256.cu"
#: Host-build companions of :data:`KERNEL_FILE` (shim header, launch wrappers), same package.
HOST_FILES = ("host_shim.h", "host_launch.cpp")
#: Kernel computing packed leaf hashes.
LEAF_KERNEL = "vramcore_leaf_hashes"
#: Kernel computing the packed hashes of listed leaves (sampled checks).
INDEX_KERNEL = "vramcore_leaf_hashes_at"
#: Kernel computing one Merkle tree level.
LEVEL_KERNEL = "vramcore_merkle_level"
#: Every ``extern "C"`` kernel of :data:`KERNEL_FILE` (``name_expressions`` / ``get_function``).
KERNEL_NAMES = (LEAF_KERNEL, INDEX_KERNEL, LEVEL_KERNEL)
#: Threads per block: SHA-256 with an unrolled schedule needs many registers per thread, and
#: 128-thread blocks keep several blocks resident per SM while a leaf count that is not a
#: multiple of a large block wastes little.
DEFAULT_BLOCK = 128
#: Most threads per block (``VC_MAX_BLOCK``, the leaf kernels' ``__launch_bounds__``). ptxas
#: for sm_80/sm_90 gives the leaf kernels 96 registers with the next block's loads in flight
#: during the current compression: 65,536 registers hold 682 such threads per SM, so a larger
#: block cannot launch, and 768 would force 80 registers and spills in the main loop.
MAX_BLOCK = 640
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


def load_host_library(path: Path) -> ctypes.CDLL:
    """The host build from :func:`build_host_library`, with every entry point's signature.

    ``vc_host_leaf_hashes``, ``vc_host_leaf_hashes_at`` and ``vc_host_merkle_level`` take
    ``(grid, block, <the kernel's arguments>)``; pointers are ``c_void_p`` addresses.
    """
    lib = ctypes.CDLL(str(path))
    u, ull, ptr = ctypes.c_uint, ctypes.c_ulonglong, ctypes.c_void_p
    for name, args in (
        ("vc_host_leaf_hashes", [u, u, ptr, ull, ull, ull, ull, ptr]),
        ("vc_host_leaf_hashes_at", [u, u, ptr, ull, ull, ptr, ull, ptr]),
        ("vc_host_merkle_level", [u, u, ptr, ull, ptr]),
    ):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    return lib


def launch_geometry(items: int, block: int = DEFAULT_BLOCK) -> tuple[int, int]:
    """``(grid, block)`` for a one-item-per-thread launch over ``items`` work items.

    The grid covers every item when it can (one leaf per thread) and is capped at
    :data:`MAX_GRID`; the kernels' grid-stride loops cover the rest. Never returns a zero grid.
    """
    if isinstance(items, bool) or not isinstance(items, int) or items < 0:
        raise InvalidInput("items must be a non-negative integer")
    if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= MAX_BLOCK:
        raise InvalidInput(f"block must be an integer from 1 to {MAX_BLOCK}")
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

    def leaf_hashes_at(
        self,
        nbytes: int,
        leaf_size: int,
        indices: S,
        count: int,
        out: S,
        geometry: tuple[int, int],
    ) -> None:
        """Launch :data:`INDEX_KERNEL` over the bound buffer (``indices`` from :meth:`write`)."""

    def merkle_level(self, src: S, n: int, dst: S, geometry: tuple[int, int]) -> None:
        """Launch :data:`LEVEL_KERNEL` from ``n`` nodes in ``src`` into ``dst``."""

    def write(self, scratch: S, data: bytes) -> None:
        """Copy ``data`` to the start of ``scratch``, ordered before every later launch."""

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


def check_leaf_indices(n: int, leaf_indices: Sequence[int]) -> tuple[int, ...]:
    """``leaf_indices`` as a tuple, checked: non-empty, strictly increasing, each ``< n``.

    :raises InvalidInput: an empty list, a non-integer, an unsorted or repeated index, or an
        index outside the ``n`` leaves.
    """
    try:
        indices = tuple(leaf_indices)
    except TypeError:
        raise InvalidInput("leaf_indices must be a sequence of integers") from None
    if not indices:
        raise InvalidInput("leaf_indices must not be empty")
    previous: int | None = None
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int):
            raise InvalidInput("leaf_indices must hold integers")
        if previous is not None and i <= previous:
            raise InvalidInput("leaf_indices must be strictly increasing")
        previous = i
    if indices[0] < 0 or indices[-1] >= n:
        raise InvalidInput(f"leaf_indices must lie within the {n} leaves")
    return indices


# -- the sampled-check cost model -------------------------------------------------------------
# Predictions for an H100/H200 (sm_90), from the compiler's output and GPU-NOTES, not
# measurements: replace them with gpu-check's figures once a GPU run has produced some.

#: Predicted seconds for one thread to hash one 64 KiB leaf: 1,025 compression blocks of
#: about 1,444 instructions (cuobjdump of the sm_90 cubin) on a dependent chain. A launch
#: lasts at least this long however few leaves it hashes.
PREDICTED_LEAF_SECONDS = 1.8e-3
#: Predicted leaf-kernel throughput once enough leaves keep every SM busy (bytes/s).
PREDICTED_DEVICE_BPS = 700e9
#: Predicted cost of one launch plus the stream synchronisation after it (s).
PREDICTED_LAUNCH_SECONDS = 10e-6
#: Predicted small pageable copy: fixed latency (s) and bandwidth (bytes/s).
PREDICTED_COPY_SECONDS = 10e-6
PREDICTED_COPY_BPS = 20e9


def _copy_seconds(nbytes: int) -> float:
    return PREDICTED_COPY_SECONDS + nbytes / PREDICTED_COPY_BPS


def _hash_seconds(leaves: int, leaf_size: int) -> float:
    latency = PREDICTED_LEAF_SECONDS * leaf_size / 65536
    return max(latency, leaves * leaf_size / PREDICTED_DEVICE_BPS)


@attrs.frozen(kw_only=True)
class SampledPlan:
    """How a sampled check runs on the device, and the predicted cost of either way.

    :attr method: ``"indices"`` (one launch of :data:`INDEX_KERNEL` over the sampled leaves,
        after uploading their indices) or ``"full"`` (every leaf, the sampled ones kept).
    :attr indices_seconds: predicted seconds for ``"indices"``.
    :attr full_seconds: predicted seconds for ``"full"``.
    """

    method: Literal["indices", "full"]
    indices_seconds: float
    full_seconds: float


def sampled_plan(n: int, sampled: int, leaf_size: int) -> SampledPlan:
    """Choose how to hash ``sampled`` of a buffer's ``n`` leaves on the device.

    ``indices``: launch + upload of ``8 * sampled`` bytes + ``max(leaf latency, sampled *
    leaf_size / throughput)`` + read-back of ``32 * sampled`` bytes. ``full``: launch +
    ``max(leaf latency, n * leaf_size / throughput)`` + read-back of ``32 * n`` bytes. One
    thread hashes one leaf, so a launch costs at least one leaf's latency (about 1.8 ms for
    64 KiB leaves) however few leaves it hashes: below about ``latency * throughput``
    (about 1.2 GiB) both ways cost that latency, and the full pass wins when it saves the
    index upload (``n`` up to about 6,000 leaves more than ``sampled``). Above it the
    sampled leaves win. Figures: the ``PREDICTED_*`` constants (predictions, not
    measurements).
    """
    indices = (
        PREDICTED_LAUNCH_SECONDS
        + _copy_seconds(8 * sampled)
        + _hash_seconds(sampled, leaf_size)
        + _copy_seconds(32 * sampled)
    )
    full = PREDICTED_LAUNCH_SECONDS + _hash_seconds(n, leaf_size) + _copy_seconds(32 * n)
    method: Literal["indices", "full"] = "full" if full < indices else "indices"
    return SampledPlan(method=method, indices_seconds=indices, full_seconds=full)


def device_leaves_at(
    ops: KernelOps[S],
    nbytes: int,
    leaf_size: int,
    leaf_indices: Sequence[int],
    *,
    block: int = DEFAULT_BLOCK,
    plan: SampledPlan | None = None,
) -> DeviceDigest:
    """The hashes of the listed leaves of an ``nbytes`` buffer, in one launch.

    ``plan`` (default: :func:`sampled_plan`) picks the index kernel or a pass over every leaf;
    the answer is the same: ``root=None``, ``leaf_indices`` the indices, ``leaves`` their
    packed hashes in that order. Scratch memory is freed on every path.

    :raises InvalidInput: empty buffer, bad leaf size, or bad indices
        (:func:`check_leaf_indices`).
    """
    for name, v in (("nbytes", nbytes), ("leaf_size", leaf_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise InvalidInput(f"{name} must be a positive integer")
    n = leaf_count(nbytes, leaf_size)
    indices = check_leaf_indices(n, leaf_indices)
    k = len(indices)
    plan = plan or sampled_plan(n, k, leaf_size)
    if plan.method == "full":
        every = device_merkle(ops, nbytes, leaf_size, (0, n), block=block)
        all_leaves = bytes(every.leaves)
        picked = b"".join(all_leaves[32 * i : 32 * i + 32] for i in indices)
        return DeviceDigest(root=None, leaves=picked, leaf_indices=indices)
    held: list[S] = []
    try:
        index_buf = ops.alloc(8 * k)
        held.append(index_buf)
        ops.write(index_buf, b"".join(i.to_bytes(8, "little") for i in indices))
        out = ops.alloc(32 * k)
        held.append(out)
        ops.leaf_hashes_at(nbytes, leaf_size, index_buf, k, out, launch_geometry(k, block))
        leaves = ops.read(out, 32 * k)
        return DeviceDigest(root=None, leaves=leaves, leaf_indices=indices)
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
