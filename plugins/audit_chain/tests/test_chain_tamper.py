"""The tamper matrix: every alteration is detected, with the right reason and place."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from vramcore_audit_chain import _format as fmt
from vramcore_audit_chain import load_key_file, load_public_key, verify_log


def _files(directory: Path) -> list[Path]:
    return [p for _, p in fmt.log_files(directory)]


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _put(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def _event_line_indexes(path: Path) -> list[int]:
    return [i for i, line in enumerate(_lines(path)) if b'"type":"event"' in line]


def _epoch_keys(directory: Path, upto: int) -> list[bytes]:
    keys = [load_key_file(directory / "auditor-initial.key").initial_key]
    while len(keys) <= upto:
        keys.append(bytes(fmt.evolve_key(keys[-1])))
    return keys


def _remac(line: bytes, key: bytes, **changes: Any) -> bytes:
    """Re-seal a line as an attacker holding ``key`` would, after changing header fields."""
    rec = fmt.parse_line(line.rstrip(b"\n"))
    assert rec is not None
    fields = {"seq": rec.seq, "epoch": rec.epoch, "prev": rec.prev, "type": rec.type}
    fields.update(changes)
    data = json.dumps(rec.data(), sort_keys=True, separators=(",", ":"))
    body = fmt.build_body(fields["seq"], fields["epoch"], fields["prev"], fields["type"], data)
    return fmt.build_line(body, key)[0]


@pytest.fixture
def log(make_log: Callable[..., Path]) -> Path:
    # Small checkpoints and files: several epochs and three or more rotated files.
    return make_log(60, checkpoint_records=9, max_bytes=9000)


def test_untouched_log_verifies(log: Path, chain: Any) -> None:
    result = chain.verify(log)
    assert result.ok, result.summary()
    assert result.files >= 3
    assert result.checkpoints >= 6
    assert result.epochs == result.checkpoints  # every checkpoint closes one epoch
    assert result.closed


@pytest.mark.slow
def test_every_bit_flip_of_several_records_is_detected(
    make_log: Callable[..., Path], tmp_path: Path
) -> None:
    log = make_log(12, checkpoint_records=5)
    key = load_key_file(log / "auditor-initial.key").initial_key
    first = _files(log)[0]
    original = first.read_bytes()
    lines = _lines(first)
    # the genesis, an event, a checkpoint and the open record
    targets = [0, _event_line_indexes(first)[2]]
    targets += [i for i, ln in enumerate(lines) if b'"type":"checkpoint"' in ln][:1]
    targets += [i for i, ln in enumerate(lines) if b'"type":"open"' in ln][:1]
    assert len(set(targets)) == 4
    work = tmp_path / "flip"
    shutil.copytree(log, work)
    target_file = work / first.name
    checked = 0
    for index in targets:
        start = sum(len(line) for line in lines[:index])
        for byte in range(start, start + len(lines[index])):
            for bit in range(8):
                data = bytearray(original)
                data[byte] ^= 1 << bit
                target_file.write_bytes(data)
                result = verify_log([work], initial_key=key)
                assert not result.ok, (index, byte, bit)
                # A checkpoint's MAC leaves out its signature, which the signature check
                # covers instead (so the public key authenticates the MAC: FORMAT.md).
                assert result.reason in {
                    "mac_mismatch", "malformed", "bad_genesis", "checkpoint_signature_invalid"
                }, (
                    index, byte - start, bit, result.summary()
                )  # fmt: skip
                assert result.file == str(target_file)
                assert result.line == index + 1, (index, byte - start, bit, result.summary())
                checked += 1
    assert checked > 4 * 8 * 140


def test_deleted_record_is_a_sequence_gap(log: Path, chain: Any) -> None:
    path = _files(log)[1]
    lines = _lines(path)
    index = _event_line_indexes(path)[1]
    expected_seq = fmt.parse_line(lines[index + 1].rstrip(b"\n")).seq  # type: ignore[union-attr]
    del lines[index]
    _put(path, lines)
    result = chain.verify(log)
    assert (result.reason, result.line, result.seq) == ("sequence_gap", index + 1, expected_seq)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_deleting_the_last_records_is_a_truncated_tail(log: Path, chain: Any, n: int) -> None:
    path = _files(log)[-1]
    lines = _lines(path)
    assert len(lines) > n
    _put(path, lines[:-n])
    result = chain.verify(log)
    assert result.reason == "truncated_tail"
    assert "closing checkpoint" in result.detail


def test_deleting_the_last_records_is_caught_with_the_public_key_too(log: Path) -> None:
    path = _files(log)[-1]
    _put(path, _lines(path)[:-2])
    result = verify_log([log], public_key=load_public_key((log / "checkpoint.pub").read_text()))
    assert (result.mode, result.reason) == ("public-key", "truncated_tail")


def test_swapped_records_are_reordered(log: Path, chain: Any) -> None:
    path = _files(log)[1]
    lines = _lines(path)
    a = _event_line_indexes(path)[0]
    assert b'"type":"event"' in lines[a + 1]
    lines[a], lines[a + 1] = lines[a + 1], lines[a]
    _put(path, lines)
    result = chain.verify(log)
    assert (result.reason, result.line) == ("reordered", a + 1)


def test_duplicated_record_is_a_duplicate(log: Path, chain: Any) -> None:
    path = _files(log)[0]
    lines = _lines(path)
    a = _event_line_indexes(path)[3]
    lines.insert(a + 1, lines[a])
    _put(path, lines)
    result = chain.verify(log)
    assert (result.reason, result.line) == ("duplicate", a + 2)


def test_inserted_forged_record_is_a_mac_mismatch(log: Path, chain: Any) -> None:
    path = _files(log)[0]
    lines = _lines(path)
    a = _event_line_indexes(path)[2]
    rec = fmt.parse_line(lines[a].rstrip(b"\n"))
    assert rec is not None
    forged_data = json.dumps({**rec.data(), "shard_id": "forged"}, sort_keys=True)
    body = fmt.build_body(rec.seq + 1, rec.epoch, rec.mac.decode(), "event", forged_data)
    lines.insert(a + 1, fmt.build_line(body, b"\x00" * 32)[0])
    _put(path, lines)
    result = chain.verify(log)
    assert (result.reason, result.line) == ("mac_mismatch", a + 2)


def test_records_spliced_from_another_log_are_a_mac_mismatch(
    log: Path, make_log: Callable[..., Path], chain: Any
) -> None:
    # Same worker token, same settings: only the setup nonce differs.
    other = make_log(60, checkpoint_records=9, max_bytes=9000)
    path, other_path = _files(log)[0], _files(other)[0]
    lines, other_lines = _lines(path), _lines(other_path)
    a = _event_line_indexes(path)[2]
    lines[a] = other_lines[a]
    _put(path, lines)
    result = chain.verify(log)
    assert (result.reason, result.line) == ("mac_mismatch", a + 1)


def test_old_record_remaced_with_a_later_epoch_key_is_rejected(log: Path, chain: Any) -> None:
    # An attacker who holds today's key (epoch 4) rewrites a record of epoch 0.
    path = _files(log)[0]
    lines = _lines(path)
    a = _event_line_indexes(path)[0]
    assert b'"epoch":0,' in lines[a]
    keys = _epoch_keys(log, 4)
    lines[a] = _remac(lines[a], keys[4])
    _put(path, lines)
    result = chain.verify(log)
    assert (result.reason, result.line) == ("wrong_epoch_key", a + 1)
    assert "epoch 4" in result.detail


def test_old_record_moved_into_a_later_epoch_is_rejected(log: Path, chain: Any) -> None:
    path = _files(log)[0]
    lines = _lines(path)
    a = _event_line_indexes(path)[0]
    keys = _epoch_keys(log, 4)
    lines[a] = _remac(lines[a], keys[4], epoch=4)
    _put(path, lines)
    result = chain.verify(log)
    assert (result.reason, result.line) == ("wrong_epoch_key", a + 1)


def test_relinked_record_with_the_right_key_is_a_broken_link(log: Path, chain: Any) -> None:
    path = _files(log)[0]
    lines = _lines(path)
    a = _event_line_indexes(path)[0]
    keys = _epoch_keys(log, 0)
    lines[a] = _remac(lines[a], keys[0], prev="1" * 64)
    _put(path, lines)
    result = chain.verify(log)
    assert (result.reason, result.line) == ("broken_link", a + 1)


def test_change_in_a_rotated_file_is_found_in_that_file(log: Path, chain: Any) -> None:
    path = _files(log)[1]
    lines = _lines(path)
    a = _event_line_indexes(path)[-1]
    lines[a] = lines[a].replace(b'"nbytes":4096', b'"nbytes":4097')
    _put(path, lines)
    result = chain.verify(log)
    assert (result.reason, result.file, result.line) == ("mac_mismatch", str(path), a + 1)


def test_change_before_a_checkpoint_is_caught_with_only_the_public_key(log: Path) -> None:
    path = _files(log)[1]
    lines = _lines(path)
    a = _event_line_indexes(path)[0]
    lines[a] = lines[a].replace(b'"nbytes":4096', b'"nbytes":4097')
    _put(path, lines)
    result = verify_log([log], public_key=load_public_key(str(log / "checkpoint.pub")))
    assert result.reason == "checkpoint_mismatch"
    assert "segment" in result.detail


def test_dropped_rotated_file_is_a_sequence_gap(log: Path, chain: Any) -> None:
    files = _files(log)
    files[1].unlink()
    result = chain.verify(log)
    assert (result.reason, result.file, result.line) == ("sequence_gap", str(files[2]), 1)
    assert "rotated file" in result.detail


def test_dropped_last_file_is_a_truncated_tail(log: Path, chain: Any) -> None:
    _files(log)[-1].unlink()
    assert chain.verify(log).reason == "truncated_tail"


def test_dropped_first_file_is_detected(log: Path, chain: Any) -> None:
    _files(log)[0].unlink()
    assert chain.verify(log).reason == "sequence_gap"


def test_bad_checkpoint_signature_is_reported_as_such(log: Path, chain: Any) -> None:
    # Even an attacker with the epoch key cannot sign; the MAC leaves the signature out, so
    # a changed signature alone is what is reported.
    path = _files(log)[0]
    lines = _lines(path)
    c = next(i for i, ln in enumerate(lines) if b'"type":"checkpoint"' in ln)
    rec = fmt.parse_line(lines[c].rstrip(b"\n"))
    assert rec is not None
    sig = rec.data()["sig"]
    lines[c] = lines[c].replace(
        sig.encode(), (("00" if sig[:2] != "00" else "11") + sig[2:]).encode()
    )
    _put(path, lines)
    result = chain.verify(log)
    assert (result.reason, result.line) == ("checkpoint_signature_invalid", c + 1)


def test_the_wrong_key_file_is_named(log: Path, make_log: Callable[..., Path]) -> None:
    other = make_log(5)
    key = load_key_file(other / "auditor-initial.key")
    result = verify_log([log], initial_key=key.initial_key, expected_log_id=key.log_id)
    assert result.reason == "wrong_key"


def test_public_key_of_another_worker_is_refused(
    log: Path, make_log: Callable[..., Path], chain: Any
) -> None:
    other = make_log(5, token="Ytc0jvpOnSRU9BouS99gGV1gtfaeitg4L4cOLMzFLuc")
    result = verify_log([log], public_key=load_public_key(str(other / "checkpoint.pub")))
    assert result.reason == "wrong_key"
    assert verify_log([log], public_key=load_public_key(str(log / "checkpoint.pub"))).ok
