"""Host-path throughput: seal and verify, against baselines measured in the same run.

What one run measures, for each shard size:

* baselines: SHA-256 of the bytes on one thread (``hashlib``), a plain memory copy, and, when
  the ``model_signing`` package is installed, its file hashing of the same file (sigstore's
  model signing, the closest peer);
* for each worker count: ``seal_model`` (bytes in memory), ``seal_file`` (a file in the page
  cache), a full ``verify_sealed`` and a sampled one (1 % of the leaves by default, reported
  as the shard bytes covered per second);
* the fixed cost of one verification (a one-leaf shard, minus its hashing).

Every figure is the best of ``repeat`` runs and is also given as a ratio to the one-thread
SHA-256 baseline of the same bytes, so runs on different machines compare. It runs on any
backend; the mock stands in for VRAM with host memory, so its figures are the host path's.
Used by ``benchmarks/host_bench.py`` (table, ``--json``, ``--plot``).
"""

from __future__ import annotations

import hashlib
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from vramcore.errors import ConfigError

__all__ = ["DEFAULT_SIZES", "QUICK_SIZES", "format_table", "plot", "run"]

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
#: Shard sizes of a full run.
DEFAULT_SIZES = (64 * KIB, MIB, 16 * MIB, 64 * MIB, 256 * MIB, GIB)
#: Shard sizes of a quick (CI smoke) run.
QUICK_SIZES = (64 * KIB, MIB)
_BLOCK = 16 * MIB


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


def _model_signing_hash() -> Callable[[Path], object] | None:
    try:
        from model_signing import hashing  # type: ignore[import-not-found, unused-ignore]
    except Exception:  # not installed, or its optional dependencies are missing
        return None

    def run(path: Path) -> object:
        config = hashing.Config()  # type: ignore[no-untyped-call, unused-ignore]
        return config.hash(path.parent, files_to_hash=[path])

    return run


def run(
    make_manager: Callable[[int], Any],
    *,
    sizes: Sequence[int] = DEFAULT_SIZES,
    workers: Iterable[int] = (1, os.cpu_count() or 2),
    repeat: int = 3,
    sample: float = 0.01,
    directory: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure; return a JSON-ready report (see the module docstring).

    :param make_manager: ``make_manager(hash_workers)`` returns a fresh manager (closed here).
    :param directory: where the benchmark files go (default: a temporary directory).
    :param progress: called with a line before each measurement.
    """
    if repeat < 1 or not sizes:
        raise ConfigError("repeat must be at least 1 and sizes must not be empty")
    say = progress or (lambda _line: None)
    counts = sorted(set(workers))
    ms_hash = _model_signing_hash()
    rows: list[dict[str, Any]] = []
    steps = len(sizes) * (1 + (ms_hash is not None) + len(counts)) + 1
    step = 0

    def note(what: str, size: int) -> None:
        nonlocal step
        step += 1
        say(f"[{step}/{steps}] {what}, {_human(size)}")

    with tempfile.TemporaryDirectory(dir=directory, prefix="vramcore-bench-") as tmp:
        for size in sizes:
            rows += _measure_size(
                size, Path(tmp), make_manager, counts, repeat, sample, ms_hash, note
            )
        note("fixed cost of a verification", 4096)
        fixed = _fixed_cost(make_manager, max(counts))
    return {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
        },
        "repeat": repeat,
        "fixed_verify_cost_us": fixed,
        "results": rows,
    }


def _measure_size(
    size: int,
    tmp: Path,
    make_manager: Callable[[int], Any],
    counts: Sequence[int],
    repeat: int,
    sample: float,
    ms_hash: Callable[[Path], object] | None,
    note: Callable[[str, int], None],
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    data = _data(size)
    path = tmp / f"shard-{size}.bin"
    path.write_bytes(data)
    note("baselines", size)
    base = _best(lambda: hashlib.sha256(data).digest(), repeat)
    target = bytearray(size)
    copy = _best(lambda: target.__setitem__(slice(None), data), repeat)

    def add(what: str, seconds: float, workers: int | None = None) -> None:
        rows.append(
            {
                "size": size,
                "what": what,
                "workers": workers,
                "seconds": seconds,
                "gib_s": size / seconds / GIB,
                "vs_sha256": base / seconds,
            }
        )

    add("sha256 (1 thread)", base)
    add("memory copy", copy)
    if ms_hash is not None:
        note("model_signing", size)
        add("model_signing hash", _best(lambda: ms_hash(path), repeat))
    for count in counts:
        note(f"seal and verify, {count} worker(s)", size)
        with make_manager(count) as manager:
            for what, seconds in _seal_and_verify(manager, data, path, repeat, sample).items():
                add(what, seconds, count)
    return rows


def _seal_and_verify(
    manager: Any, data: bytearray, path: Path, repeat: int, sample: float
) -> dict[str, float]:
    held: list[Any] = []

    def seal(fn: Callable[[], Any]) -> None:
        if held:
            manager.deallocate(held.pop())
        held.append(fn())

    out = {
        "seal_model": _best(lambda: seal(lambda: manager.seal_model(data)), repeat),
        "seal_file": _best(lambda: seal(lambda: manager.seal_file(path)), repeat),
    }
    shard = held[0]
    out["verify"] = _best(lambda: manager.verify_sealed(shard), repeat)
    out[f"verify sampled {sample:.0%}"] = _best(
        lambda: manager.verify_sealed(shard, sample=sample), repeat
    )
    return out


def _fixed_cost(make_manager: Callable[[int], Any], workers: int, calls: int = 2000) -> float:
    """Microseconds a verification costs beyond hashing its bytes (a 4 KiB shard)."""
    data = os.urandom(4096)
    with make_manager(workers) as manager:
        shard = manager.seal_model(data)
        for _ in range(200):  # warm up
            manager.verify_sealed(shard)
        started = time.perf_counter()
        for _ in range(calls):
            manager.verify_sealed(shard)
        verify = (time.perf_counter() - started) / calls
    started = time.perf_counter()
    for _ in range(calls):
        hashlib.sha256(b"\0" + data).digest()
    hashing = (time.perf_counter() - started) / calls
    return (verify - hashing) * 1e6


def _human(size: int) -> str:
    for unit, factor in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} B"


def format_table(report: dict[str, Any]) -> str:
    """The report as a text table: GiB/s and ratio to one-thread SHA-256, per size."""
    lines = [
        f"machine: {report['machine']['processor']}, {report['machine']['cpus']} CPUs, "
        f"Python {report['machine']['python']}; best of {report['repeat']}",
        f"{'size':>9}  {'what':<22} {'workers':>7} {'GiB/s':>8} {'vs sha256':>10}",
    ]
    for row in report["results"]:
        workers = "" if row["workers"] is None else str(row["workers"])
        lines.append(
            f"{_human(row['size']):>9}  {row['what']:<22} {workers:>7} "
            f"{row['gib_s']:>8.2f} {row['vs_sha256']:>9.2f}x"
        )
    lines.append(f"fixed cost of one verification: {report['fixed_verify_cost_us']:.1f} us")
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
        f"vramcore host path (mock backend), {machine['cpus']} CPUs, Python {machine['python']}"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
