"""32 writer processes share one file witness for a bounded time: no head is lost, none is
attributed to the wrong log, none is torn, and no writer is blocked."""

from __future__ import annotations

import json
import os
import signal
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
from vramcore_audit_chain import ChainConfig, ChainSink, FileWitness, Head, load_anchors
from vramcore_audit_chain import _format as fmt

from vramcore.events import SealVerified, VramSealed

WRITERS = 32
SECONDS = 1.5
DEADLINE = 120.0

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork"),
    pytest.mark.slow,  # about 10 s: CI runs it, the fast loop leaves it out
]


def _writer(directory: Path, witness: Path, chain: Any, index: int) -> dict[str, Any]:
    """One worker: immediate mode (a head per commit) for SECONDS, then a clean close."""
    sink = ChainSink(
        ChainConfig(directory=directory, durability="immediate", checkpoint_records=50),
        chain.context(
            f"PS_k6bEvr_WmRwRpqLHhzpCqdE1h2TPsOeiPqH79iLc-{index:02d}"
        ),  # a key per worker
        witnesses=[FileWitness(witness)],
    )
    sent = 0
    end = time.monotonic() + SECONDS
    while time.monotonic() < end:
        if sent % 10 == 0:
            event: Any = VramSealed(
                worker_id=f"w{index}",
                shard_id=f"s{sent}",
                device=0,
                nbytes=1,
                digest="ab" * 32,
                digest_alg="rfc6962-sha256",
                leaf_size=65536,
                backend="mock",
            )
        else:
            event = SealVerified(
                worker_id=f"w{index}", shard_id=f"s{sent}", device=0, nbytes=1, digest="cd" * 32
            )
        sink.emit(event)
        sent += 1
    sink.close()
    return {"log_id": sink.log_id, "sent": sent, "heads": sink.report()["heads_published"]}


@pytest.mark.slow  # 32 forked writers
def test_32_writers_share_one_file_witness(tmp_path: Path, chain: Any) -> None:
    witness = tmp_path / "shared-witness" / "heads.ndjson"
    witness.parent.mkdir()
    children: dict[int, Path] = {}
    for index in range(WRITERS):
        directory = tmp_path / f"worker-{index}"
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child exits
            code = 1
            try:
                result = _writer(directory, witness, chain, index)
                (tmp_path / f"result-{index}.json").write_text(json.dumps(result))
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        children[pid] = directory
    deadline = time.monotonic() + DEADLINE
    blocked = []
    while children and time.monotonic() < deadline:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            time.sleep(0.05)
            continue
        assert os.waitstatus_to_exitcode(status) == 0, f"writer {children[pid]} failed"
        del children[pid]
    for pid, directory in children.items():  # pragma: no cover - only on failure
        blocked.append(directory.name)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert not blocked, f"writers blocked past {DEADLINE} s: {blocked}"

    results = [json.loads((tmp_path / f"result-{i}.json").read_text()) for i in range(WRITERS)]
    lines = witness.read_bytes().split(b"\n")
    assert lines[-1] == b""  # every line complete
    heads = [Head.parse(line) for line in lines[:-1]]
    assert all(h is not None for h in heads), "a torn or interleaved line in the witness"
    by_log: dict[str, list[Head]] = {}
    for head in heads:
        assert head is not None
        by_log.setdefault(head.log_id, []).append(head)
    assert set(by_log) == {r["log_id"] for r in results}
    for index, result in enumerate(results):
        directory = tmp_path / f"worker-{index}"
        public = (directory / fmt.PUBLIC_KEY_NAME).read_text().strip()
        mine = by_log[result["log_id"]]
        # None lost: one head per commit the writer published; none misattributed: each is
        # signed by this log's key and in this log's order.
        assert len(mine) == result["heads"] > result["sent"] // 2, result
        assert all(h.signed_by(public) for h in mine)
        assert [h.seq for h in mine] == sorted({h.seq for h in mine})
        assert mine[-1].reason == "close"
        verdict = chain.verify(directory, anchors=load_anchors([witness]), log_id=result["log_id"])
        assert verdict.ok and verdict.anchors == len(mine), verdict.summary()
