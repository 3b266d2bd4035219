"""Seal and verify a file on the mock with two versions of vramcore, in one run.

Each version runs in a child process of its own (its source tree first on ``sys.path``) and
measures, best of N: one-thread SHA-256 of the file's bytes (the baseline), ``seal_file`` and
a full ``verify_sealed``, wall time and process CPU time. The mock keeps freed memory for
reuse, so both versions are measured without the VM's first touch of fresh host pages.

    git worktree add /tmp/old <commit>
    head -c 1G /dev/urandom > /tmp/big.bin
    .venv/bin/python benchmarks/seal_before_after.py /tmp/big.bin --old-tree /tmp/old
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import hashlib, json, sys, time
from vramcore import VramManager
from vramcore.plugins import get_plugin_manager
import vramcore_allocator_mock as m
path, repeat = sys.argv[1], int(sys.argv[2])
cpu = {}
def best(fn, key):
    wall = used = float("inf")
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall, used = min(wall, time.perf_counter() - t), min(used, time.process_time() - c)
    cpu[key] = used
    return wall
data = open(path, "rb").read()
sha = best(lambda: hashlib.sha256(data).digest(), "sha256")
del data
backend = m.MockBackend(devices=1, capacity=4 << 30, cache_bytes=4 << 30)
pm = get_plugin_manager(env={"VRAMCORE_PLUGINS": "mock"})
token = "XILflINRpUyaGAT4DdnjpTq17hbCNOgOWMxMj2TXPEo"
with VramManager(token, allocator=backend, plugin_manager=pm,
                 audit="disabled") as vram:
    held = []
    def seal():
        if held:
            vram.deallocate(held.pop())
        held.append(vram.seal_file(path))
    seal_s = best(seal, "seal")
    verify_s = best(lambda: vram.verify_sealed(held[0]), "verify")
import vramcore
print(json.dumps({"sha256": sha, "seal": seal_s, "verify": verify_s, "cpu": cpu,
                  "code": vramcore.__file__}))
"""


def measure(path: Path, tree: Path | None, repeat: int) -> dict[str, object]:
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), str(tree / "plugins" / "allocator_mock")])
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(repeat)],
        env=env,
        cwd=tempfile.gettempdir(),  # a source tree in the cwd would shadow PYTHONPATH
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise SystemExit(f"child failed:\n{done.stderr[-2000:]}")
    result: dict[str, object] = json.loads(done.stdout)
    if tree is not None and not str(result["code"]).startswith(str(tree.resolve())):
        raise SystemExit(f"the 'before' child imported {result['code']}, not {tree}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--old-tree", type=Path, required=True, help="source tree of 'before'")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if not args.file.is_file() or not (args.old_tree / "vramcore").is_dir():
        parser.error("FILE must be a file and --old-tree a vramcore source tree")
    gib = args.file.stat().st_size / 2**30
    for label, tree in (("before", args.old_tree), ("after", None)):
        r = measure(args.file, tree, args.repeat)
        sha, seal, verify = float(r["sha256"]), float(r["seal"]), float(r["verify"])  # type: ignore[arg-type]
        cpu: dict[str, float] = r["cpu"]  # type: ignore[assignment]
        print(f"{label:<7} code: {r['code']}")
        print(
            f"{label:<7} sha256 1 thread {gib / sha:.2f} GiB/s | seal_file {gib / seal:.2f} GiB/s "
            f"({sha / seal:.2f}x, {cpu['seal'] / gib:.2f} CPU-s/GiB) | verify {gib / verify:.2f} "
            f"GiB/s ({sha / verify:.2f}x, {cpu['verify'] / gib:.2f} CPU-s/GiB)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
