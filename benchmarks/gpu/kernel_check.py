"""The digest kernels compiled by NVRTC, then run, timed (CuPy events) and checked on GPU 0.

    python benchmarks/gpu/kernel_check.py [--quick] [--build-only] [--arch sm_90] [--json OUT]

No ``nvcc``: the build is NVRTC's (:mod:`vramcore.kernels._nvrtc`, ``-Xptxas=-v``: registers and
spills per kernel). Unless ``--build-only``, the kernels are loaded through CuPy (its own NVRTC,
else vramcore's image: NVRTC's cubin or the shipped PTX) and, for a few shard sizes filled on
the device with a fixed pattern, the leaf kernel and the whole digest are timed with CUDA
events, each root up to 1 GiB checked against the host digest (:mod:`vramcore.digest`) of the
same pattern. The sampled-check kernel is timed over 1 leaf and 1 % of the leaves of the
largest size: the figures the cost model (``vramcore.kernels.sampled_plan``) predicts.
Prints one JSON object.

Exit codes: 0 built (and ran, and every checked root matched); 1 a build, run or check failed;
2 no NVRTC for ``--build-only``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MiB, GiB = 1 << 20, 1 << 30
LEAF_PLUS_ONE = 65537  # one full leaf and a one-byte last leaf
LEAF = 65536


def pattern(nbytes: int) -> Any:
    """The bytes the check fills: little-endian words ``k * 2654435761 mod 2**32``."""
    import numpy

    words = numpy.arange((nbytes + 3) // 4, dtype=numpy.uint32) * numpy.uint32(2654435761)
    return words.view(numpy.uint8)[:nbytes]


def host_root(nbytes: int) -> str:
    """The host digest's root (hex) of :func:`pattern`."""
    from vramcore.digest import DEFAULT_LEAF_SIZE, hash_leaves, merkle_root

    return merkle_root(hash_leaves(memoryview(pattern(nbytes)), DEFAULT_LEAF_SIZE)).hex()


def build(arch: str) -> dict[str, Any]:
    """NVRTC compile with ptxas verbose output: registers and spills per kernel."""
    from vramcore import kernels
    from vramcore.kernels import _nvrtc

    try:
        options = (*kernels.NVRTC_OPTIONS, "-Xptxas=-v")
        cubin, log = _nvrtc.nvrtc_compile(kernels.kernel_source(), arch, options)
    except _nvrtc.KernelCompileError as exc:
        return {"arch": arch, "exit": 1, "error": str(exc)[:2000]}
    report = {}
    for name in kernels.KERNEL_NAMES:
        found = re.search(
            rf"entry function '{name}'.*?(\d+) bytes spill stores, (\d+) bytes spill loads"
            rf".*?Used (\d+) registers",
            log,
            re.S,
        )
        if found:
            stores, loads, regs = map(int, found.groups())
            report[name] = {"registers": regs, "spill_stores": stores, "spill_loads": loads}
    ptxas = [ln.strip() for ln in log.splitlines() if "registers" in ln or "spill" in ln]
    return {
        "arch": arch,
        "exit": 0,
        "nvrtc": ".".join(map(str, _nvrtc.nvrtc_version())),
        "cubin_bytes": len(cubin),
        "kernels": report,
        "ptxas": ptxas[-8:],
    }


class _Device:
    """The kernels loaded through CuPy on GPU 0, and CUDA-event timing."""

    def __init__(self, arch: str) -> None:
        import cupy  # type: ignore[import-untyped]

        from vramcore import kernels
        from vramcore.kernels import _nvrtc

        self.cp = cupy
        self.k = kernels
        try:
            module: Any = cupy.RawModule(
                code=kernels.kernel_source(), options=kernels.NVRTC_OPTIONS
            )
            self.fn = {n: module.get_function(n) for n in kernels.KERNEL_NAMES}
            self.origin = "CuPy NVRTC"
        except Exception as exc:  # any kind: fall back to vramcore's image
            image = _nvrtc.kernel_image(kernels.kernel_source(), arch, kernels.NVRTC_OPTIONS)
            module = cupy.cuda.function.Module()
            module.load(image.data)
            self.fn = {n: module.get_function(n) for n in kernels.KERNEL_NAMES}
            self.origin = f"{image.origin} (CuPy: {type(exc).__name__})"

    def timed(self, launch: Any) -> float:
        """Milliseconds between two events around ``launch()``."""
        start, end = self.cp.cuda.Event(), self.cp.cuda.Event()
        start.record()
        launch()
        end.record()
        end.synchronize()
        return float(self.cp.cuda.get_elapsed_time(start, end))

    def fill(self, nbytes: int) -> Any:
        cp = self.cp
        words = cp.arange((nbytes + 3) // 4, dtype=cp.uint32) * cp.uint32(2654435761)
        return words.view(cp.uint8)[:nbytes]

    def leaves(self, data: Any, out: Any, n: int) -> None:
        u64 = self.cp.uint64
        grid, block = self.k.launch_geometry(n)
        args = (data, u64(data.nbytes), u64(LEAF), u64(0), u64(n), out)
        self.fn[self.k.LEAF_KERNEL]((grid,), (block,), args)

    def at(self, data: Any, indices: Any, out: Any) -> None:
        u64 = self.cp.uint64
        k = int(indices.size)
        grid, block = self.k.launch_geometry(k)
        args = (data, u64(data.nbytes), u64(LEAF), indices, u64(k), out)
        self.fn[self.k.INDEX_KERNEL]((grid,), (block,), args)

    def root(self, leaves: Any, n: int) -> bytes:
        cp, u64 = self.cp, self.cp.uint64
        src, dst = leaves, cp.empty(32 * ((n + 1) // 2), dtype=cp.uint8)
        while n > 1:
            grid, block = self.k.launch_geometry((n + 1) // 2)
            self.fn[self.k.LEVEL_KERNEL]((grid,), (block,), (src, u64(n), dst))
            src, dst, n = dst, src, (n + 1) // 2
        return bytes(src[:32].get())


def run(arch: str, sizes: list[int]) -> dict[str, Any]:
    """Time and check each size; the sampled kernel on the largest."""
    dev = _Device(arch)
    cp = dev.cp
    rows = []
    for nbytes in sizes:
        n = -(-nbytes // LEAF)
        data = dev.fill(nbytes)
        out = cp.empty(32 * n, dtype=cp.uint8)
        dev.leaves(data, out, n)  # warm-up
        ms = dev.timed(lambda d=data, o=out, c=n: dev.leaves(d, o, c))
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        dev.leaves(data, out, n)
        root = dev.root(out, n)  # the levels, then the read-back of the root
        end.record()
        end.synchronize()
        digest_ms = float(cp.cuda.get_elapsed_time(start, end))
        row: dict[str, Any] = {
            "bytes": nbytes,
            "leaves": n,
            "leaf_kernel_ms": round(ms, 3),
            "leaf_kernel_gbps": round(nbytes / ms / 1e6, 1),
            "digest_ms": round(digest_ms, 3),
            "digest_gbps": round(nbytes / digest_ms / 1e6, 1),
            "root": root.hex(),
        }
        if nbytes <= GiB:
            row["host_root_matches"] = host_root(nbytes) == row["root"]
        rows.append(row)
        del data, out
    sampled = []
    biggest = max(sizes)
    n = -(-biggest // LEAF)
    data = dev.fill(biggest)
    for k in sorted({1, max(1, n // 100)}):
        indices = cp.linspace(0, n - 1, k).astype(cp.uint64)
        out = cp.empty(32 * k, dtype=cp.uint8)
        dev.at(data, indices, out)  # warm-up
        ms = dev.timed(lambda i=indices, o=out: dev.at(data, i, o))
        sampled.append(
            {"bytes": biggest, "leaves": n, "sampled": k, "index_kernel_ms": round(ms, 3)}
        )
    return {"kernels_from": dev.origin, "sizes": rows, "sampled": sampled}


def main(argv: list[str] | None = None) -> int:
    """Build, run, check; print the JSON result."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="up to 1 GiB only")
    p.add_argument("--build-only", action="store_true", help="compile, do not run (no GPU)")
    p.add_argument("--arch", default="sm_90", help="NVRTC -arch (default sm_90: H100/H200)")
    p.add_argument("--json", type=Path, help="write the result here too")
    args = p.parse_args(argv)
    sizes = [1, LEAF_PLUS_ONE, 256 * MiB, GiB] + ([] if args.quick else [4 * GiB, 8 * GiB])
    result: dict[str, Any] = {"build": build(args.arch)}
    ok = result["build"]["exit"] == 0
    code = 0
    if args.build_only:
        code = 0 if ok else 2
    else:
        try:
            result.update(run(args.arch, sizes))
            ok = all(r.get("host_root_matches", True) for r in result["sizes"])
        except Exception as exc:  # report, never a bare traceback
            result["run_error"] = f"{type(exc).__name__}: {str(exc)[:1000]}"
            ok = False
        code = 0 if ok else 1
    result["ok"] = ok
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
