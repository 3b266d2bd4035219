"""Build and run ``kernel_bench.cu``: the digest kernels checked and timed without CuPy or PyCUDA.

    python benchmarks/gpu/kernel_check.py [--quick] [--build-only] [--arch sm_90] [--json OUT]

Builds ``benchmarks/gpu/kernel_bench.cu`` (which includes ``vramcore/kernels/merkle_sha256.cu``)
with ``nvcc``, recording ``ptxas``'s register and spill report; then, unless ``--build-only``,
runs it for a few shard sizes on GPU 0 and checks the root of each size up to 1 GiB against
the host digest (:mod:`vramcore.digest`) of the same pattern. Prints one JSON object.

Exit codes: 0 built (and ran, and every checked root matched); 1 a build, run or check failed;
2 no ``nvcc``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "benchmarks" / "gpu" / "kernel_bench.cu"
KERNELS = ROOT / "vramcore" / "kernels"
MiB, GiB = 1 << 20, 1 << 30
LEAF_PLUS_ONE = 65537  # one full leaf and a one-byte last leaf


def pattern(nbytes: int) -> Any:
    """The bytes ``kernel_bench`` fills: little-endian words ``k * 2654435761 mod 2**32``."""
    import numpy

    words = numpy.arange((nbytes + 3) // 4, dtype=numpy.uint32) * numpy.uint32(2654435761)
    return words.view(numpy.uint8)[:nbytes]


def host_root(nbytes: int) -> str:
    """The host digest's root (hex) of :func:`pattern`."""
    from vramcore.digest import DEFAULT_LEAF_SIZE, hash_leaves, merkle_root

    return merkle_root(hash_leaves(memoryview(pattern(nbytes)), DEFAULT_LEAF_SIZE)).hex()


def build(nvcc: str, arch: str, out: Path) -> dict[str, Any]:
    """Compile the native benchmark; ``ptxas`` lines and the exit status."""
    cmd = [nvcc, "-O3", f"-arch={arch}", "-Xptxas", "-v", "-I", str(KERNELS), str(SOURCE)]
    cmd += ["-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    text = done.stdout + done.stderr
    ptxas = [ln.strip() for ln in text.splitlines() if "registers" in ln or "spill" in ln]
    return {
        "arch": arch,
        "exit": done.returncode,
        "ptxas": ptxas[-8:],
        **({"log": text[-3000:]} if done.returncode else {}),
    }


def main(argv: list[str] | None = None) -> int:
    """Build, run, check; print the JSON result."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="256 MiB and 1 GiB only")
    p.add_argument("--build-only", action="store_true", help="compile, do not run (no GPU)")
    p.add_argument("--arch", default="sm_90", help="nvcc -arch (default sm_90: H100/H200)")
    p.add_argument("--json", type=Path, help="write the result here too")
    args = p.parse_args(argv)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print(json.dumps({"error": "nvcc not found"}))
        return 2
    sizes = [1, LEAF_PLUS_ONE, 256 * MiB, GiB] + ([] if args.quick else [4 * GiB, 8 * GiB])
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="vramcore-kbench-") as tmp:
        binary = Path(tmp) / "kernel_bench"
        result["build"] = build(nvcc, args.arch, binary)
        ok = result["build"]["exit"] == 0
        if ok and not args.build_only:
            done = subprocess.run(
                [str(binary), *map(str, sizes)],
                capture_output=True,
                text=True,
                timeout=240,
                check=False,
            )
            rows = []
            for line in done.stdout.splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
            result["device"] = rows[0] if rows else None
            result["sizes"] = rows[1:]
            result["run_exit"] = done.returncode
            ok = done.returncode == 0 and len(rows) == len(sizes) + 1
            for row in result["sizes"]:
                if "root" in row and row["bytes"] <= GiB:
                    row["host_root_matches"] = host_root(row["bytes"]) == row["root"]
                    ok = ok and row["host_root_matches"]
    result["ok"] = ok
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
