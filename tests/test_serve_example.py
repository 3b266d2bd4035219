"""examples/serving.py runs: it serves verified requests, and a flipped bit in VRAM makes it
fail the request, quarantine and exit 1."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "serving.py"


def _example() -> Any:
    spec = importlib.util.spec_from_file_location("serving_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_serving_loop_serves_and_quarantines(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VRAMCORE_ALLOCATOR", "mock")
    monkeypatch.setenv("VRAMCORE_AUDIT_LOG", str(tmp_path / "audit"))
    monkeypatch.setenv("VRAMCORE_WORKER_TOKEN", "Xe7Rk2Wq9Lz4Tn8Vb3Hy6Mc1Pd5Js0GfUa")
    serving = _example()
    assert serving.main(["--budget-ms", "100000", "--requests", "2", "--json"]) == 0
    served = json.loads(capsys.readouterr().out)
    assert served["plan"]["mode"] == "full" and served["requests"] == 2
    assert served["quarantined"] is None
    assert set(served["costs"]) == {
        "forward_only_ms",
        "full_check_ms",
        "sampled_16_leaves_ms",
        "attestation_signatures_ms",
    }
    assert serving.main(["--budget-ms", "100000", "--requests", "4", "--tamper-after", "1"]) == 1
    out = capsys.readouterr().out
    assert "1 requests" in out and "quarantined, drained, exiting 1" in out
    assert "the bytes in VRAM changed since sealing" in out
