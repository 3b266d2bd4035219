"""Cost of the tracing plugin when no OpenTelemetry SDK is configured.

Seals and verifies a small shard on the mock backend with and without the plugin, in the same
process, interleaving the two so that drift (CPU frequency, caches) hits both alike, and prints
the median seal+verify time of each and the overhead. Also times one bare narrated operation
(no work inside) to show the plugin's fixed cost per operation.

    .venv/bin/python plugins/audit_tracing/benchmarks/bench_tracing.py [--rounds 1000]

Exit status 1 when the overhead is above ``--max-overhead`` (default 5 %).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable

import vramcore_allocator_mock
import vramcore_audit_tracing

from vramcore import VramManager
from vramcore.audit import AuditSink
from vramcore.events import AuditEvent
from vramcore.narration import Operation
from vramcore.plugins import VramcorePluginManager, get_plugin_manager
from vramcore.testing import TEST_TOKEN, CapturePlugin


class NullSink(AuditSink):
    """Accepts every event and keeps nothing (the audit trail is not what is measured)."""

    name = "null"

    def emit(self, event: AuditEvent) -> None:
        """Drop the event."""


def plugin_manager(traced: bool) -> VramcorePluginManager:
    plugins: list[object] = [vramcore_allocator_mock, CapturePlugin(NullSink())]
    if traced:
        plugins.append(vramcore_audit_tracing)  # global API providers: no SDK configured
    return get_plugin_manager(plugins, load_entrypoints=False)


def make_manager(traced: bool) -> VramManager:
    backend = vramcore_allocator_mock.MockBackend(devices=1, capacity=1 << 30)
    return VramManager(
        TEST_TOKEN, allocator=backend, worker_id="bench", plugin_manager=plugin_manager(traced)
    )


def seal_verify_once(manager: VramManager, data: bytes, index: int) -> float:
    started = time.perf_counter()
    shard = manager.seal_model(data, shard_id=f"bench-{index}")
    manager.verify_sealed(shard)
    elapsed = time.perf_counter() - started
    manager.deallocate(shard)
    return elapsed


def bare_operation_cost(traced: bool, repeat: int = 20000) -> float:
    hook = plugin_manager(traced).hook

    def run(op: Operation) -> None:
        return None

    started = time.perf_counter()
    for _ in range(repeat):
        hook.vramcore_operation(op=Operation("copy", run, shard_id="x", device=0, nbytes=1))
    return (time.perf_counter() - started) / repeat


def interleaved(rounds: int, step: Callable[[bool, int], float]) -> dict[bool, list[float]]:
    times: dict[bool, list[float]] = {False: [], True: []}
    for index in range(rounds):
        order = (False, True) if index % 2 == 0 else (True, False)
        for traced in order:
            times[traced].append(step(traced, index))
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--max-overhead", type=float, default=5.0, help="percent")
    args = parser.parse_args(argv)

    data = bytes(range(256)) * max(1, int(args.size_mib * (1 << 20)) // 256)
    managers = {traced: make_manager(traced) for traced in (False, True)}

    def step(traced: bool, index: int) -> float:
        return seal_verify_once(managers[traced], data, index)

    interleaved(args.warmup, step)
    gc.collect()
    gc.disable()  # collections would land on one configuration or the other at random
    try:
        times = interleaved(args.rounds, step)
    finally:
        gc.enable()
    for manager in managers.values():
        manager.close()

    # Each round ran both configurations back to back: the median of the per-round ratios
    # cancels slow drifts (other processes, frequency scaling) better than two medians do.
    ratios = [t / b for t, b in zip(times[True], times[False], strict=True)]
    overhead = (statistics.median(ratios) - 1.0) * 100.0
    per_op = {t: bare_operation_cost(t) for t in (False, True)}
    print(f"shard: {len(data) / (1 << 20):.2f} MiB, rounds: {args.rounds} (interleaved)")
    for label, traced_run in (("without plugin", False), ("with plugin   ", True)):
        median = statistics.median(times[traced_run])
        fastest = min(times[traced_run])
        print(f"seal+verify {label}: median {median * 1e3:.3f} ms  min {fastest * 1e3:.3f} ms")
    print(
        f"overhead (median of paired ratios): {overhead:+.2f} % "
        f"(target <= {args.max_overhead:.1f} %)"
    )
    print(
        f"one bare narrated operation: {per_op[False] * 1e6:.2f} us without, "
        f"{per_op[True] * 1e6:.2f} us with the plugin "
        f"(+{(per_op[True] - per_op[False]) * 1e6:.2f} us; a seal+verify runs 6 operations)"
    )
    return 0 if overhead <= args.max_overhead else 1


if __name__ == "__main__":
    sys.exit(main())
