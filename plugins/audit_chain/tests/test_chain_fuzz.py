"""Random byte-level edits of a log are always detected, and never crash the verifier."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vramcore_audit_chain import ChainConfig, ChainSink, load_key_file, load_public_key, verify_log

from vramcore.audit import SinkContext
from vramcore.events import SealVerified
from vramcore.seal import WorkerToken

edits = st.lists(
    st.tuples(
        st.sampled_from(["replace", "insert", "delete"]),
        st.floats(min_value=0, max_value=1, exclude_max=True),
        st.binary(min_size=1, max_size=8),
    ),
    min_size=1,
    max_size=3,
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pristine") / "log"
    context = SinkContext.from_token(
        WorkerToken("KjkgZa6lRWzDANHnBssSqDORT-JYdZXAae-2c5-qnd0"),
        worker_id="w1",
        device=0,
        scope="vramcore-audit-chain:audit_chain",
    )
    sink = ChainSink(
        ChainConfig(directory=directory, durability="batched", checkpoint_records=8), context
    )
    for i in range(30):
        sink.emit(
            SealVerified(worker_id="w1", shard_id=f"s{i}", device=0, nbytes=10, digest=f"{i:064x}")
        )
    sink.close()
    return directory


def _apply(data: bytes, plan: list[tuple[str, float, bytes]]) -> bytes:
    out = bytearray(data)
    for kind, where, blob in plan:
        i = int(where * len(out))
        if kind == "replace":
            out[i : i + len(blob)] = blob
        elif kind == "insert":
            out[i:i] = blob
        else:
            del out[i : i + len(blob)]
    return bytes(out)


@pytest.mark.slow
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(plan=edits)
def test_random_edits_are_detected_in_both_modes(
    pristine: Path, tmp_path: Path, plan: list[tuple[str, float, bytes]]
) -> None:
    work = tmp_path / "edited"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(pristine, work)
    log_file = sorted(work.glob("audit-*.ndjson"))[0]
    original = log_file.read_bytes()
    edited = _apply(original, plan)
    if edited == original:
        return
    log_file.write_bytes(edited)
    key = load_key_file(work / "auditor-initial.key")
    full = verify_log([work], initial_key=key.initial_key)
    assert not full.ok, plan
    assert full.reason
    public = verify_log([work], public_key=load_public_key((work / "checkpoint.pub").read_text()))
    assert not public.ok, plan
