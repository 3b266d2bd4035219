"""Resuming a chain on start: find the tail, check it, quarantine a torn last line.

Only the part of the log after the last checkpoint is read (plus that checkpoint), so a
restart costs at most one epoch of records, not the whole log. What follows the last complete,
well-formed record (a torn line from a crash, or unparseable trailing lines) is copied to a
``quarantine-*.bin`` file, fsynced, and only then cut from the log; the writer records that in a
``recovery`` record. A complete, well-formed record that does not verify is never cut: that is
tampering or corruption, and the writer refuses to start.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from vramcore.errors import AuditError
from vramcore_audit_chain import _format as fmt
from vramcore_audit_chain._keys import ChainState, write_private_file

__all__ = ["Resume", "quarantine_tail", "recover"]

_CP_MARKER = b'","type":"checkpoint","data":{'


@attrs.define
class Resume:
    """Where the writer continues: the next record's sequence, epoch, key and head."""

    key: bytearray = attrs.field(repr=False)
    epoch: int
    next_seq: int
    head: str
    segment_lines: list[bytes] = attrs.field(repr=False)
    epoch_records: int
    file_index: int
    file_bytes: int
    clean: bool
    state_stale: bool
    cp_seq: int
    cp_mac: str
    #: ``(file index, path, good length, size)`` when bytes after the last record must be
    #: quarantined (done by :func:`quarantine_tail`, once the writer decided to go on).
    cut: tuple[int, Path, int, int] | None
    #: the records read back, for the writer's comparison with its witnesses' heads.
    tail: list[fmt.ParsedLine] = attrs.field(repr=False)
    #: the last record is a ``rotate`` checkpoint: the next record opens the next file.
    rotated: bool = False


def _tail_windows(path: Path, chunk: int) -> Iterator[tuple[int, bytes]]:
    """Yield ``(offset, bytes from offset to end of file)``, each window 4x the last.

    The last window is the whole file (offset 0); callers stop as soon as they have enough.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        while True:
            start = max(0, size - chunk)
            f.seek(start)
            yield start, f.read(size - start)
            if start == 0:
                return
            chunk *= 4


def _tail_from_checkpoint(path: Path) -> tuple[int | None, bytes]:
    """The bytes from the start of the last complete checkpoint line to the end of file.

    Returns ``(None, whole file)`` when the file holds no complete checkpoint line.
    """
    buf = b""
    for start, buf in _tail_windows(path, 1 << 20):
        end = len(buf)
        while True:
            i = buf.rfind(_CP_MARKER, 0, end)
            if i < 0:
                break
            line_start = buf.rfind(b"\n", 0, i) + 1
            if line_start == 0 and start > 0:
                break  # the line may begin before this window: read a larger one
            m = fmt.header_match(buf[line_start : i + len(_CP_MARKER)])
            if (
                m is not None
                and m.group(4) == b"checkpoint"
                and line_start + m.end() == i + len(_CP_MARKER)
                and buf.find(b"\n", i) >= 0
            ):
                return start + line_start, buf[line_start:]
            end = i
    return None, buf


def _last_line(path: Path) -> bytes | None:
    for start, buf in _tail_windows(path, 1 << 16):
        if not buf.endswith(b"\n"):
            return None
        cut = buf.rfind(b"\n", 0, len(buf) - 1)
        if cut >= 0 or start == 0:
            return buf[cut + 1 : -1]
    return None


def _damaged(directory: Path, where: str, why: str) -> AuditError:
    return AuditError(
        f"the audit log in {directory} does not continue cleanly ({where}: {why}); the writer "
        f"refuses to append to it. Run `vramcore audit verify {directory} --key-file ...` "
        "and keep the log for the auditor; point VRAMCORE_AUDIT_LOG at a new directory to go on"
    )


def _mac_ok(key: bytes | bytearray, rec: fmt.ParsedLine) -> bool:
    body = fmt.record_mac_body(rec)
    if body is None:
        return False
    return hmac.compare_digest(hmac.digest(key, body, "sha256").hex().encode(), rec.mac)


def recover(directory: Path, files: list[tuple[int, Path]], state: ChainState) -> Resume:
    """Check the log's tail against the state and prepare to continue it (reads only).

    :raises AuditError: the tail does not verify, or the log is shorter than the state says.
    """
    index, path = files[-1]
    size = path.stat().st_size
    offset, text = _tail_from_checkpoint(path)
    lines_before: list[bytes] = []
    if offset is None and len(files) >= 2:
        prev = _last_line(files[-2][1])
        if prev is None:
            raise _damaged(directory, files[-2][1].name, "the last line is incomplete")
        lines_before = [prev]
    complete = text.rfind(b"\n") + 1
    torn = text[complete:]
    lines = text[:complete].split(b"\n")[:-1]
    garbage: list[bytes] = []
    while lines and fmt.parse_line(lines[-1]) is None:
        garbage.insert(0, lines.pop())
    good_len = size - len(torn) - sum(len(g) + 1 for g in garbage)
    all_lines = lines_before + lines
    if not all_lines:
        raise _damaged(directory, path.name, "no well-formed record to continue from")
    parsed: list[fmt.ParsedLine] = []
    for n, line in enumerate(all_lines):
        rec = fmt.parse_line(line)
        if rec is None:
            raise _damaged(directory, path.name, f"malformed record {n} after the last checkpoint")
        parsed.append(rec)
    first = parsed[0]
    stale = False
    if first.type == fmt.CHECKPOINT:
        key, stale = _key_after_checkpoint(directory, first, state)
        epoch = first.epoch + 1
        cp_seq, cp_mac = first.seq, first.mac.decode("ascii")
    elif first.type == fmt.GENESIS and first.seq == 0 and index == 1 and not lines_before:
        if state.seq != -1 or state.epoch != 0:
            raise _damaged(
                directory,
                path.name,
                f"the state records a checkpoint at seq {state.seq}, the log has none",
            )
        key = bytearray(state.key)
        if not _mac_ok(key, first) or first.epoch != 0 or first.prev != fmt.GENESIS_PREV:
            raise _damaged(directory, path.name, "the genesis record does not verify")
        epoch, cp_seq, cp_mac = 0, -1, fmt.GENESIS_PREV
    else:
        raise _damaged(directory, path.name, "the file does not begin after a checkpoint")
    for before, rec in itertools.pairwise(parsed):
        why = None
        if rec.seq != before.seq + 1:
            why = f"sequence {rec.seq} follows {before.seq}"
        elif rec.prev != before.mac.decode("ascii"):
            why = f"record {rec.seq} does not link to its predecessor"
        elif rec.epoch != epoch or rec.type in (fmt.CHECKPOINT, fmt.GENESIS):
            why = f"record {rec.seq} has the wrong epoch or type"
        elif not _mac_ok(key, rec):
            why = f"record {rec.seq} fails its MAC"
        if why is not None:
            key[:] = bytes(len(key))
            raise _damaged(directory, path.name, why)
    last = parsed[-1]
    reason = json.loads(last.body)["data"].get("reason") if last.type == fmt.CHECKPOINT else None
    return Resume(
        key=key,
        epoch=epoch,
        next_seq=last.seq + 1,
        head=last.mac.decode("ascii"),
        segment_lines=[line + b"\n" for line in all_lines],
        epoch_records=len(parsed) - (1 if first.type == fmt.CHECKPOINT else 0),
        file_index=index,
        file_bytes=good_len,
        clean=reason == "close",
        state_stale=stale,
        cp_seq=cp_seq,
        cp_mac=cp_mac,
        cut=(index, path, good_len, size) if good_len < size else None,
        tail=parsed,
        rotated=reason == "rotate" and bool(lines),
    )


def _key_after_checkpoint(
    directory: Path, cp: fmt.ParsedLine, state: ChainState
) -> tuple[bytearray, bool]:
    """The key of the epoch after ``cp``, from the state (evolved forward if stale)."""
    if state.seq > cp.seq:
        raise _damaged(
            directory,
            "tail",
            f"the state records a checkpoint at seq {state.seq} but the log's last checkpoint "
            f"is at seq {cp.seq}: records were removed",
        )
    if state.seq == cp.seq:
        if state.head != cp.mac.decode("ascii") or state.epoch != cp.epoch + 1:
            raise _damaged(directory, "tail", f"checkpoint {cp.seq} differs from the state's")
        return bytearray(state.key), False
    if state.epoch > cp.epoch:
        raise _damaged(directory, "tail", "the state is ahead of the log's last checkpoint")
    key = bytearray(state.key)
    for _ in range(cp.epoch - state.epoch):
        new = fmt.evolve_key(key)
        key[:] = bytes(len(key))
        key = new
    if not _mac_ok(key, cp):
        raise _damaged(directory, "tail", f"checkpoint {cp.seq} fails its MAC")
    after = fmt.evolve_key(key)
    key[:] = bytes(len(key))
    return after, True


def quarantine_tail(directory: Path, resume: Resume) -> dict[str, Any] | None:
    """Move the bytes after the last record to a quarantine file and cut them from the log.

    :return: the ``recovery`` record's data, or ``None`` when there was nothing to cut.
    """
    if resume.cut is None:
        return None
    index, path, good_len, size = resume.cut
    with path.open("rb") as f:
        f.seek(good_len)
        data = f.read(size - good_len)
    name = f"quarantine-{index:08d}-{time.time_ns()}.bin"
    write_private_file(directory / name, data, replace=False)
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, good_len)
        os.fsync(fd)
    finally:
        os.close(fd)
    return {
        "bytes": len(data),
        "file": path.name,
        "offset": good_len,
        "quarantine_file": name,
        "reason": "incomplete or unreadable data after the last record (unclean shutdown)",
        "sha256": hashlib.sha256(data).hexdigest(),
    }
