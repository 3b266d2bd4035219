"""Attacks on the chain's witnesses and anchors (issue 20), each written against the code
before the fix and failing there:

* the tail after the newest witnessed head deleted after a crash, in every durability mode;
* records rewritten under a public-key verifier's nose while an anchor "covered" them;
* a shared witness written by someone else: replayed, unsigned, torn and corrupted heads;
* costs an attacker controls (epoch search, huge anchor files).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from vramcore_audit_chain import (
    ChainConfig,
    ChainSink,
    FileWitness,
    Head,
    load_anchors,
    load_public_key,
    verify_log,
)
from vramcore_audit_chain import _format as fmt

from vramcore._cli.cli import main
from vramcore.audit import AuditWitness
from vramcore.errors import AuditError
from vramcore.events import PolicyViolation, SealVerified, VramDeallocated

# -- helpers ---------------------------------------------------------------------------------


def _sink(directory: Path, chain: Any, witnesses: list[AuditWitness], **settings: Any) -> Any:
    settings.setdefault("durability", "mixed")
    settings.setdefault("checkpoint_records", 10_000)
    return ChainSink(
        ChainConfig(directory=directory, **settings), chain.context(), witnesses=witnesses
    )


def _crash(sink: Any) -> None:
    """What a SIGKILL leaves: no closing checkpoint, the flusher gone, the lock released."""
    writer = sink._writer
    with writer._lock:
        writer._stopping = True
        writer._wake.notify_all()
    writer._flusher.join()
    writer._release()


def _plain(i: int) -> Any:
    if i % 2:
        return VramDeallocated(worker_id="w1", shard_id=f"s{i}", device=0, nbytes=4096)
    return SealVerified(worker_id="w1", shard_id=f"s{i}", device=0, nbytes=4096, digest="ab" * 32)


def _violation(rule: str) -> Any:
    return PolicyViolation(worker_id="w1", device=0, rule=rule, detail="integrated GPU refused")


def _last_file(directory: Path) -> Path:
    return fmt.log_files(directory)[-1][1]


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _cut(directory: Path, count: int) -> None:
    """Delete the last ``count`` records: no key needed."""
    path = _last_file(directory)
    path.write_bytes(b"".join(_lines(path)[:-count]))


def _verify_cli(capsys: Any, directory: Path, *extra: str) -> tuple[int, dict[str, Any], str]:
    argv = ["audit", "verify", str(directory), *extra, "--json"]
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    doc = json.loads(out) if out.strip() else {}
    return code, doc, err + str(doc.get("error", {}).get("message", ""))


def _key_args(directory: Path) -> list[str]:
    return ["--key-file", str(directory / fmt.INITIAL_KEY_NAME)]


@pytest.fixture
def witness_file(tmp_path: Path) -> Path:
    elsewhere = tmp_path / "another-mount"
    elsewhere.mkdir()
    return elsewhere / "witness.ndjson"


# -- 1. no unwitnessed tail ------------------------------------------------------------------


def _acknowledged_then_crashed(
    chain_dir: Path, chain: Any, witness_file: Path, durability: str, n: int
) -> None:
    """A session that acknowledged ``n`` non-critical events as durable, then crashed."""
    sink = _sink(chain_dir, chain, [FileWitness(witness_file)], durability=durability)
    sink.emit(_violation("first"))  # a critical event: mixed mode witnesses it on its own
    for i in range(n):
        sink.emit(_plain(i))
    if durability != "immediate":
        sink.flush()  # what batched/mixed mode acknowledge as durable (or the flush interval)
    _crash(sink)


@pytest.mark.parametrize("durability", ["immediate", "mixed", "batched"])
@pytest.mark.parametrize("cut", [1, 2, 5])
def test_acknowledged_events_cut_after_a_crash_fail_verify_with_the_witness(
    chain_dir: Path, chain: Any, witness_file: Path, capsys: Any, durability: str, cut: int
) -> None:
    _acknowledged_then_crashed(chain_dir, chain, witness_file, durability, 6)
    _cut(chain_dir, cut)
    code, doc, _ = _verify_cli(
        capsys, chain_dir, *_key_args(chain_dir), "--live", "--anchor", str(witness_file)
    )
    assert (code, doc["reason"]) == (1, "truncated_after_anchor"), doc
    # The writer refuses to continue it, too.
    with pytest.raises(AuditError, match="records were removed"):
        _sink(chain_dir, chain, [FileWitness(witness_file)], durability=durability)


@pytest.mark.parametrize("durability", ["immediate", "mixed", "batched"])
def test_cut_tail_written_over_by_a_restart_without_the_witness_is_caught(
    chain_dir: Path, chain: Any, witness_file: Path, capsys: Any, durability: str
) -> None:
    """The attacker cuts acknowledged events and restarts the writer without its witness, so
    that a clean, closed log goes on from the cut: the witness's newest head names a record
    the log no longer holds."""
    _acknowledged_then_crashed(chain_dir, chain, witness_file, durability, 6)
    _cut(chain_dir, 3)
    restarted = _sink(chain_dir, chain, [], durability=durability)
    for i in range(10):
        restarted.emit(_plain(i))
    restarted.close()
    assert chain.verify(chain_dir).ok  # nothing to see on the disk alone
    code, doc, _ = _verify_cli(
        capsys, chain_dir, *_key_args(chain_dir), "--anchor", str(witness_file)
    )
    assert (code, doc["reason"]) == (1, "rolled_back"), doc


def test_every_commit_is_witnessed_by_one_head(
    chain_dir: Path, chain: Any, witness_file: Path
) -> None:
    sink = _sink(chain_dir, chain, [FileWitness(witness_file)], durability="immediate")
    for i in range(5):
        sink.emit(_plain(i))
    sink.close()
    heads = [Head.parse(line) for line in witness_file.read_text().splitlines()]
    # open, five events each fsynced on its own, the close: one head each.
    assert [h.reason for h in heads if h] == ["open", *["commit"] * 5, "close"]
    assert [h.seq for h in heads if h] == list(range(1, 8))


def test_batched_mode_publishes_one_head_per_flush_not_per_event(
    chain_dir: Path, chain: Any, witness_file: Path
) -> None:
    sink = _sink(chain_dir, chain, [FileWitness(witness_file)], durability="batched")
    for i in range(200):
        sink.emit(_plain(i))
    sink.flush()
    sink.close()
    heads = [Head.parse(line) for line in witness_file.read_text().splitlines()]
    assert 3 <= len(heads) < 50
    assert heads[-1] is not None and heads[-1].reason == "close"


# -- 2. anchors that authenticate in public-key mode ------------------------------------------


def _running_log(chain_dir: Path, chain: Any, witness_file: Path) -> Path:
    """A log whose writer crashed (or still runs) after critical and plain events."""
    sink = _sink(chain_dir, chain, [FileWitness(witness_file)], durability="immediate")
    sink.emit(_plain(0))
    sink.emit(_violation("strict_host_isolation"))
    sink.emit(_plain(1))
    sink.emit(_violation("integrated_gpu"))
    sink.emit(_plain(2))
    _crash(sink)
    return _last_file(chain_dir)


def _rewrite(path: Path, index: int, old: bytes, new: bytes) -> None:
    lines = _lines(path)
    assert old in lines[index]
    lines[index] = lines[index].replace(old, new)
    path.write_bytes(b"".join(lines))


def _event_lines(path: Path) -> list[int]:
    return [i for i, line in enumerate(_lines(path)) if b'"type":"event"' in line]


def _public_verify(capsys: Any, chain_dir: Path, witness_file: Path) -> Any:
    return _verify_cli(
        capsys,
        chain_dir,
        "--public-key",
        str(chain_dir / fmt.PUBLIC_KEY_NAME),
        "--anchor",
        str(witness_file),
        "--live",
    )


def test_public_key_anchor_catches_a_rewritten_policy_violation(
    chain_dir: Path, chain: Any, witness_file: Path, capsys: Any
) -> None:
    path = _running_log(chain_dir, chain, witness_file)
    index = next(i for i in _event_lines(path) if b"policy.violation" in _lines(path)[i])
    # Same length, MAC left as it was: only the MAC (which this verifier cannot check) and
    # the anchor's segment hash could tell.
    _rewrite(path, index, b"strict_host_isolation", b"none_at_all_nothing!!")
    code, doc, _ = _public_verify(capsys, chain_dir, witness_file)
    assert (code, doc["reason"]) == (1, "anchor_mismatch"), doc


def test_public_key_anchor_catches_swapped_events(
    chain_dir: Path, chain: Any, witness_file: Path, capsys: Any
) -> None:
    path = _running_log(chain_dir, chain, witness_file)
    lines = _lines(path)
    a, b = [i for i in _event_lines(path) if b"policy.violation" in lines[i]]

    def data(line: bytes) -> bytes:
        return line[line.index(b'"data":') : line.rindex(b',"mac":')]

    da, db = data(lines[a]), data(lines[b])
    lines[a], lines[b] = lines[a].replace(da, db), lines[b].replace(db, da)
    path.write_bytes(b"".join(lines))
    code, doc, _ = _public_verify(capsys, chain_dir, witness_file)
    assert (code, doc["reason"]) == (1, "anchor_mismatch"), doc


def test_public_key_anchor_catches_a_faked_writer_restart(
    chain_dir: Path, chain: Any, witness_file: Path, capsys: Any
) -> None:
    path = _running_log(chain_dir, chain, witness_file)
    lines = _lines(path)
    index = next(i for i in _event_lines(path) if b"policy.violation" in lines[i])
    line = lines[index]
    fake_data = (
        b'{"clean":true,"device":0,"pid":1,"ts":"2026-01-01T00:00:00.000000Z","worker_id":"w1"}'
    )
    start, end = line.index(b'"data":') + 7, line.rindex(b',"mac":')
    lines[index] = (
        line[:start].replace(b'"type":"event"', b'"type":"open"') + fake_data + line[end:]
    )
    path.write_bytes(b"".join(lines))
    code, doc, _ = _public_verify(capsys, chain_dir, witness_file)
    assert code == 1 and doc["reason"] == "anchor_mismatch", doc


def test_public_key_mode_says_what_it_did_not_authenticate(
    chain_dir: Path, chain: Any, witness_file: Path, capsys: Any
) -> None:
    _running_log(chain_dir, chain, witness_file)
    public = load_public_key(str(chain_dir / fmt.PUBLIC_KEY_NAME))
    # Without the witness, nothing after the genesis is covered by a signature.
    alone = verify_log([chain_dir], public_key=public, allow_open=True)
    assert alone.ok and alone.unauthenticated == alone.records and alone.warnings
    code = main(
        [
            "audit",
            "verify",
            str(chain_dir),
            "--public-key",
            str(chain_dir / fmt.PUBLIC_KEY_NAME),
            "--live",
        ]
    )
    out, _ = capsys.readouterr()
    assert code == 0 and "WARNING" in out and "not authenticated" in out
    # With it, every record up to the newest head is authenticated.
    anchored = verify_log(
        [chain_dir], public_key=public, allow_open=True, anchors=load_anchors([witness_file])
    )
    assert anchored.ok and anchored.unauthenticated == 0 and not anchored.warnings, anchored


# -- 3. a witness that others may write to ---------------------------------------------------


def _rolled_back_with(
    chain_dir: Path, tmp_path: Path, chain: Any, witness_file: Path
) -> tuple[str, str]:
    """Two sessions, then the directory restored from a backup taken between them. Returns
    the first and the last line of the witness (an old head and the newest one)."""
    import shutil

    first = _sink(chain_dir, chain, [FileWitness(witness_file)])
    first.emit(_plain(0))
    first.close()
    backup = tmp_path / "backup"
    shutil.copytree(chain_dir, backup)
    second = _sink(chain_dir, chain, [FileWitness(witness_file)])
    for i in range(5):
        second.emit(_plain(i))
    second.close()
    shutil.rmtree(chain_dir)
    shutil.copytree(backup, chain_dir)
    lines = witness_file.read_text().splitlines()
    return lines[0], lines[-1]


def _append(path: Path, text: str) -> None:
    with path.open("a") as f:
        f.write(text + "\n")


def test_a_replayed_old_head_does_not_hide_a_rollback_from_the_writer(
    chain_dir: Path, tmp_path: Path, chain: Any, witness_file: Path
) -> None:
    old, _ = _rolled_back_with(chain_dir, tmp_path, chain, witness_file)
    _append(witness_file, old)  # another worker sharing the witness replays an old head
    with pytest.raises(AuditError, match="records were removed"):
        _sink(chain_dir, chain, [FileWitness(witness_file)])


def test_an_unsigned_head_does_not_hide_a_rollback_from_the_writer(
    chain_dir: Path, tmp_path: Path, chain: Any, witness_file: Path
) -> None:
    old, _ = _rolled_back_with(chain_dir, tmp_path, chain, witness_file)
    _append(witness_file, json.dumps({**json.loads(old), "sig": "0" * 128}))
    with pytest.raises(AuditError, match="records were removed"):
        _sink(chain_dir, chain, [FileWitness(witness_file)])


def _cut_after_crash_with_newest_head(
    chain_dir: Path, chain: Any, witness_file: Path
) -> tuple[list[str], int]:
    """A crashed session whose last event is cut; returns the witness lines and the index of
    the newest head of this log (the only one that shows the cut)."""
    sink = _sink(chain_dir, chain, [FileWitness(witness_file)], durability="immediate")
    for i in range(6):
        sink.emit(_plain(i))
    _crash(sink)
    _cut(chain_dir, 1)
    lines = witness_file.read_text().splitlines()
    return lines, len(lines) - 1


def test_a_torn_newest_head_fails_verification_instead_of_being_skipped(
    chain_dir: Path, chain: Any, witness_file: Path, capsys: Any
) -> None:
    lines, newest = _cut_after_crash_with_newest_head(chain_dir, chain, witness_file)
    # The older heads still match the cut log; the newest one, which does not, is torn.
    lines[newest] = lines[newest][: len(lines[newest]) // 2]
    witness_file.write_text("\n".join(lines) + "\n")
    code, doc, _ = _verify_cli(
        capsys, chain_dir, *_key_args(chain_dir), "--live", "--anchor", str(witness_file)
    )
    assert (code, doc["reason"]) == (1, "anchor_unreadable"), doc
    assert doc["anchor_report"]["unusable"] == 1


@pytest.mark.parametrize("member", ["log_id", "sig", "seq", "mac"])
def test_a_bit_flip_in_the_newest_head_fails_verification(
    chain_dir: Path, chain: Any, witness_file: Path, capsys: Any, member: str
) -> None:
    lines, newest = _cut_after_crash_with_newest_head(chain_dir, chain, witness_file)
    head = json.loads(lines[newest])
    log_id = head["log_id"]
    if member == "seq":
        head[member] ^= 1
    else:
        value = head[member]
        head[member] = value[:3] + "0123456789abcdef"[int(value[3], 16) ^ 1] + value[4:]
    lines[newest] = json.dumps(head, sort_keys=True, separators=(",", ":"))
    witness_file.write_text("\n".join(lines) + "\n")
    code, doc, _ = _verify_cli(
        capsys,
        chain_dir,
        *_key_args(chain_dir),
        "--live",
        "--anchor",
        str(witness_file),
        "--log-id",
        log_id,
    )
    assert code == 1, doc
    assert doc["reason"] in {"anchor_unreadable", "truncated_after_anchor"}, doc


def test_shared_witness_lines_are_counted_and_reported(
    chain_dir: Path, tmp_path: Path, chain: Any, witness_file: Path, capsys: Any
) -> None:
    other = tmp_path / "other-worker"
    for directory in (other, chain_dir):
        sink = _sink(directory, chain, [FileWitness(witness_file)])
        sink.emit(_plain(0))
        sink.close()
    mine = [line for line in witness_file.read_text().splitlines() if Head.parse(line)]
    log_id = json.loads(mine[-1])["log_id"]
    first_mine = next(line for line in mine if json.loads(line)["log_id"] == log_id)
    _append(witness_file, first_mine)  # replayed
    _append(witness_file, '{"epoch":0,"format":"vramcore-audit-he')  # torn, of nobody known
    _append(witness_file, witness_file.read_text().splitlines()[-3])  # the newest again
    code, doc, _ = _verify_cli(
        capsys,
        chain_dir,
        *_key_args(chain_dir),
        "--anchor",
        str(witness_file),
        "--log-id",
        log_id,
    )
    assert code == 0, doc
    report = doc["anchor_report"]
    assert report["replayed"] >= 1 and report["unusable"] == 1 and report["other_logs"] >= 2
    assert any("could not be used" in w for w in doc["warnings"])


# -- 5. costs an attacker controls -----------------------------------------------------------


def test_a_header_claiming_a_huge_epoch_does_not_buy_a_huge_key_search(
    chain_dir: Path, chain: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    chain.write_log(chain_dir, 12, checkpoint_records=5)
    path = _last_file(chain_dir)
    lines = _lines(path)
    index = next(i for i, line in enumerate(lines) if b'"type":"event"' in line)
    head = lines[index][: lines[index].index(b',"prev"')]
    epoch = head[head.rindex(b":") + 1 :]
    lines[index] = lines[index].replace(b'"epoch":' + epoch, b'"epoch":900000', 1)
    path.write_bytes(b"".join(lines))
    calls = {"n": 0}
    real = fmt.evolve_key

    def counting(key: Any) -> Any:
        calls["n"] += 1
        if calls["n"] > 10_000:
            raise AssertionError("the key search follows what a header claims")
        return real(key)

    monkeypatch.setattr(fmt, "evolve_key", counting)
    result = chain.verify(chain_dir)
    assert not result.ok and result.reason in {"mac_mismatch", "wrong_epoch_key"}
    assert calls["n"] < 200


@pytest.mark.slow
def test_a_huge_anchor_file_is_read_in_bounded_memory(
    chain_dir: Path, chain: Any, witness_file: Path
) -> None:
    sink = _sink(chain_dir, chain, [FileWitness(witness_file)])
    sink.emit(_plain(0))
    sink.close()
    newest = witness_file.read_text().splitlines()[-1]
    with witness_file.open("a") as f:
        for _ in range(50_000):
            f.write(newest + "\n")
    anchors = load_anchors([witness_file])
    assert len(anchors) >= 50_000
    assert len(list(anchors)) <= 16  # only the newest few are kept
    assert chain.verify(chain_dir, anchors=anchors).ok


@pytest.mark.slow
def test_no_single_bit_flip_in_the_newest_head_lets_a_cut_log_pass(
    chain_dir: Path, chain: Any, witness_file: Path
) -> None:
    """Before, about a third of single-bit flips in a witness file dropped a head with no
    warning (an unparseable line, a member renamed, a format tag changed): sampled over the
    whole newest head line, every flip now either still shows the cut or fails the verdict."""
    import random

    lines, newest = _cut_after_crash_with_newest_head(chain_dir, chain, witness_file)
    log_id = json.loads(lines[newest])["log_id"]
    key = chain.verify(chain_dir, allow_open=True)  # the log itself is fine
    assert key.ok
    original = ("\n".join(lines) + "\n").encode()
    start = original.rindex(lines[newest].encode())
    rng = random.Random(20)
    positions = rng.sample(range(start, len(original)), 160)
    missed = []
    for pos in positions:
        for bit in (rng.randrange(8),):
            data = bytearray(original)
            data[pos] ^= 1 << bit
            witness_file.write_bytes(bytes(data))
            result = chain.verify(
                chain_dir, allow_open=True, anchors=load_anchors([witness_file]), log_id=log_id
            )
            if result.ok:
                missed.append((pos - start, bit))
    assert not missed, f"flips that left the cut log passing: {missed}"


def test_a_head_signed_by_another_key_cannot_fail_or_fool_the_verifier(
    chain_dir: Path, chain: Any, witness_file: Path, capsys: Any
) -> None:
    """Anyone who may append to a shared witness can sign a head claiming this log's id with
    a key of their own: it is counted as forged and ignored, whether it claims more or less."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    sink = _sink(chain_dir, chain, [FileWitness(witness_file)], durability="immediate")
    for i in range(3):
        sink.emit(_plain(i))
    sink.close()
    genuine = Head.parse(witness_file.read_text().splitlines()[-1])
    assert genuine is not None
    other = Ed25519PrivateKey.generate()
    for seq in (genuine.seq + 50, 1):
        fake = Head.build(
            other.sign,
            log_id=genuine.log_id,
            seq=seq,
            epoch=genuine.epoch,
            mac="0" * 64,
            segment="0" * 64,
            ts=genuine.ts,
            reason="commit",
            public_key=other.public_key().public_bytes_raw().hex(),
        )
        _append(witness_file, fake.to_json())
    code, doc, _ = _verify_cli(
        capsys, chain_dir, *_key_args(chain_dir), "--anchor", str(witness_file)
    )
    assert code == 0, doc
    assert doc["anchor_report"]["forged"] >= 1
    assert any("could not be used" in w for w in doc["warnings"])
    # The writer, too, still finds the genuine newest head and goes on.
    _sink(chain_dir, chain, [FileWitness(witness_file)]).close()
