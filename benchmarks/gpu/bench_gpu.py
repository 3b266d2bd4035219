"""GPU benchmark of both GPU backends, in one run: what scripts/gpu-check reports.

For each backend (``cupy``, ``pycuda``; a missing or non-viable one is reported with why):

* device-side verify GB/s by shard size: the device digest alone (the plugin hook) and a
  whole ``verify_sealed`` (digest + leaf comparison + HMAC);
* the host path GB/s: copy back through pinned staging and hash on every host core;
* host→device bandwidth through the backend's own pinned staging and copy handles;
* seal-from-file GB/s (a file in the page cache, no file SHA-256) beside that bandwidth;
* on the first backend measured, a model directory sealed with and without the publisher's
  signature (4 shards in the page cache, signed by the test kit without model_signing;
  unsigned and signed seals alternate): the signed seal's time over the unsigned (issue 18:
  at most 1.15x);

and once, through CuPy when it is there, the device's own copy bandwidth (device→device, bytes
copied per second; twice that is read + written) as the memory-speed reference.

Each figure is the best of ``--repeat`` runs measured in this process; ratios compare figures
of the same run. Targets (issue 9) are printed beside them, never assumed met.

    python benchmarks/gpu/bench_gpu.py [--quick] [--json OUT.json] [--fake]

``--fake`` runs the cupy backend on the fake CUDA runtime with tiny sizes: it checks this
script on a machine without a GPU and measures nothing meaningful.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vramcore import VramManager, VramPolicy
from vramcore.backend import AllocatorBackend
from vramcore.digest import DEFAULT_LEAF_SIZE, default_workers, host_leaves, merkle_root
from vramcore.errors import DeviceDigestUnavailable

MiB, GiB = 1 << 20, 1 << 30
LEAF = DEFAULT_LEAF_SIZE
TOKEN = "jYnIFRF9t3GPTa-UNhnozy5GkMISoVu2JaUv0d1nWTw"  # a throwaway bench token
PLUGINS = {"cupy": "vramcore_allocator_cupy", "pycuda": "vramcore_allocator_pycuda"}
TARGETS = {
    "verify_gbps_at_4GiB_or_more": 300.0,
    "verify_gbps_at_1GiB": 100.0,
    "verify_over_host_path": 20.0,
    "seal_file_over_h2d": 0.8,
    "signed_seal_dir_over_unsigned": 1.15,  # at most
}


def best(fn: Callable[[], Any], repeat: int) -> float:
    """Best wall time of ``repeat`` calls, in seconds."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def gbps(nbytes: int, seconds: float) -> float:
    """Decimal GB per second."""
    return round(nbytes / seconds / 1e9, 2) if seconds > 0 else float("inf")


def fill(backend: AllocatorBackend, buf: Any, seed: int) -> None:
    """Fill a device buffer with non-zero bytes through the backend's pinned staging."""
    import numpy

    chunk = min(64 * MiB, buf.nbytes)
    with backend.staging(1, chunk) as (stage,):
        arr = numpy.frombuffer(stage, dtype=numpy.uint8)
        arr[:] = (numpy.arange(len(arr), dtype=numpy.uint32) * 2654435761 + seed) >> 24
        for off in range(0, buf.nbytes, chunk):
            n = min(chunk, buf.nbytes - off)
            handle = backend.copy_in(buf, off, stage[:n])
            if handle is not None:
                handle.wait()


def h2d_bandwidth(backend: AllocatorBackend, nbytes: int, repeat: int) -> float:
    """GB/s of host→device copies from two alternating pinned staging buffers."""
    chunk = 64 * MiB
    buf = backend.allocate(0, nbytes)
    try:
        with backend.staging(2, chunk) as stages:

            def run() -> None:
                pending: list[Any] = [None, None]
                for i, off in enumerate(range(0, nbytes, chunk)):
                    if pending[i % 2] is not None:
                        pending[i % 2].wait()
                    n = min(chunk, nbytes - off)
                    pending[i % 2] = backend.copy_in(buf, off, stages[i % 2][:n])
                for h in pending:
                    if h is not None:
                        h.wait()

            return gbps(nbytes, best(run, repeat))
    finally:
        backend.free(buf)


def device_copy_bandwidth(nbytes: int, repeat: int) -> dict[str, Any] | None:
    """Device→device copy through CuPy (the memory-speed reference), or ``None``."""
    try:
        import cupy  # type: ignore[import-untyped]

        a = cupy.ones(nbytes, dtype=cupy.uint8)
        b = cupy.empty_like(a)
        b[:] = a
        cupy.cuda.runtime.deviceSynchronize()
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        times = []
        for _ in range(repeat):
            start.record()
            b[:] = a
            stop.record()
            stop.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
        del a, b
        cupy.get_default_memory_pool().free_all_blocks()
        copied = gbps(nbytes, min(times))
        return {"bytes": nbytes, "copy_gbps": copied, "read_plus_write_gbps": 2 * copied}
    except Exception as exc:  # no CuPy or no device: the reference is simply missing
        return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}


@contextlib.contextmanager
def make_backend(name: str, fake: bool) -> Iterator[tuple[AllocatorBackend, Any]]:
    """The backend and its plugin module (raises ``LookupError`` with why, when unusable)."""
    try:
        plugin = importlib.import_module(PLUGINS[name])
    except ImportError as exc:
        raise LookupError(f"{PLUGINS[name]} is not installed ({exc})") from None
    if fake:
        if name != "cupy":
            raise LookupError("--fake runs the cupy backend only")
        from vramcore_allocator_cupy import CupyBackend
        from vramcore_allocator_cupy.testing import FakeCuda, host_kernels

        lib = host_kernels(Path(tempfile.mkdtemp(prefix="bench-fake-")))
        backend: AllocatorBackend = CupyBackend(FakeCuda(lib, capacity=256 * MiB), nvml=False)
    else:
        (spec,) = [s for s in plugin.vramcore_allocator_backends() if s.name == name]
        reason = spec.why_not()
        if reason is not None:
            raise LookupError(reason)
        backend = spec.factory()
    try:
        yield backend, plugin
    finally:
        backend.close()


def bench_seal_dir(manager: VramManager, where: Path, nbytes: int, repeat: int) -> dict[str, Any]:
    """A four-shard model directory sealed unsigned and signed, alternately (page cache)."""
    from vramcore._sealdir import default_parallel_shards
    from vramcore.testing import publisher_keypair, sign_model_dir, write_synthetic_model_dir

    model = where / "bench-model"
    write_synthetic_model_dir(model, nbytes, shards=4)
    private, public = publisher_keypair(where)
    signature = where / "model.sig"
    sign_model_dir(model, private, signature, using="cryptography")  # reads it: page cache
    times: dict[str, list[float]] = {"unsigned": [], "signed": []}
    signed = {"signature": signature, "public_key": public}
    for _ in range(repeat):
        for kind, options in (("unsigned", {}), ("signed", signed)):
            t0 = time.perf_counter()
            sealed = manager.seal_dir(model, **options)  # type: ignore[arg-type]
            times[kind].append(time.perf_counter() - t0)
            for shard in sealed.shards:
                manager.deallocate(shard)
    unsigned_s, signed_s = min(times["unsigned"]), min(times["signed"])
    return {
        "bytes": nbytes,
        "shards": 4,
        "parallel_unsigned": default_parallel_shards(),
        "parallel_signed": default_parallel_shards(signed=True),
        "unsigned_gbps": gbps(nbytes, unsigned_s),
        "signed_gbps": gbps(nbytes, signed_s),
        "signed_over_unsigned": round(signed_s / unsigned_s, 3),
    }


def bench_backend(name: str, args: argparse.Namespace, seal_dir: bool = False) -> dict[str, Any]:
    """Every figure of one backend (and the model directory seal when ``seal_dir``)."""
    from vramcore.plugins import get_plugin_manager

    out: dict[str, Any] = {"backend": name}
    sizes = args.sizes
    with make_backend(name, args.fake) as (backend, plugin):
        info = backend.devices()[0]
        out["device"] = info.to_dict()
        pm = get_plugin_manager([plugin], load_entrypoints=False, env={})
        verify = []
        for nbytes in sizes:
            buf = backend.allocate(0, nbytes)
            try:
                fill(backend, buf, nbytes % 251)
                digest = lambda b=buf: plugin.vramcore_device_digest(backend, b, LEAF, None, None)  # noqa: E731
                try:
                    first = digest()  # warm-up: module load, first launch
                except DeviceDigestUnavailable as exc:  # never timed: the host would hash
                    verify.append({"bytes": nbytes, "not_on_device": str(exc)[:300]})
                    continue
                if first is None:
                    verify.append({"bytes": nbytes, "not_on_device": "the plugin deferred"})
                    continue
                row = {
                    "bytes": nbytes,
                    "device_digest_gbps": gbps(nbytes, best(digest, args.repeat)),
                }
                if nbytes <= args.host_max:
                    with backend.staging(2, 32 * MiB) as stages:

                        def host_path(b: Any = buf, st: Any = stages) -> bytes:
                            leaves = host_leaves(
                                backend,
                                b,
                                LEAF,
                                staging=lambda: contextlib.nullcontext(st),
                                workers=default_workers(),
                            )
                            return merkle_root(leaves)

                        assert host_path() == digest().root, "host and device digests differ"
                        row["host_path_gbps"] = gbps(nbytes, best(host_path, 1))
                    row["device_over_host"] = round(
                        row["device_digest_gbps"] / row["host_path_gbps"], 1
                    )
                verify.append(row)
            finally:
                backend.free(buf)
        out["verify"] = verify
        out["h2d_gbps"] = h2d_bandwidth(backend, args.h2d_bytes, args.repeat)
        manager = VramManager(
            TOKEN,
            allocator=backend,
            plugin_manager=pm,
            audit="disabled",
            policy=VramPolicy(),
        )
        with manager, tempfile.TemporaryDirectory(prefix="vramcore-bench-") as tmp:
            path = Path(tmp) / "shard.bin"
            with path.open("wb") as fh:
                block = os.urandom(MiB)
                for _ in range(args.file_bytes // MiB):
                    fh.write(block)
            with path.open("rb") as fh:  # read once: in the page cache now
                while fh.read(64 * MiB):
                    pass
            seal_times = []
            verify_times = []
            for i in range(args.repeat):
                t0 = time.perf_counter()
                shard = manager.seal_file(path, shard_id=f"bench-{i}")
                seal_times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                manager.verify_sealed(shard)
                verify_times.append(time.perf_counter() - t0)
                manager.deallocate(shard)
            out["seal_file"] = {
                "bytes": args.file_bytes,
                "seal_gbps": gbps(args.file_bytes, min(seal_times)),
                "verify_sealed_gbps": gbps(args.file_bytes, min(verify_times)),
            }
            out["seal_file"]["over_h2d"] = round(out["seal_file"]["seal_gbps"] / out["h2d_gbps"], 2)
            path.unlink()
            if seal_dir:
                out["seal_dir"] = bench_seal_dir(manager, Path(tmp), args.dir_bytes, args.repeat)
    out["targets"] = check_targets(out)
    return out


def check_targets(result: dict[str, Any]) -> dict[str, Any]:
    """Each target with the measured figure and whether it was met (``None``: not measured)."""
    rows = result.get("verify", [])
    timed = [r for r in rows if "device_digest_gbps" in r]  # "not on device" rows never are
    big = [r["device_digest_gbps"] for r in timed if r["bytes"] >= 4 * GiB]
    one = [r["device_digest_gbps"] for r in timed if r["bytes"] == GiB]
    ratio = [r["device_over_host"] for r in rows if "device_over_host" in r]
    seal = result.get("seal_file", {}).get("over_h2d")
    signed = result.get("seal_dir", {}).get("signed_over_unsigned")

    def row(value: float | None, target: float, at_most: bool = False) -> dict[str, Any]:
        return {
            "measured": value,
            "target": target,
            "at_most": at_most,
            "met": None if value is None else (value <= target if at_most else value >= target),
        }

    return {
        "verify_gbps_at_4GiB_or_more": row(
            min(big) if big else None, TARGETS["verify_gbps_at_4GiB_or_more"]
        ),
        "verify_gbps_at_1GiB": row(one[0] if one else None, TARGETS["verify_gbps_at_1GiB"]),
        "verify_over_host_path": row(
            min(ratio) if ratio else None, TARGETS["verify_over_host_path"]
        ),
        "seal_file_over_h2d": row(seal, TARGETS["seal_file_over_h2d"]),
        "signed_seal_dir_over_unsigned": row(
            signed, TARGETS["signed_seal_dir_over_unsigned"], at_most=True
        ),
    }


def environment() -> dict[str, Any]:
    """Where the figures come from: GPU, driver, commit, Python."""
    env: dict[str, Any] = {"python": platform.python_version(), "host": platform.node()}
    with contextlib.suppress(Exception):
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        env["nvidia_smi"] = smi.stdout.strip() or None
    with contextlib.suppress(Exception):
        env["commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip() or os.environ.get("VRAMCORE_COMMIT")
    env.setdefault("commit", os.environ.get("VRAMCORE_COMMIT"))
    return env


def render(report: dict[str, Any]) -> str:
    """The human-readable table."""
    lines = [f"GPU benchmark  {report['environment'].get('nvidia_smi') or '(no nvidia-smi)'}"]
    if report["mode"] == "fake":
        lines.append("FAKE CUDA RUNTIME (--fake): host memory and host kernels; no GPU figure here")
    ref = report.get("device_copy")
    if ref and "copy_gbps" in ref:
        lines.append(
            f"device copy (CuPy, d2d): {ref['copy_gbps']} GB/s copied "
            f"({ref['read_plus_write_gbps']} GB/s read+written)"
        )
    for res in report["backends"]:
        name = res["backend"]
        if "skipped" in res:
            lines.append(f"[{name}] skipped: {res['skipped']}")
            continue
        if "error" in res:
            lines.append(f"[{name}] FAILED: {res['error']}")
            continue
        lines.append(f"[{name}] {res['device']['name']}")
        for r in res["verify"]:
            host = (
                f"  host path {r['host_path_gbps']} GB/s ({r['device_over_host']}x)"
                if "host_path_gbps" in r
                else ""
            )
            device = (
                f"device {r['device_digest_gbps']} GB/s"
                if "device_digest_gbps" in r
                else f"not on device ({r.get('not_on_device', '')})"
            )
            lines.append(f"  verify {r['bytes'] / GiB:7.3f} GiB: {device}{host}")
        s = res["seal_file"]
        lines.append(
            f"  h2d {res['h2d_gbps']} GB/s; seal from file {s['seal_gbps']} GB/s "
            f"({s['over_h2d']}x h2d); verify_sealed {s['verify_sealed_gbps']} GB/s"
        )
        d = res.get("seal_dir")
        if d:
            lines.append(
                f"  seal_dir {d['bytes'] / GiB:.3f} GiB in {d['shards']} shards: unsigned "
                f"{d['unsigned_gbps']} GB/s, signed {d['signed_gbps']} GB/s "
                f"({d['signed_over_unsigned']}x; {d['parallel_signed']} shards at once)"
            )
        for key, t in res["targets"].items():
            state = "not measured" if t["met"] is None else ("met" if t["met"] else "MISSED")
            bound = "<=" if t.get("at_most") else ">="
            lines.append(f"  target {key}: {t['measured']} vs {bound} {t['target']} -> {state}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit 0 when it ran (targets are reported, not enforced)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes, one repeat")
    p.add_argument("--fake", action="store_true", help="fake CUDA runtime (checks the script)")
    p.add_argument("--json", type=Path, help="write the report here too")
    p.add_argument("--backends", default="cupy,pycuda")
    args = p.parse_args(argv)
    if args.fake:
        args.sizes, args.host_max, args.h2d_bytes, args.file_bytes, args.repeat = (
            [MiB, 4 * MiB],
            4 * MiB,
            8 * MiB,
            4 * MiB,
            1,
        )
        args.dir_bytes = 4 * MiB
    elif args.quick:
        args.sizes, args.host_max, args.h2d_bytes, args.file_bytes, args.repeat = (
            [256 * MiB, GiB, 4 * GiB],
            GiB,
            GiB,
            GiB,
            2,
        )
        args.dir_bytes = GiB
    else:
        args.sizes, args.host_max, args.h2d_bytes, args.file_bytes, args.repeat = (
            [64 * MiB, 256 * MiB, GiB, 4 * GiB, 8 * GiB],
            GiB,
            4 * GiB,
            4 * GiB,
            3,
        )
        args.dir_bytes = 2 * GiB
    report: dict[str, Any] = {
        "environment": environment(),
        "mode": "fake" if args.fake else ("quick" if args.quick else "full"),
        "device_copy": None if args.fake else device_copy_bandwidth(GiB, args.repeat + 2),
        "backends": [],
    }
    for name in args.backends.split(","):
        first = not any("device" in b for b in report["backends"])
        try:
            report["backends"].append(bench_backend(name, args, seal_dir=first))
        except LookupError as exc:
            report["backends"].append({"backend": name, "skipped": str(exc)})
        except Exception as exc:  # report and go on to the next backend
            report["backends"].append({"backend": name, "error": f"{type(exc).__name__}: {exc}"})
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if any("error" in b for b in report["backends"]) else 0


if __name__ == "__main__":
    sys.exit(main())
