"""The device digest kernels, built as host C++ and checked against hashlib (no GPU needed).

``vramcore/kernels/merkle_sha256.cu`` compiles with ``-include host_shim.h`` into a shared
library whose entry points run each kernel over a simulated grid. :class:`HostOps` plays the
backend's part of :class:`vramcore.kernels.KernelOps` with host memory, so these tests drive
the very orchestration (:func:`vramcore.kernels.device_merkle`) the GPU backends use.
"""

from __future__ import annotations

import ctypes
import hashlib
import random
import re
import shutil
from pathlib import Path

import pytest

from vramcore import kernels
from vramcore.digest import hash_leaves, leaf_count, merkle_root
from vramcore.errors import InvalidInput

_U = ctypes.c_uint
_ULL = ctypes.c_ulonglong


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """The kernels built as a host shared library (skipped when no C++ compiler exists)."""
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler (g++, c++ or clang++) to build the kernel for the host")
    return kernels.load_host_library(
        kernels.build_host_library(tmp_path_factory.mktemp("kernel-host"))
    )


def test_host_build_reports_a_missing_compiler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(kernels.HostBuildError, match=r"no C\+\+ compiler"):
        kernels.build_host_library(tmp_path / "out")


def test_host_build_reports_a_failed_compile(tmp_path: Path) -> None:
    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` program to stand in for a failing compiler")
    with pytest.raises(kernels.HostBuildError, match="failed"):
        kernels.build_host_library(tmp_path, compiler=false)


class HostOps:
    """:class:`~vramcore.kernels.KernelOps` over host memory and the host-built kernels."""

    def __init__(self, lib: ctypes.CDLL, data: bytes, misalign: int = 0) -> None:
        self.lib = lib
        # Place the data at a chosen offset from 16-byte alignment (0 = the fast path).
        self._raw = ctypes.create_string_buffer(len(data) + 32)
        base = ctypes.addressof(self._raw)
        self.data_addr = base + (-base % 16) + misalign
        ctypes.memmove(self.data_addr, data, len(data))
        self.live: dict[int, ctypes.Array[ctypes.c_char]] = {}
        self.allocs = 0
        self.launches: list[tuple[str, tuple[int, int]]] = []
        self.fail_at: str | None = None

    def _maybe_fail(self, what: str) -> None:
        if self.fail_at == what:
            raise RuntimeError(f"injected failure in {what}")

    def alloc(self, nbytes: int) -> int:
        self._maybe_fail("alloc" if self.allocs == 0 else "alloc2")
        buf = ctypes.create_string_buffer(nbytes)
        self.live[ctypes.addressof(buf)] = buf
        self.allocs += 1
        return ctypes.addressof(buf)

    def free(self, scratch: int) -> None:
        del self.live[scratch]

    def leaf_hashes(
        self,
        nbytes: int,
        leaf_size: int,
        first_leaf: int,
        count: int,
        out: int,
        geometry: tuple[int, int],
    ) -> None:
        self._maybe_fail("leaves")
        self.launches.append((kernels.LEAF_KERNEL, geometry))
        grid, block = geometry
        self.lib.vc_host_leaf_hashes(
            grid, block, self.data_addr, nbytes, leaf_size, first_leaf, count, out
        )

    def leaf_hashes_at(
        self,
        nbytes: int,
        leaf_size: int,
        indices: int,
        count: int,
        out: int,
        geometry: tuple[int, int],
    ) -> None:
        self._maybe_fail("indices")
        self.launches.append((kernels.INDEX_KERNEL, geometry))
        grid, block = geometry
        self.lib.vc_host_leaf_hashes_at(
            grid, block, self.data_addr, nbytes, leaf_size, indices, count, out
        )

    def write(self, scratch: int, data: bytes) -> None:
        self._maybe_fail("write")
        ctypes.memmove(scratch, data, len(data))

    def merkle_level(self, src: int, n: int, dst: int, geometry: tuple[int, int]) -> None:
        self._maybe_fail("level")
        self.launches.append((kernels.LEVEL_KERNEL, geometry))
        self.lib.vc_host_merkle_level(geometry[0], geometry[1], src, n, dst)

    def read(self, scratch: int, nbytes: int) -> bytes:
        self._maybe_fail("read")
        return ctypes.string_at(scratch, nbytes)


def _payload(n: int, seed: int = 0) -> bytes:
    return random.Random(n * 7919 + seed).randbytes(n)


SMALL_LEAF = 4096
SIZES = [
    1,
    2,
    54,
    55,  # 0x00 + 55 bytes: one block with padding
    56,  # length field no longer fits: two blocks
    62,
    63,
    64,
    65,
    118,
    119,
    120,
    127,
    128,
    129,
    1000,
    SMALL_LEAF - 1,
    SMALL_LEAF,  # exact multiple, one leaf
    SMALL_LEAF + 1,  # a one-byte last leaf
    2 * SMALL_LEAF,
    3 * SMALL_LEAF - 63,
    5 * SMALL_LEAF + 4000,
    8 * SMALL_LEAF,  # power of two leaf count
    13 * SMALL_LEAF + 1,  # odd counts at several levels
    33 * SMALL_LEAF - 1,
]


@pytest.mark.parametrize("nbytes", SIZES)
def test_whole_buffer_matches_host_digest(lib: ctypes.CDLL, nbytes: int) -> None:
    data = _payload(nbytes)
    ops = HostOps(lib, data)
    got = kernels.device_merkle(ops, nbytes, SMALL_LEAF)
    expected = hash_leaves(data, SMALL_LEAF)
    assert got.first_leaf == 0
    assert bytes(got.leaves) == b"".join(expected)
    assert got.root == merkle_root(expected)
    assert got.leaf_count == leaf_count(nbytes, SMALL_LEAF)
    assert ops.live == {}, "scratch memory left allocated"


@pytest.mark.parametrize("nbytes", [1, 65536, 65537, 3 * 65536 + 12345])
def test_default_leaf_size(lib: ctypes.CDLL, nbytes: int) -> None:
    data = _payload(nbytes, seed=1)
    got = kernels.device_merkle(HostOps(lib, data), nbytes, 65536)
    expected = hash_leaves(data, 65536)
    assert bytes(got.leaves) == b"".join(expected)
    assert got.root == merkle_root(expected)


def test_single_leaf_root_is_its_hash(lib: ctypes.CDLL) -> None:
    data = b"\xab"
    got = kernels.device_merkle(HostOps(lib, data), 1, SMALL_LEAF)
    assert got.root == hashlib.sha256(b"\x00\xab").digest() == bytes(got.leaves)


@pytest.mark.parametrize("misalign", [1, 3, 4, 8, 15])
def test_unaligned_data_takes_the_byte_path_and_agrees(lib: ctypes.CDLL, misalign: int) -> None:
    nbytes = 4 * SMALL_LEAF + 77
    data = _payload(nbytes, seed=misalign)
    got = kernels.device_merkle(HostOps(lib, data, misalign=misalign), nbytes, SMALL_LEAF)
    expected = hash_leaves(data, SMALL_LEAF)
    assert bytes(got.leaves) == b"".join(expected)
    assert got.root == merkle_root(expected)


def test_random_sizes(lib: ctypes.CDLL) -> None:
    rng = random.Random(2026)
    for _ in range(40):
        nbytes = rng.randrange(1, 20 * SMALL_LEAF)
        data = rng.randbytes(nbytes)
        got = kernels.device_merkle(HostOps(lib, data), nbytes, SMALL_LEAF)
        expected = hash_leaves(data, SMALL_LEAF)
        assert bytes(got.leaves) == b"".join(expected), nbytes
        assert got.root == merkle_root(expected), nbytes


@pytest.mark.parametrize(
    ("first", "stop"), [(0, 1), (0, 11), (3, 4), (4, 9), (10, 11), (5, 11), (1, 10)]
)
def test_leaf_ranges(lib: ctypes.CDLL, first: int, stop: int) -> None:
    nbytes = 10 * SMALL_LEAF + 99  # 11 leaves, the last one short
    data = _payload(nbytes, seed=5)
    ops = HostOps(lib, data)
    got = kernels.device_merkle(ops, nbytes, SMALL_LEAF, (first, stop))
    expected = hash_leaves(data, SMALL_LEAF)[first:stop]
    assert got.root is None
    assert got.first_leaf == first
    assert bytes(got.leaves) == b"".join(expected)
    assert [name for name, _ in ops.launches] == [kernels.LEAF_KERNEL]
    assert ops.live == {}


@pytest.mark.parametrize(("grid", "block"), [(1, 1), (1, 3), (2, 5), (7, 2), (64, 64)])
def test_any_geometry_gives_the_same_leaves(lib: ctypes.CDLL, grid: int, block: int) -> None:
    nbytes = 22 * SMALL_LEAF + 5
    data = _payload(nbytes, seed=9)
    ops = HostOps(lib, data)
    count = leaf_count(nbytes, SMALL_LEAF)
    out = ctypes.create_string_buffer(32 * count)
    lib.vc_host_leaf_hashes(
        grid, block, ops.data_addr, nbytes, SMALL_LEAF, 0, count, ctypes.addressof(out)
    )
    assert out.raw == b"".join(hash_leaves(data, SMALL_LEAF))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 17])
def test_level_kernel(lib: ctypes.CDLL, n: int) -> None:
    nodes = [hashlib.sha256(bytes([i])).digest() for i in range(n)]
    src = ctypes.create_string_buffer(b"".join(nodes), 32 * n)
    dst = ctypes.create_string_buffer(32 * ((n + 1) // 2))
    lib.vc_host_merkle_level(2, 3, ctypes.addressof(src), n, ctypes.addressof(dst))
    expected = [
        hashlib.sha256(b"\x01" + nodes[i] + nodes[i + 1]).digest() for i in range(0, n - 1, 2)
    ]
    if n % 2:
        expected.append(nodes[-1])
    assert dst.raw == b"".join(expected)


def test_whole_tree_uses_one_level_launch_per_level(lib: ctypes.CDLL) -> None:
    nbytes = 9 * SMALL_LEAF  # 9 -> 5 -> 3 -> 2 -> 1
    ops = HostOps(lib, _payload(nbytes))
    kernels.device_merkle(ops, nbytes, SMALL_LEAF)
    names = [name for name, _ in ops.launches]
    assert names == [kernels.LEAF_KERNEL] + [kernels.LEVEL_KERNEL] * 4
    assert ops.launches[0][1] == kernels.launch_geometry(9)


@pytest.mark.parametrize("where", ["alloc", "leaves", "read", "alloc2", "level"])
def test_failures_free_scratch_and_propagate(lib: ctypes.CDLL, where: str) -> None:
    nbytes = 6 * SMALL_LEAF
    ops = HostOps(lib, _payload(nbytes))
    ops.fail_at = where
    with pytest.raises(RuntimeError, match=f"injected failure in {where}"):
        kernels.device_merkle(ops, nbytes, SMALL_LEAF)
    assert ops.live == {}


class _FreeFails(HostOps):
    def free(self, scratch: int) -> None:
        super().free(scratch)
        if not self.live:  # the last of the two frees fails: the first still ran
            raise RuntimeError("free failed")


def test_a_failing_free_still_frees_the_rest(lib: ctypes.CDLL) -> None:
    nbytes = 3 * SMALL_LEAF
    ops = _FreeFails(lib, _payload(nbytes))
    with pytest.raises(RuntimeError, match="free failed"):
        kernels.device_merkle(ops, nbytes, SMALL_LEAF)
    assert ops.live == {}


@pytest.mark.parametrize(
    ("nbytes", "leaf_size", "leaf_range", "message"),
    [
        (0, SMALL_LEAF, None, "nbytes"),
        (-1, SMALL_LEAF, None, "nbytes"),
        (10, 0, None, "leaf_size"),
        (10, True, None, "leaf_size"),
        (10, SMALL_LEAF, (0, 2), "not within"),
        (10, SMALL_LEAF, (1, 1), "not within"),
        (10, SMALL_LEAF, (-1, 1), "not within"),
        (10, SMALL_LEAF, (0.0, 1), "two integers"),
    ],
)
def test_bad_arguments_raise_before_any_allocation(
    nbytes: int, leaf_size: int, leaf_range: tuple[int, int] | None, message: str
) -> None:
    class NoOps:
        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"{name} called for invalid arguments")

    with pytest.raises(InvalidInput, match=message):
        kernels.device_merkle(NoOps(), nbytes, leaf_size, leaf_range)  # type: ignore[arg-type]


def test_launch_geometry() -> None:
    assert kernels.launch_geometry(0) == (1, kernels.DEFAULT_BLOCK)
    assert kernels.launch_geometry(1) == (1, kernels.DEFAULT_BLOCK)
    assert kernels.launch_geometry(16384) == (128, 128)
    assert kernels.launch_geometry(16385) == (129, 128)
    assert kernels.launch_geometry(10**12) == (kernels.MAX_GRID, 128)
    assert kernels.launch_geometry(100, 32) == (4, 32)
    assert kernels.launch_geometry(10, kernels.MAX_BLOCK) == (1, kernels.MAX_BLOCK)
    for bad in ((-1, 128), (1, 0), (1, kernels.MAX_BLOCK + 1), (1, 1024), (True, 128)):
        with pytest.raises(InvalidInput):
            kernels.launch_geometry(*bad)


def test_kernel_source_is_shipped_and_names_its_kernels() -> None:
    src = kernels.kernel_source()
    for name in kernels.KERNEL_NAMES:
        assert re.search(rf'extern "C" __global__ void (__launch_bounds__\(\w+\)\s+)?{name}\(', src)
    # The Python cap is the launch bound the kernels are compiled with.
    assert f"#define VC_MAX_BLOCK {kernels.MAX_BLOCK}\n" in src
    assert src.count("__launch_bounds__(VC_MAX_BLOCK)") == 2
    # NVRTC has no standard headers on its path: the source includes nothing.
    assert not [line for line in src.splitlines() if line.lstrip().startswith("#include")]
    for name in kernels.HOST_FILES:
        assert kernels.kernel_file_text(name)
    with pytest.raises(InvalidInput):
        kernels.kernel_file_text("../digest.py")


def test_kernel_files_sit_in_the_package_directory() -> None:
    pkg = Path(kernels.__file__).parent
    for name in (kernels.KERNEL_FILE, *kernels.HOST_FILES):
        assert (pkg / name).is_file()


# -- sampled checks: the index kernel and its cost model ------------------------------------


def _picked(data: bytes, leaf_size: int, indices: list[int]) -> bytes:
    every = hash_leaves(data, leaf_size)
    return b"".join(every[i] for i in indices)


@pytest.mark.parametrize("method", ["indices", "full"])
@pytest.mark.parametrize(
    ("nbytes", "misalign"),
    [(1, 0), (SMALL_LEAF, 0), (13 * SMALL_LEAF + 1, 0), (9 * SMALL_LEAF - 63, 3), (40000, 15)],
)
def test_listed_leaves_match_the_host_digest(
    lib: ctypes.CDLL, nbytes: int, misalign: int, method: str
) -> None:
    data = _payload(nbytes, seed=misalign)
    n = leaf_count(nbytes, SMALL_LEAF)
    rng = random.Random(nbytes)
    for k in sorted({1, min(n, 2), max(1, n // 3), n}):
        indices = sorted(rng.sample(range(n), k))
        ops = HostOps(lib, data, misalign=misalign)
        plan = kernels.SampledPlan(method=method, indices_seconds=0.0, full_seconds=0.0)  # type: ignore[arg-type]
        got = kernels.device_leaves_at(ops, nbytes, SMALL_LEAF, indices, plan=plan)
        assert got.root is None
        assert got.leaf_indices == tuple(indices)
        assert bytes(got.leaves) == _picked(data, SMALL_LEAF, indices)
        assert ops.live == {}
        expected = kernels.INDEX_KERNEL if method == "indices" else kernels.LEAF_KERNEL
        assert [name for name, _ in ops.launches] == [expected]


def test_the_last_short_leaf_and_the_first_leaf_alone(lib: ctypes.CDLL) -> None:
    nbytes = 5 * SMALL_LEAF + 7
    data = _payload(nbytes)
    ops = HostOps(lib, data)
    got = kernels.device_leaves_at(ops, nbytes, SMALL_LEAF, [0, 5])
    assert bytes(got.leaves) == _picked(data, SMALL_LEAF, [0, 5])


@pytest.mark.parametrize("where", ["alloc", "write", "alloc2", "indices", "read"])
def test_index_launch_failures_free_scratch_and_propagate(lib: ctypes.CDLL, where: str) -> None:
    nbytes = 6 * SMALL_LEAF
    ops = HostOps(lib, _payload(nbytes))
    ops.fail_at = where
    plan = kernels.SampledPlan(method="indices", indices_seconds=0.0, full_seconds=0.0)
    with pytest.raises(RuntimeError, match=f"injected failure in {where}"):
        kernels.device_leaves_at(ops, nbytes, SMALL_LEAF, [1, 4], plan=plan)
    assert ops.live == {}


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        ([], "not be empty"),
        ([2, 1], "strictly increasing"),
        ([1, 1], "strictly increasing"),
        ([0, 6], "within the 6 leaves"),
        ([-1], "within the 6 leaves"),
        ([True], "integers"),
        ([1.0], "integers"),
        (None, "sequence"),
    ],
)
def test_bad_leaf_indices_raise_before_any_allocation(indices: object, message: str) -> None:
    class NoOps:
        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"{name} called for invalid arguments")

    with pytest.raises(InvalidInput, match=message):
        kernels.device_leaves_at(NoOps(), 6 * SMALL_LEAF, SMALL_LEAF, indices)  # type: ignore[arg-type]


def test_sampled_plan_uses_the_index_kernel_on_large_shards() -> None:
    # sample=0.01 of 8 GiB: 1,311 of 131,072 leaves. One launch over the sampled leaves costs
    # about one leaf's latency; a full pass costs 8 GiB at the predicted throughput.
    plan = kernels.sampled_plan(131072, 1311, 65536)
    assert plan.method == "indices"
    assert plan.indices_seconds == pytest.approx(kernels.PREDICTED_LEAF_SECONDS, rel=0.05)
    assert plan.full_seconds == pytest.approx((8 << 30) / kernels.PREDICTED_DEVICE_BPS, rel=0.05)


def test_sampled_plan_hashes_everything_when_that_costs_no_more() -> None:
    # 64 MiB: every leaf fits in the one-leaf latency, and the full pass saves the upload.
    assert kernels.sampled_plan(1024, 10, 65536).method == "full"
    # Near 1.2 GiB the full pass starts to cost more than the latency: indices win again.
    assert kernels.sampled_plan(20000, 200, 65536).method == "indices"
