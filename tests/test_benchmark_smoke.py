"""The host benchmark runs in CI-sized form: every measurement present, sane, and reported."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path
from typing import Any

import pytest

from vramcore._cli import benchmark

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "host_bench.py"


def run_script(args: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    return int(info.value.code or 0)


@pytest.mark.slow
def test_quick_run_writes_a_table_and_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.json"
    args = ["--quick", "--sizes", "64KiB,1MiB", "--workers", "1,2", "--tensors", "3000"]
    code = run_script([*args, "--json", str(out)], monkeypatch)
    assert code == 0
    captured = capsys.readouterr()
    assert "[1/" in captured.err  # progress lines
    assert "verify sampled 1%" in captured.out
    report: dict[str, Any] = json.loads(out.read_text())
    whats = {(r["what"], r["workers"], r["size"]) for r in report["results"]}
    for size in (65536, 1 << 20):
        assert ("sha256 (1 thread)", None, size) in whats
        assert ("memory copy", None, size) in whats
        for workers in (1, 2):
            for what in ("seal_model", "seal_file", "verify", "verify sampled 1%"):
                assert (what, workers, size) in whats
    for row in report["results"]:
        assert row["seconds"] > 0
        assert row["gib_s"] == pytest.approx(row["size"] / row["seconds"] / 2**30)
    assert report["fixed_verify_cost_us"] > 0
    for label in ("no sink", "audit chain (batched)"):
        costs = report["fixed_costs_us"][label]
        assert costs["verify_sealed"] > 0 and costs["verified"] > 0
    parse = report["header_parse"]
    assert parse["tensors"] == 3000 and parse["vramcore"]["seconds"] > 0
    assert parse["vramcore"]["peak_mib"] > 1
    goals = {g["goal"]: g for g in report["goals"]}
    assert "full verify, 1 MiB, 2 workers / one-thread SHA-256" in goals
    assert "fixed cost of a verification, audit chain (batched)" in goals
    for goal in goals.values():
        assert isinstance(goal["met"], bool) and goal["value"] > 0
    assert "goal " in captured.out and report["machine"]["processor"]
    for readers in benchmark.READER_COUNTS:
        assert (f"seal_file, {readers} readers", 2, 1 << 20) in whats
    pipeline = report["seal_pipeline"]
    assert pipeline["read_threads"] == 2 and pipeline["wall_s"] > 0
    assert set(pipeline["busy"]) == {"read", "hash", "copy", "other", "stall"}
    assert all(value >= 0 for value in pipeline["busy"].values())


@pytest.mark.parametrize(
    "args",
    [
        ["--repeat", "0"],
        ["--workers", "0"],
        ["--workers", "x"],
        ["--sizes", "12Q"],
        ["--sample", "2"],
        ["--tensors", "-1"],
    ],
)
def test_bad_arguments_exit_2(args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_script(args, monkeypatch) == 2


def test_plot_without_matplotlib_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    report = {
        "machine": {"cpus": 2, "python": "3.11"},
        "results": [{"size": 1, "what": "verify", "workers": 1, "gib_s": 1.0}],
    }
    with pytest.raises(benchmark.ConfigError, match="pip install matplotlib"):
        benchmark.plot(report, tmp_path / "x.png")


def test_goals_are_ratios_of_the_same_run() -> None:
    def row(what: str, seconds: float, workers: int | None = None) -> dict[str, Any]:
        return {"size": 1 << 30, "what": what, "workers": workers, "seconds": seconds}

    report = {
        "results": [
            row("sha256 (1 thread)", 1.0),
            row("model_signing hash", 1.2),
            row("verify", 0.5, 2),
            row("seal_file", 1.0, 2),
        ],
        "fixed_costs_us": {"no sink": {"verify_sealed": 40.0, "verified": 60.0}},
        "header_parse": {"tensors": 10, "vs_reference": 0.9},
    }
    goals = {g["goal"]: (round(g["value"], 2), g["met"]) for g in benchmark.goals(report)}
    assert goals == {
        "full verify, 1 GiB, 2 workers / one-thread SHA-256": (2.0, True),
        "seal_file, 1 GiB, 2 workers / model_signing": (1.2, False),
        "fixed cost of a verification, no sink": (60.0, False),  # the slower of the two
        "safetensors header, 10 tensors / reference parser": (0.9, True),
    }
