"""Host-path throughput: seal and verify, against baselines measured in the same run.

What one run measures, for each shard size:

* baselines: SHA-256 of the bytes on one thread (``hashlib``), a plain memory copy, and, when
  the ``model_signing`` package is installed, its file hashing of the same file (sigstore's
  model signing, the closest peer);
* for each worker count: ``seal_model`` (bytes in memory), ``seal_file`` (a file in the page
  cache), a full ``verify_sealed`` and a sampled one (1 % of the leaves by default, reported
  as the shard bytes covered per second);
* for the largest size, with the most workers: ``seal_file`` by reader-thread count (1, 2, 4),
  and where the seal's time went (the pipeline's per-stage busy fractions, read from the
  narrated ``copy`` operation);

and once:

* the fixed cost of one verification (a one-leaf shard, minus its hashing), for
  ``verify_sealed`` and for ``verified()``, with no audit sink and, when the caller supplies
  such a manager, with the audit chain;
* a safetensors header of many tiny tensors parsed by vramcore and by the reference parser
  (``safetensors``, when installed), each in a fresh interpreter so its peak memory is its own.

Every throughput figure is the best of ``repeat`` runs and is also given as a ratio to the
one-thread SHA-256 baseline of the same bytes, so runs on different machines compare; the
goals of the host path are checked as ratios of the same run (:func:`goals`). It runs on any
backend; the mock stands in for VRAM with host memory, so its figures are the host path's.
Used by ``benchmarks/host_bench.py`` (table, ``--json``, ``--plot``) and ``vramcore bench``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from vramcore import hookimpl
from vramcore._loading import Timeline
from vramcore.errors import ConfigError
from vramcore.narration import Operation

__all__ = [
    "DEFAULT_SIZES",
    "DEFAULT_TENSORS",
    "QUICK_SIZES",
    "QUICK_TENSORS",
    "READER_COUNTS",
    "format_table",
    "goals",
    "plot",
    "run",
    "tensor_count",
]

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
#: Shard sizes of a full run.
DEFAULT_SIZES = (64 * KIB, MIB, 16 * MIB, 64 * MIB, 256 * MIB, GIB)
#: Shard sizes of a quick (CI smoke) run.
QUICK_SIZES = (64 * KIB, MIB)
#: Reader-thread counts ``seal_file`` is measured with (largest size, most workers).
READER_COUNTS = (1, 2, 4)
#: Tensors in the header-parsing measurement of a full run, and of a quick one.
DEFAULT_TENSORS = 1_000_000
QUICK_TENSORS = 10_000
_BLOCK = 16 * MIB
_FIXED_COST_BYTES = 4096
# A fresh interpreter parses the header and reports its time and its peak resident memory.
_PARSE_CHILD = """
import json, os, resource, sys, time
which, path = sys.argv[1], sys.argv[2]
size = os.path.getsize(path)
if which == "vramcore":
    from vramcore.safetensors import read_safetensors_header
    start = time.perf_counter()
    with open(path, "rb") as fh:
        count = len(read_safetensors_header(fh, size).tensors)
else:
    from safetensors import safe_open
    try:
        import numpy  # the framework safe_open loads: its import is not the parser's time
    except ImportError:
        pass
    start = time.perf_counter()
    with safe_open(path, "numpy") as f:
        count = len(f.keys())
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
try:  # ru_maxrss survives exec (it can be the parent's); VmHWM is this process's own
    with open("/proc/self/status") as fh:
        peak = next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmHWM:"))
except (OSError, StopIteration):
    pass
print(json.dumps({"seconds": seconds, "tensors": count, "peak_bytes": peak}))
"""


#: Most tensors the header-parse measurement writes (a 10^7-tensor header is near the format's
#: 100 MB header limit).
MAX_TENSORS = 1_000_000 * 10


def tensor_count(text: str) -> int:
    """A tensor count for the header-parse measurement (argparse ``type=`` for ``--tensors``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 0 <= value <= MAX_TENSORS:
        raise argparse.ArgumentTypeError(f"must be from 0 to {MAX_TENSORS}, got {value}")
    return value


def _data(size: int) -> bytearray:
    """``size`` bytes of random-looking data, cheap to make (a random block repeated)."""
    block = os.urandom(min(size, _BLOCK))
    out = bytearray(size)
    for off in range(0, size, len(block)):
        out[off : off + len(block)] = block[: size - off]
    return out


def _best(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


class _ModelSigning:
    """``model_signing``'s hashing of one file, as its own API does it (one SHA-256 of the
    file, by its default configuration)."""

    def __init__(self, hashing: Any) -> None:
        self._hashing = hashing

    @classmethod
    def load(cls) -> _ModelSigning | None:
        """The baseline, or None when ``model_signing`` (or a dependency of it) is missing."""
        try:
            from model_signing import hashing  # type: ignore[import-not-found, unused-ignore]
        except Exception:  # not installed, or its optional dependencies are missing
            return None
        return cls(hashing)

    def hash(self, path: Path) -> object:
        """Hash ``path`` (a file in the page cache)."""
        config = self._hashing.Config()
        return config.hash(path.parent, files_to_hash=[path])


def run(
    make_manager: Callable[[int], Any],
    *,
    sizes: Sequence[int] = DEFAULT_SIZES,
    workers: Iterable[int] = (1, os.cpu_count() or 2),
    repeat: int = 3,
    sample: float = 0.01,
    tensors: int = DEFAULT_TENSORS,
    make_audited_manager: Callable[[], Any] | None = None,
    plugin_manager: Any = None,
    directory: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure; return a JSON-ready report (see the module docstring).

    :param make_manager: ``make_manager(hash_workers, read_threads=None)`` returns a fresh
        manager (closed here).
    :param tensors: tensors in the header-parsing measurement (0: skip it).
    :param make_audited_manager: returns a manager with the audit chain (batched) attached,
        for the fixed cost of a verification with a sink; None skips that measurement.
    :param plugin_manager: the managers' plugin manager: a narration wrapper is registered
        on it for one seal, to read the pipeline's timeline (None skips that measurement).
    :param directory: where the benchmark files go (default: a temporary directory).
    :param progress: called with a line before each measurement.
    """
    if repeat < 1 or not sizes or tensors < 0:
        raise ConfigError("repeat must be at least 1, sizes not empty, tensors not negative")
    bench = HostBenchmark(
        make_manager,
        plugin_manager=plugin_manager,
        workers=sorted(set(workers)),
        repeat=repeat,
        sample=sample,
        progress=progress or (lambda _line: None),
    )
    with tempfile.TemporaryDirectory(dir=directory, prefix="vramcore-bench-") as tmp:
        return bench.run(sizes, Path(tmp), tensors, make_audited_manager)


class HostBenchmark:
    """One benchmark run: its settings, its progress count and the rows it measured."""

    def __init__(
        self,
        make_manager: Callable[..., Any],
        *,
        plugin_manager: Any,
        workers: Sequence[int],
        repeat: int,
        sample: float,
        progress: Callable[[str], None],
    ) -> None:
        self.make_manager = make_manager
        self.plugin_manager = plugin_manager
        self.workers = workers
        self.pipeline: dict[str, Any] | None = None
        self.repeat = repeat
        self.sample = sample
        self.progress = progress
        self.model_signing = _ModelSigning.load()
        self.rows: list[dict[str, Any]] = []
        self.steps = 0
        self.step = 0
        self._base = 0.0  # the one-thread SHA-256 time of the size being measured

    def note(self, what: str, size: int | None = None) -> None:
        """Report progress: the next measurement and its size."""
        self.step += 1
        shown = f", {_human(size)}" if size is not None else ""
        self.progress(f"[{self.step}/{self.steps}] {what}{shown}")

    def run(
        self,
        sizes: Sequence[int],
        tmp: Path,
        tensors: int,
        make_audited_manager: Callable[[], Any] | None,
    ) -> dict[str, Any]:
        """Measure every size, then the fixed costs and the header parse."""
        per_size = 1 + (self.model_signing is not None) + len(self.workers)
        self.steps = len(sizes) * per_size + 1 + (make_audited_manager is not None)
        self.steps += (tensors > 0) + len(READER_COUNTS) + (self.plugin_manager is not None)
        for size in sizes:
            self.measure_size(size, tmp)
        self.measure_readers(max(sizes), tmp)
        self.note("fixed cost of a verification, no audit sink", _FIXED_COST_BYTES)
        fixed = _FixedCost(self.make_manager(max(self.workers))).measure()
        audited = None
        if make_audited_manager is not None:
            self.note("fixed cost of a verification, audit chain (batched)", _FIXED_COST_BYTES)
            audited = _FixedCost(make_audited_manager()).measure()
        parse = None
        if tensors:
            self.note(f"safetensors header of {tensors} tensors, vramcore and reference")
            parse = _HeaderParse(tmp, tensors, self.repeat).measure()
        report: dict[str, Any] = {
            "machine": machine(),
            "repeat": self.repeat,
            "fixed_verify_cost_us": fixed["verify_sealed"],
            "fixed_costs_us": {"no sink": fixed, "audit chain (batched)": audited},
            "header_parse": parse,
            "seal_pipeline": self.pipeline,
            "results": self.rows,
        }
        report["goals"] = goals(report)
        return report

    def add(self, size: int, what: str, seconds: float, workers: int | None = None) -> None:
        """Record one measurement of ``size`` bytes."""
        self.rows.append(
            {
                "size": size,
                "what": what,
                "workers": workers,
                "seconds": seconds,
                "gib_s": size / seconds / GIB,
                "vs_sha256": self._base / seconds,
            }
        )

    def measure_readers(self, size: int, tmp: Path) -> None:
        """``seal_file`` of ``size`` bytes by reader-thread count, then one seal's timeline."""
        path = tmp / f"readers-{size}.bin"
        path.write_bytes(_data(size))
        self._base = next(  # the one-thread SHA-256 of this size, measured already
            r["seconds"] for r in self.rows if r["size"] == size and r["workers"] is None
        )
        top = max(self.workers)
        for readers in READER_COUNTS:
            self.note(f"seal_file, {top} worker(s), {readers} reader thread(s)", size)
            with self.make_manager(top, read_threads=readers) as manager:
                seal = _SealAndVerify(manager, bytearray(), path, self.repeat, self.sample)
                seconds = _best(seal.reseal_file, self.repeat)
                seal.release()
                self.add(size, f"seal_file, {readers} readers", seconds, top)
        if self.plugin_manager is not None:
            self.note(f"seal_file timeline, {top} worker(s)", size)
            spy = _CopyTimeline()
            self.plugin_manager.register(spy)
            try:
                with self.make_manager(top) as manager:
                    manager.deallocate(manager.seal_file(path))
            finally:
                self.plugin_manager.unregister(spy)
            self.pipeline = spy.report(size)
        path.unlink()

    def measure_size(self, size: int, tmp: Path) -> None:
        """The baselines, then seal and verify with each worker count, for one size."""
        data = _data(size)
        path = tmp / f"shard-{size}.bin"
        path.write_bytes(data)
        self.note("baselines", size)
        self._base = _best(lambda: hashlib.sha256(data).digest(), self.repeat)
        target = bytearray(size)
        copy = _best(lambda: target.__setitem__(slice(None), data), self.repeat)
        self.add(size, "sha256 (1 thread)", self._base)
        self.add(size, "memory copy", copy)
        if self.model_signing is not None:
            self.note("model_signing", size)
            ms = self.model_signing
            self.add(size, "model_signing hash", _best(lambda: ms.hash(path), self.repeat))
        for count in self.workers:
            self.note(f"seal and verify, {count} worker(s)", size)
            with self.make_manager(count) as manager:
                seal = _SealAndVerify(manager, data, path, self.repeat, self.sample)
                for what, seconds in seal.measure().items():
                    self.add(size, what, seconds, count)
        path.unlink()


class _SealAndVerify:
    """Seal one shard repeatedly (freeing the previous one each time), then verify it."""

    def __init__(
        self, manager: Any, data: bytearray, path: Path, repeat: int, sample: float
    ) -> None:
        self.manager = manager
        self.data = data
        self.path = path
        self.repeat = repeat
        self.sample = sample
        self.shard: Any = None

    def _reseal(self, seal: Callable[[], Any]) -> None:
        if self.shard is not None:
            self.manager.deallocate(self.shard)
            self.shard = None
        self.shard = seal()

    def reseal_file(self) -> None:
        """Seal the file again (one timed run)."""
        self._reseal(lambda: self.manager.seal_file(self.path))

    def release(self) -> None:
        """Free the shard held, if any."""
        if self.shard is not None:
            self.manager.deallocate(self.shard)
            self.shard = None

    def measure(self) -> dict[str, float]:
        """Seconds, best of ``repeat``, of each measurement."""
        m, repeat = self.manager, self.repeat
        out = {
            "seal_model": _best(lambda: self._reseal(lambda: m.seal_model(self.data)), repeat),
            "seal_file": _best(lambda: self._reseal(lambda: m.seal_file(self.path)), repeat),
        }
        shard = self.shard
        out["verify"] = _best(lambda: m.verify_sealed(shard), repeat)
        out[f"verify sampled {self.sample:.0%}"] = _best(
            lambda: m.verify_sealed(shard, sample=self.sample), repeat
        )
        m.deallocate(shard)
        return out


class _CopyTimeline:
    """A narration wrapper keeping the timeline attributes of the last file ``copy``."""

    def __init__(self) -> None:
        self.attributes: dict[str, Any] = {}

    @hookimpl(wrapper=True)
    def vramcore_operation(self, op: Operation) -> Any:
        """Let the step run, then keep its attributes if it read a file."""
        result = yield
        if op.name == "copy" and "wall_us" in op.attributes:
            self.attributes = dict(op.attributes)
        return result

    def report(self, size: int) -> dict[str, Any] | None:
        """Per-stage busy fractions of the seal's copy (reading, copying, hashing)."""
        a = self.attributes
        if not a:
            return None
        timeline = Timeline.from_attributes(a)
        busy = timeline.busy(os.cpu_count() or 1)
        return {
            "size": size,
            "read_threads": a["read_threads"],
            "wall_s": timeline.wall,
            "busy": {k: v for k, v in busy.items() if k != "cores_used"},
            "cores_used": busy["cores_used"],
        }


class _FixedCost:
    """Microseconds a verification costs beyond hashing its bytes (a one-leaf shard)."""

    def __init__(self, manager: Any, calls: int = 2000) -> None:
        self.manager = manager
        self.calls = calls

    def _per_call(self, fn: Callable[[], object]) -> float:
        for _ in range(200):  # warm up
            fn()
        best = float("inf")
        for _ in range(3):  # the best of three batches: a busy machine only adds time
            started = time.perf_counter()
            for _ in range(self.calls):
                fn()
            best = min(best, (time.perf_counter() - started) / self.calls)
        return best

    def _verified(self, shard: Any) -> None:
        with self.manager.verified(shard):
            pass

    def measure(self) -> dict[str, float]:
        """``verify_sealed`` and ``verified()``, each minus one leaf's hashing, in µs."""
        data = os.urandom(_FIXED_COST_BYTES)
        with self.manager as manager:
            shard = manager.seal_model(data)
            verify = self._per_call(lambda: manager.verify_sealed(shard))
            verified = self._per_call(lambda: self._verified(shard))
        hashing = self._per_call(lambda: hashlib.sha256(b"\0" + data).digest())
        return {
            "verify_sealed": (verify - hashing) * 1e6,
            "verified": (verified - hashing) * 1e6,
        }


class _HeaderParse:
    """A header of ``tensors`` tiny tensors, parsed by vramcore and by the reference."""

    def __init__(self, tmp: Path, tensors: int, repeat: int) -> None:
        self.path = tmp / f"tensors-{tensors}.safetensors"
        self.tensors = tensors
        self.repeat = repeat

    def _write(self) -> None:
        # One F32 of shape [1] each, named like a model's layers, laid out by the reference
        # writer's rules (compact JSON, padded to 8 bytes).
        parts = [
            f'"model.layers.{i}.weight":{{"dtype":"F32","shape":[1],'
            f'"data_offsets":[{4 * i},{4 * i + 4}]}}'
            for i in range(self.tensors)
        ]
        header = ("{" + ",".join(parts) + "}").encode()
        header += b" " * (-len(header) % 8)
        with self.path.open("wb") as fh:
            fh.write(len(header).to_bytes(8, "little"))
            fh.write(header)
            fh.write(bytes(4 * self.tensors))

    def _child(self, which: str) -> dict[str, Any] | None:
        runs = []
        for _ in range(self.repeat):
            done = subprocess.run(  # this interpreter, fixed code, our own file
                [sys.executable, "-c", _PARSE_CHILD, which, str(self.path)],
                capture_output=True,
                text=True,
                check=False,
                timeout=600,
            )
            if done.returncode != 0:
                return None  # the reference is not installed (or cannot open the file)
            runs.append(json.loads(done.stdout))
        if any(r["tensors"] != self.tensors for r in runs):
            raise ConfigError(f"{which} parsed the wrong number of tensors: {runs}")
        return {
            "seconds": min(r["seconds"] for r in runs),
            "peak_mib": max(r["peak_bytes"] for r in runs) / MIB,
        }

    def measure(self) -> dict[str, Any]:
        """Seconds (best of ``repeat``) and peak resident MiB of each parser, and the ratio."""
        self._write()
        try:
            ours = self._child("vramcore")
            reference = self._child("reference")
        finally:
            file_bytes = self.path.stat().st_size
            self.path.unlink()
        if ours is None:
            raise ConfigError("vramcore could not parse its own benchmark header")
        return {
            "tensors": self.tensors,
            "file_bytes": file_bytes,
            "vramcore": ours,
            "reference": reference,
            "vs_reference": ours["seconds"] / reference["seconds"] if reference else None,
        }


def machine() -> dict[str, Any]:
    """What the run ran on: CPU model, CPU count, Python, platform."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "processor": name,
    }


def _row(report: dict[str, Any], what: str, size: int, workers: int | None) -> Any:
    for row in report["results"]:
        if (row["what"], row["size"], row["workers"]) == (what, size, workers):
            return row
    return None


def _goal(
    what: str, value: float, limit: float, higher_is_better: bool, unit: str
) -> list[dict[str, Any]]:
    met = value >= limit if higher_is_better else value <= limit
    bound = ">=" if higher_is_better else "<="
    return [{"goal": what, "value": value, "target": f"{bound} {limit:g}{unit}", "met": met}]


def goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The host path's goals, each checked against this report's own baselines.

    Throughput goals use the largest size and the most workers measured; a goal whose
    measurement or baseline is missing from the report is left out.
    """
    out: list[dict[str, Any]] = []
    rows = report["results"]
    if rows:
        size = max(r["size"] for r in rows)
        top = max((r["workers"] or 0) for r in rows)
        verify = _row(report, "verify", size, top)
        base = _row(report, "sha256 (1 thread)", size, None)
        if verify and base:
            out += _goal(
                f"full verify, {_human(size)}, {top} workers / one-thread SHA-256",
                base["seconds"] / verify["seconds"],
                1.6,
                True,
                "x",
            )
        seal = _row(report, "seal_file", size, top)
        ms = _row(report, "model_signing hash", size, None)
        if seal and ms:
            out += _goal(
                f"seal_file, {_human(size)}, {top} workers / model_signing",
                ms["seconds"] / seal["seconds"],
                1.3,
                True,
                "x",
            )
    costs = report.get("fixed_costs_us") or {}
    for label, limit in (("no sink", 50.0), ("audit chain (batched)", 100.0)):
        cost = costs.get(label)
        if cost:
            value = max(cost["verify_sealed"], cost["verified"])
            out += _goal(f"fixed cost of a verification, {label}", value, limit, False, " us")
    parse = report.get("header_parse")
    if parse and parse.get("vs_reference") is not None:
        out += _goal(
            f"safetensors header, {parse['tensors']} tensors / reference parser",
            parse["vs_reference"],
            1.5,
            False,
            "x",
        )
    return out


def _human(size: int) -> str:
    for unit, factor in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} B"


def format_table(report: dict[str, Any]) -> str:
    """The report as text: GiB/s and ratio to one-thread SHA-256 per size, then the fixed
    costs, the header parse and the goals."""
    m = report["machine"]
    lines = [
        f"machine: {m['processor']}, {m['cpus']} CPUs, Python {m['python']}; "
        f"best of {report['repeat']}",
        f"{'size':>9}  {'what':<22} {'workers':>7} {'GiB/s':>8} {'vs sha256':>10}",
    ]
    for row in report["results"]:
        workers = "" if row["workers"] is None else str(row["workers"])
        lines.append(
            f"{_human(row['size']):>9}  {row['what']:<22} {workers:>7} "
            f"{row['gib_s']:>8.2f} {row['vs_sha256']:>9.2f}x"
        )
    for label, cost in (report.get("fixed_costs_us") or {}).items():
        if cost:
            lines.append(
                f"fixed cost of one verification ({label}): verify_sealed "
                f"{cost['verify_sealed']:.1f} us, verified() {cost['verified']:.1f} us"
            )
    parse = report.get("header_parse")
    if parse:
        ours, ref = parse["vramcore"], parse["reference"]
        line = (
            f"safetensors header, {parse['tensors']} tensors ({parse['file_bytes'] / MIB:.0f} "
            f"MiB): vramcore {ours['seconds']:.2f} s, peak {ours['peak_mib']:.0f} MiB"
        )
        if ref:
            line += (
                f"; reference {ref['seconds']:.2f} s, peak {ref['peak_mib']:.0f} MiB; "
                f"ratio {parse['vs_reference']:.2f}x"
            )
        lines.append(line)
    pipeline = report.get("seal_pipeline")
    if pipeline:
        busy = ", ".join(f"{k} {v:.0%}" for k, v in pipeline["busy"].items())
        lines.append(
            f"seal_file pipeline, {_human(pipeline['size'])}, {pipeline['read_threads']} "
            f"reader threads: {busy} of {pipeline['wall_s']:.2f} s; cores used "
            f"{pipeline['cores_used']:.0%}"
        )
    for g in report.get("goals", ()):
        value = f"{g['value']:.2f}"
        lines.append(
            f"goal {'met' if g['met'] else 'MISSED'}: {g['goal']} = {value} ({g['target']})"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write a PNG: throughput against shard size, log-log, one line per measurement.

    :raises ConfigError: matplotlib is not installed.
    """
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install matplotlib") from None
    top = max((r["workers"] or 0) for r in report["results"])
    series: dict[str, list[tuple[int, float]]] = {}
    for row in report["results"]:
        if row["workers"] not in (None, top):
            continue
        label = row["what"] + (f" ({top} workers)" if row["workers"] else "")
        series.setdefault(label, []).append((row["size"], row["gib_s"]))
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in series.items():
        xs, ys = zip(*sorted(points), strict=True)
        style = "--" if label.startswith(("sha256", "memory", "model_signing")) else "-"
        ax.plot(xs, ys, style, marker="o", label=label)
    ax.set_xscale("log", base=2)
    sizes = sorted({r["size"] for r in report["results"]})
    ax.set_xticks(sizes, [_human(size) for size in sizes])
    ax.set_yscale("log")
    ax.set_xlabel("shard size (bytes)")
    ax.set_ylabel("GiB/s")
    machine = report["machine"]
    ax.set_title(
        f"vramcore host path (mock backend): {machine['processor']}, {machine['cpus']} CPUs, "
        f"Python {machine['python']}",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
