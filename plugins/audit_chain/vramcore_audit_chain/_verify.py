"""The offline verifier: prove a log intact, or name the first bad record and why.

Two modes. **Full** (the auditor's initial key): every record's MAC under its epoch key, the
sequence, the links, the epoch rule, every checkpoint. **Public-key** (only the Ed25519 public
key): the sequence, links and epoch rule as written, and every checkpoint's signature and
segment hash, which authenticates every record up to the last checkpoint.

The log must end with a ``close`` checkpoint unless ``allow_open`` (a log being written).
"""

from __future__ import annotations

import _hashlib
import hashlib
import hmac
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from vramcore.errors import ConfigError
from vramcore_audit_chain import _format as fmt
from vramcore_audit_chain._keys import public_key_hex

__all__ = ["REASONS", "VerifyResult", "collect_log_files", "verify_log"]

#: Every failure reason the verifier reports, with what it means.
REASONS: dict[str, str] = {
    "malformed": "a line is not a well-formed record",
    "mac_mismatch": "a record's MAC does not verify: it was altered or forged",
    "wrong_epoch_key": "a record is MACed with, or claims, another epoch's key",
    "sequence_gap": "records are missing",
    "reordered": "records are out of order",
    "duplicate": "a record appears twice",
    "broken_link": "a record does not link to the MAC of its predecessor",
    "bad_genesis": "the log does not begin with a valid genesis record",
    "checkpoint_signature_invalid": "a checkpoint's Ed25519 signature does not verify",
    "checkpoint_mismatch": "a checkpoint disagrees with the records it covers",
    "truncated_tail": "the log ends without its closing checkpoint: records after it are missing",
    "torn_line": "the last line is incomplete (crash not yet recovered)",
    "wrong_key": "the key given belongs to another log",
}

_HEX = b"0123456789abcdef"
_SUFFIX = b'},"mac":"'
_PREFIX = b'{"seq":%d,"epoch":%d,"prev":"%b","type":"event","data":{'
_hmac_digest: Callable[[bytes, bytes, str], bytes] = getattr(
    _hashlib, "hmac_digest", hmac.digest
)  # the C function itself saves the hmac module's Python wrapper on the hot path
_MAX_EPOCH_SEARCH = 100_000


@attrs.frozen(kw_only=True)
class VerifyResult:
    """The verdict on a log.

    :attr ok: the log is intact.
    :attr mode: ``"full"`` or ``"public-key"``.
    :attr reason: on failure, one of :data:`REASONS`; ``file``, ``line`` (1-based) and ``seq``
        locate the first bad record.
    :attr uncovered: records after the last checkpoint (only with ``allow_open``).
    """

    ok: bool
    mode: str
    reason: str | None = None
    detail: str = ""
    file: str | None = None
    line: int | None = None
    seq: int | None = None
    records: int = 0
    files: int = 0
    checkpoints: int = 0
    epochs: int = 0
    sessions: int = 0
    recoveries: int = 0
    log_id: str | None = None
    closed: bool = False
    uncovered: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return attrs.asdict(self)

    def summary(self) -> str:
        """One or two lines for humans."""
        if self.ok:
            state = "closed" if self.closed else f"open, {self.uncovered} records not yet covered"
            return (
                f"OK ({self.mode}): {self.records} records in {self.files} file(s), "
                f"{self.checkpoints} checkpoints, {self.epochs} epochs, {self.sessions} "
                f"session(s), {self.recoveries} recovery(ies); {state}; log {self.log_id}"
            )
        where = f"{self.file}:{self.line}" if self.file else "log"
        seq = f" (seq {self.seq})" if self.seq is not None else ""
        return f"FAILED ({self.mode}): {self.reason} at {where}{seq}: {self.detail}"


class _Fail(Exception):
    def __init__(self, reason: str, detail: str, seq: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail
        self.seq = seq


def collect_log_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand directories to their log files; order files by their index.

    :raises ConfigError: a path does not exist, or no log file was found.
    """
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out.extend(p for _, p in fmt.log_files(path))
        elif path.is_file():
            out.append(path)
        else:
            raise ConfigError(f"{path}: no such file or directory")
    if not out:
        raise ConfigError("no audit log files (audit-*.ndjson) found in the given paths")
    if all(fmt.LOG_PATTERN.fullmatch(p.name) for p in out):
        out.sort(key=lambda p: int(p.name[6:14]))
    return out


def verify_log(
    paths: Iterable[str | Path],
    *,
    initial_key: bytes | None = None,
    public_key: Ed25519PublicKey | None = None,
    expected_log_id: str | None = None,
    allow_open: bool = False,
) -> VerifyResult:
    """Verify the log in ``paths`` (files or directories).

    :param initial_key: the epoch-0 key (full mode).
    :param public_key: the checkpoint key; alone it selects public-key mode. In full mode the
        key named by the (MAC-verified) genesis record is used and must match this one if given.
    :param expected_log_id: the log the key file was made for (from the key file).
    :param allow_open: accept a log without its closing checkpoint and a torn last line.
    :raises ConfigError: no key given, or no log files found.
    """
    if initial_key is None and public_key is None:
        raise ConfigError("give the auditor's initial key (full) or the public key (checkpoints)")
    files = collect_log_files(paths)
    v = _Verifier(files, initial_key, public_key, expected_log_id, allow_open)
    return v.run()


class _Verifier:
    def __init__(
        self,
        files: Sequence[Path],
        initial_key: bytes | None,
        public_key: Ed25519PublicKey | None,
        expected_log_id: str | None,
        allow_open: bool,
    ) -> None:
        self.files = files
        self.full = initial_key is not None
        self.keys: list[bytes] = [bytes(initial_key)] if initial_key is not None else []
        self.given_public = public_key
        self.public: Ed25519PublicKey | None = public_key
        self.expected_log_id = expected_log_id
        self.allow_open = allow_open
        self.log_id: str | None = None
        self.records = 0
        self.checkpoints = 0
        self.sessions = 0
        self.recoveries = 0
        self.max_epoch = 0
        self.last_type = ""
        self.last_reason = ""
        self.last_cp_seq = -1
        self.file_index = 0
        self.line_no = 0

    def _result(self, ok: bool, fail: _Fail | None = None) -> VerifyResult:
        common: dict[str, Any] = {
            "mode": "full" if self.full else "public-key",
            "records": self.records,
            "files": len(self.files),
            "checkpoints": self.checkpoints,
            "epochs": self.max_epoch + 1 if self.records else 0,
            "sessions": self.sessions,
            "recoveries": self.recoveries,
            "log_id": self.log_id,
            "closed": self.last_type == fmt.CHECKPOINT and self.last_reason == "close",
        }
        if ok:
            return VerifyResult(ok=True, uncovered=self.records - 1 - self.last_cp_seq, **common)
        assert fail is not None
        return VerifyResult(
            ok=False,
            reason=fail.reason,
            detail=fail.detail,
            file=str(self.files[self.file_index]),
            line=self.line_no,
            seq=fail.seq,
            **common,
        )

    def run(self) -> VerifyResult:
        try:
            self._run()
        except _Fail as fail:
            return self._result(False, fail)
        return self._result(True)

    # The loop below is the hot path (hundreds of thousands of records per second): it
    # inlines the line parsing and touches the data object only for rare record types.
    def _run(self) -> None:
        expected = 0
        expected_epoch = 0
        prev_mac = fmt.GENESIS_PREV.encode("ascii")
        header = fmt._HEADER
        full = self.full
        keys = self.keys
        digest = _hmac_digest
        compare = hmac.compare_digest
        seg = hashlib.sha256()
        records = 0
        last_type = ""
        # The exact start of the next record if it is an event where the chain expects one.
        prefix = b"\x00"
        mac_now: Any = fmt.mac_context(keys[0]) if full else None
        for fi, path in enumerate(self.files):
            self.file_index = fi
            self.line_no = 0
            data = path.read_bytes()
            end = len(data)
            torn = bool(data) and not data.endswith(b"\n")
            if torn:
                end = data.rfind(b"\n") + 1
            view = memoryview(data)
            seg_start = 0
            off = 0
            lines = data[:end].split(b"\n")
            lines.pop()
            for lineno, line in enumerate(lines, 1):
                if line.startswith(prefix) and line[-75:-66] == _SUFFIX and line[-2:] == b'"}':
                    mac = line[-66:-2]
                    if full:
                        ctx = mac_now.copy()
                        ctx.update(line[:-74] + b"}")
                        good = compare(ctx.hexdigest().encode(), mac)
                    else:
                        good = not mac.strip(_HEX)
                    if good:
                        prev_mac = mac
                        expected += 1
                        records += 1
                        last_type = "event"
                        off += len(line) + 1
                        prefix = _PREFIX % (expected, expected_epoch, prev_mac)
                        continue
                self.records = records
                self.last_type = last_type
                n = len(line)
                if n < 140 or line[-75:-66] != b'},"mac":"' or line[-2:] != b'"}':
                    self.line_no = lineno
                    raise _Fail("malformed", "not a record line", expected)
                m = header.match(line)
                if m is None:
                    self.line_no = lineno
                    raise _Fail("malformed", "the record header is malformed", expected)
                mac = line[-66:-2]
                body = line[:-74] + b"}"
                seq = int(m[1])
                epoch = int(m[2])
                if full:
                    key = keys[epoch] if epoch < len(keys) else self._key(epoch, expected_epoch)
                    if key is None or not compare(digest(key, body, "sha256").hex().encode(), mac):
                        self.line_no = lineno
                        self._bad_mac(body, mac, seq, epoch)
                elif mac.strip(_HEX):
                    self.line_no = lineno
                    raise _Fail("malformed", "the MAC is not lowercase hex", seq)
                if seq != expected:
                    self.line_no = lineno
                    self._bad_seq(seq, expected, mac == prev_mac, fi, lineno)
                if epoch != expected_epoch:
                    self.line_no = lineno
                    raise _Fail(
                        "wrong_epoch_key",
                        f"record is in epoch {epoch}; the chain requires epoch {expected_epoch}",
                        seq,
                    )
                if m[3] != prev_mac:
                    self.line_no = lineno
                    raise _Fail("broken_link", "prev is not the MAC of the previous record", seq)
                rtype = m[4]
                if seq == 0 and rtype != b"genesis":
                    self.line_no = lineno
                    raise _Fail("bad_genesis", "the first record is not a genesis record", seq)
                if rtype != b"event":
                    self.line_no = lineno
                    if rtype == b"checkpoint":
                        seg.update(view[seg_start:off])
                        self._checkpoint(body, seq, epoch, prev_mac, seg.hexdigest())
                        seg = hashlib.sha256()
                        seg_start = off
                        expected_epoch = epoch + 1
                    else:
                        self._special(rtype.decode("ascii"), body, seq)
                last_type = rtype.decode("ascii")
                prev_mac = mac
                expected = seq + 1
                records += 1
                off += n + 1
                prefix = _PREFIX % (expected, expected_epoch, prev_mac)
                if full:
                    mac_now = fmt.mac_context(self._key(expected_epoch, expected_epoch) or b"-")
            seg.update(view[seg_start:end])
            self.line_no = len(lines)
            self.records = records
            self.last_type = last_type
            if torn and not (fi == len(self.files) - 1 and self.allow_open):
                self.line_no += 1
                reason = "torn_line" if fi == len(self.files) - 1 else "malformed"
                raise _Fail(reason, "the file ends inside a line (no newline)", expected)
        self.max_epoch = expected_epoch - (1 if last_type == fmt.CHECKPOINT else 0)
        self.line_no = max(self.line_no, 1)
        if self.records == 0:
            raise _Fail("bad_genesis", "the log holds no records", 0)
        closed = self.last_type == fmt.CHECKPOINT and self.last_reason == "close"
        if not closed and not self.allow_open:
            raise _Fail(
                "truncated_tail",
                f"the log ends at seq {expected - 1} without its closing checkpoint (last "
                f"checkpoint: seq {self.last_cp_seq}); records after it were removed, or the "
                "writer is still running or crashed (starting it once recovers the log)",
                expected - 1,
            )

    def _key(self, epoch: int, expected_epoch: int) -> bytes | None:
        if epoch > expected_epoch + 1:
            return None
        while len(self.keys) <= epoch:
            self.keys.append(bytes(fmt.evolve_key(self.keys[-1])))
        return self.keys[epoch]

    def _bad_mac(self, body: bytes, mac: bytes, seq: int, epoch: int) -> None:
        if seq == 0 and self.expected_log_id is not None and self.records == 0:
            try:
                log_id = json.loads(body)["data"]["log_id"]
            except (ValueError, KeyError, TypeError):
                log_id = None
            if log_id is not None and log_id != self.expected_log_id:
                raise _Fail(
                    "wrong_key",
                    f"the key file is for log {self.expected_log_id}, this log is {log_id}",
                    seq,
                )
        limit = min(self._highest_epoch(), len(self.keys) + _MAX_EPOCH_SEARCH)
        if epoch <= limit:
            own = self._key(epoch, epoch)
            if own is not None and hmac.compare_digest(
                hmac.digest(own, body, "sha256").hex().encode(), mac
            ):
                return  # authentic, but not where the chain expects it: the caller says why
        for other in range(limit + 1):
            if other == epoch:
                continue
            key = self._key(other, other)
            if key is not None and hmac.compare_digest(
                hmac.digest(key, body, "sha256").hex().encode(), mac
            ):
                raise _Fail(
                    "wrong_epoch_key",
                    f"record claims epoch {epoch} but is MACed with the key of epoch {other}",
                    seq,
                )
        raise _Fail("mac_mismatch", "the record was altered or forged", seq)

    def _highest_epoch(self) -> int:
        highest = 0
        for path in self.files:
            for m in fmt._HEADER.finditer(path.read_bytes()):
                highest = max(highest, int(m[2]))
        return highest

    def _bad_seq(self, seq: int, expected: int, same_mac: bool, fi: int, lineno: int) -> None:
        if seq == expected - 1 and same_mac:
            raise _Fail("duplicate", f"record {seq} appears twice", seq)
        if seq < expected:
            raise _Fail("reordered", f"record {seq} appears after record {expected - 1}", seq)
        if self._seq_appears_later(expected, fi, lineno):
            raise _Fail("reordered", f"record {seq} appears where record {expected} belongs", seq)
        note = ""
        if lineno == 1:
            note = " (at the start of this file: a rotated file may be missing)"
        raise _Fail("sequence_gap", f"records {expected}..{seq - 1} are missing{note}", seq)

    def _seq_appears_later(self, wanted: int, fi: int, lineno: int) -> bool:
        for index in range(fi, len(self.files)):
            lines = self.files[index].read_bytes().split(b"\n")
            if index == fi:
                lines = lines[lineno:]
            for line in lines:
                m = fmt._HEADER.match(line)
                if m is not None and int(m[1]) == wanted:
                    return True
        return False

    def _data(self, body: bytes, seq: int) -> dict[str, Any]:
        try:
            data = json.loads(body)["data"]
        except (ValueError, KeyError, TypeError):
            raise _Fail("malformed", "the record's JSON is malformed", seq) from None
        if not isinstance(data, dict):
            raise _Fail("malformed", "the record's data is not an object", seq)
        return data

    def _special(self, rtype: str, body: bytes, seq: int) -> None:
        if rtype == fmt.GENESIS:
            self._genesis(body, seq)
        elif seq == 0:
            raise _Fail("bad_genesis", "the first record is not a genesis record", seq)
        elif rtype == fmt.OPEN:
            self.sessions += 1
        elif rtype == fmt.RECOVERY:
            self.recoveries += 1
        else:
            raise _Fail("malformed", f"unknown record type {rtype!r}", seq)

    def _genesis(self, body: bytes, seq: int) -> None:
        if seq != 0:
            raise _Fail("bad_genesis", "a genesis record in the middle of the log", seq)
        data = self._data(body, seq)
        if data.get("format") != fmt.FORMAT:
            raise _Fail("bad_genesis", f"unknown format {str(data.get('format'))[:40]!r}", seq)
        self.log_id = str(data.get("log_id"))
        if self.expected_log_id is not None and self.log_id != self.expected_log_id:
            raise _Fail("wrong_key", f"the key file is for log {self.expected_log_id}", seq)
        named = str(data.get("public_key", ""))
        if self.given_public is not None and public_key_hex(self.given_public) != named:
            raise _Fail("wrong_key", "the log's genesis names another checkpoint public key", seq)
        if self.public is None:
            try:
                self.public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(named))
            except ValueError:
                raise _Fail("bad_genesis", "the genesis public key is malformed", seq) from None

    def _checkpoint(self, body: bytes, seq: int, epoch: int, prev: bytes, segment: str) -> None:
        if seq == 0:
            raise _Fail("bad_genesis", "the first record is not a genesis record", seq)
        data = self._data(body, seq)
        try:
            fields = {
                "epoch": epoch,
                "head": str(data["head"]),
                "log_id": str(data["log_id"]),
                "reason": str(data["reason"]),
                "records": int(data["records"]),
                "segment": str(data["segment"]),
                "seq": seq,
                "ts": str(data["ts"]),
            }
            sig = bytes.fromhex(str(data["sig"]))
        except (KeyError, ValueError, TypeError):
            raise _Fail("malformed", "the checkpoint lacks a field", seq) from None
        assert self.public is not None  # set by the genesis record, which came first
        try:
            self.public.verify(sig, fmt.checkpoint_message(fields))
        except InvalidSignature:
            raise _Fail(
                "checkpoint_signature_invalid", "the checkpoint signature does not verify", seq
            ) from None
        if fields["records"] != seq or fields["head"] != prev.decode("ascii"):
            raise _Fail("checkpoint_mismatch", "count or head differs from the chain", seq)
        if fields["log_id"] != self.log_id or fields["reason"] not in fmt.CHECKPOINT_REASONS:
            raise _Fail("checkpoint_mismatch", "log id or reason is wrong", seq)
        if fields["segment"] != segment:
            raise _Fail(
                "checkpoint_mismatch",
                f"a record between checkpoint {self.last_cp_seq} and this one was altered "
                "(segment hash differs)",
                seq,
            )
        self.checkpoints += 1
        self.last_cp_seq = seq
        self.last_reason = fields["reason"]
