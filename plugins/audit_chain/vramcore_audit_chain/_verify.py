"""The offline verifier: prove a log intact, or name the first bad record and why.

Two modes. **Full** (the auditor's initial key): every record's MAC under its epoch key, the
sequence, the links, the epoch rule, every checkpoint. **Public-key** (only the Ed25519 public
key): the sequence, links and epoch rule as written, and every checkpoint's signature and
segment hash, which authenticates every record up to the last checkpoint.

The log must end with a ``close`` checkpoint unless ``allow_open`` (a log being written).
Anchors (witness heads, saved checkpoints) are records the log must still contain and extend.
Files are streamed in chunks: memory stays bounded (a few MiB) whatever their size.
"""

from __future__ import annotations

import _hashlib
import bisect
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from vramcore.errors import ConfigError
from vramcore_audit_chain import _format as fmt
from vramcore_audit_chain._head import Anchor, AnchorSet
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
    "wrong_log": "the log is not the one named by --log-id, or no anchor given is for it",
    "file_boundary": "a file does not end with its rotate checkpoint, or records were moved "
    "between files",
    "quarantine_missing": "a quarantine file named by a recovery record is missing",
    "quarantine_mismatch": "a quarantine file differs from the SHA-256 its recovery record holds",
    "rolled_back": "the log holds another record where an anchor (a witness's head or a saved "
    "checkpoint) says, or looks complete but ends before it: history was rolled back",
    "truncated_after_anchor": "the log ends before an anchor: records a witness saw were cut "
    "from its tail",
    "anchor_mismatch": "the records up to an anchor differ from what its signed segment hash "
    "says: records since the last checkpoint were altered",
    "anchor_unreadable": "the last thing an anchor file holds about this log is torn, corrupted "
    "or not signed by it: the head it held, which the verdict needs, cannot be read",
}

_HEX = b"0123456789abcdef"
_SUFFIX = b'},"mac":"'
_PREFIX = b'{"seq":%d,"epoch":%d,"prev":"%b","type":"event","data":{'
_hmac_digest: Callable[[bytes, bytes, str], bytes] = getattr(
    _hashlib, "hmac_digest", hmac.digest
)  # the C function itself saves the hmac module's Python wrapper on the hot path
#: How many epochs past the last one the log or an anchor shows the verifier tries, looking
#: for the key a bad MAC was made with (epochs whose records were deleted too).
EPOCH_SEARCH_MARGIN = 64
_CHUNK = 1 << 20
_QUARANTINE_NAME = re.compile(r"quarantine-[0-9]{8}-[0-9]{1,20}\.bin")


@attrs.frozen(kw_only=True)
class VerifyResult:
    """The verdict on a log.

    :attr ok: the log is intact.
    :attr mode: ``"full"`` or ``"public-key"``.
    :attr reason: on failure, one of :data:`REASONS`; ``file``, ``line`` (1-based) and ``seq``
        locate the first bad record.
    :attr uncovered: records after the last checkpoint (only with ``allow_open``).
    :attr first_seq: the first record verified (0 unless files after the first were given
        alone: they verify from the rotate checkpoint that precedes them).
    :attr partial: only part of the log was verified (see ``first_seq``; or the last file
        given ends with a rotate checkpoint and the log goes on in the next).
    :attr anchors: how many anchors the log was checked against (it reaches all of them).
    :attr head: the MAC of the last record (with ``log_id`` and ``records``, a head to keep).
    :attr authenticated_through: the last record whose bytes are authenticated: every record in
        full mode; in public-key mode the last checkpoint, or a later anchor (a signed head
        whose segment hash covers the records since that checkpoint).
    :attr unauthenticated: records after ``authenticated_through`` (public-key mode only: they
        are checked for form only, and anyone could have written them).
    :attr anchor_report: what the anchor files held about this log: anchors ``found``,
        ``replayed`` older heads, ``forged`` heads this log did not sign, ``other_logs``
        (anchors of other logs), ``unusable`` lines (over all files).
    :attr warnings: things an auditor must know that do not make the log fail.
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
    first_seq: int = 0
    partial: bool = False
    anchors: int = 0
    head: str | None = None
    authenticated_through: int = -1
    unauthenticated: int = 0
    anchor_report: dict[str, int] = attrs.field(factory=dict)
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return attrs.asdict(self)

    def summary(self) -> str:
        """One or two lines for humans."""
        if self.ok:
            state = "closed" if self.closed else f"open, {self.uncovered} records not yet covered"
            if self.partial:
                state = (
                    f"records {self.first_seq}..{self.first_seq + self.records - 1} of the log"
                    + ("" if self.closed else ", continued in the next file")
                )
            if self.anchors:
                state += f"; reaches its newest anchor (of {self.anchors})"
            text = (
                f"OK ({self.mode}): {self.records} records in {self.files} file(s), "
                f"{self.checkpoints} checkpoints, {self.epochs} epochs, {self.sessions} "
                f"session(s), {self.recoveries} recovery(ies); {state}; log {self.log_id}"
            )
            return "\n".join([text, *(f"WARNING: {w}" for w in self.warnings)])
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
    return _collect(paths)[0]


def _collect(paths: Iterable[str | Path]) -> tuple[list[Path], bool]:
    """The log files, and whether every path named a file (a chosen subset of a log)."""
    out: list[Path] = []
    explicit = True
    for raw in paths:
        path = Path(raw)
        try:
            is_dir = path.is_dir()
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
        if is_dir:
            explicit = False
            out.extend(p for _, p in fmt.log_files(path))
        elif path.exists() or path.is_symlink():
            out.append(path)  # anything but a regular file is refused when it is opened
        else:
            raise ConfigError(f"{path}: no such file or directory")
    if not out:
        raise ConfigError("no audit log files (audit-*.ndjson) found in the given paths")
    if all(fmt.LOG_PATTERN.fullmatch(p.name) for p in out):
        out.sort(key=lambda p: int(p.name[6:14]))
    return out, explicit


def verify_log(
    paths: Iterable[str | Path],
    *,
    initial_key: bytes | None = None,
    public_key: Ed25519PublicKey | None = None,
    expected_log_id: str | None = None,
    allow_open: bool = False,
    anchors: AnchorSet | Sequence[Anchor] = (),
    log_id: str | None = None,
) -> VerifyResult:
    """Verify the log in ``paths`` (files or directories).

    Files given one by one may be a part of a log: the first one then verifies from the
    rotate checkpoint at the end of the file before it (which must sit next to it).

    :param initial_key: the epoch-0 key (full mode).
    :param public_key: the checkpoint key; alone it selects public-key mode. In full mode the
        key named by the (MAC-verified) genesis record is used and must match this one if given.
    :param expected_log_id: the log the key file was made for (from the key file).
    :param allow_open: accept a log without its closing checkpoint and a torn last line.
    :param anchors: records the log must contain and extend (:func:`load_anchors`); those of
        other logs are ignored.
    :param log_id: the log this must be (``wrong_log`` otherwise); required when the anchors
        name more than one log.
    :raises ConfigError: no key given, no log files found, a file that cannot be read or is
        not a regular file (the message names it), anchors of several logs without ``log_id``.
    """
    if initial_key is None and public_key is None:
        raise ConfigError("give the auditor's initial key (full) or the public key (checkpoints)")
    if log_id is not None and not re.fullmatch(r"[0-9a-f]{32}", log_id):
        raise ConfigError("--log-id must be a log id: 32 lowercase hex digits")
    named = anchors.log_ids if isinstance(anchors, AnchorSet) else {a.log_id for a in anchors}
    if log_id is None and len(named) > 1:
        raise ConfigError(
            f"the anchors name {len(named)} different logs; say which one this is with "
            "--log-id (its genesis log_id, from the witness or the key file)"
        )
    files, explicit = _collect(paths)
    for path in files:  # refuse a device, a FIFO or an unreadable file before reading anything
        with fmt.open_regular(path):
            pass
    v = _Verifier(files, initial_key, public_key, expected_log_id, allow_open)
    v.explicit = explicit
    v.pinned_log_id = log_id
    v.anchor_set = anchors if isinstance(anchors, AnchorSet) else None
    v.all_anchors = [] if isinstance(anchors, AnchorSet) else list(anchors)
    v.anchor_names = named
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
        self.explicit = False
        self.pinned_log_id: str | None = None
        self.all_anchors: list[Anchor] = []
        self.anchor_set: AnchorSet | None = None
        self.anchor_names: set[str] = set()
        self.anchor_report: dict[str, int] = {}
        self.anchor_bad: list[str] = []
        self.anchor_found = 0
        self.checked_anchor_sigs: dict[int, bool] = {}
        # anchors after the last checkpoint whose records matched: the newest signed one
        # authenticates those records in public-key mode
        self.tail_anchors: list[Anchor] = []
        self.anchor_at: dict[int, list[Anchor]] = {}
        self.anchor_seqs: list[int] = []
        self.anchors_checked = 0
        self.log_id: str | None = None
        self.records = 0
        self.checkpoints = 0
        self.sessions = 0
        self.recoveries = 0
        self.max_epoch = 0
        self.last_type = ""
        self.last_reason = ""
        self.last_cp_seq = -1
        self.first_seq = 0
        self.start_epoch = 0
        self.started_late = False
        self.highest_epoch: int | None = None
        self.file_index = 0
        self.line_no = 0
        self.head: str | None = None

    def _result(self, ok: bool, fail: _Fail | None = None) -> VerifyResult:
        closed = self.last_type == fmt.CHECKPOINT and self.last_reason == "close"
        common: dict[str, Any] = {
            "mode": "full" if self.full else "public-key",
            "records": self.records,
            "files": len(self.files),
            "checkpoints": self.checkpoints,
            "epochs": self.max_epoch + 1 - self._first_epoch() if self.records else 0,
            "sessions": self.sessions,
            "recoveries": self.recoveries,
            "log_id": self.log_id,
            "closed": closed,
            "first_seq": self.first_seq,
            "partial": self.started_late or (self.explicit and self._ends_at_rotation()),
            "anchors": self.anchor_found or self.anchors_checked,
            "head": self.head,
            "anchor_report": dict(self.anchor_report),
        }
        if ok:
            last = self.first_seq + self.records - 1
            uncovered = last - max(self.last_cp_seq, self.first_seq - 1)
            through = last if self.full else self._authenticated_through()
            warnings: list[str] = []
            if last > through:
                warnings.append(
                    f"records {through + 1}..{last} are not authenticated: public-key mode "
                    "checks records after the last checkpoint only for form, and no signed "
                    "anchor covers them (give the witness with --anchor, or verify with the "
                    "auditor's key file)"
                )
            bad = self.anchor_report.get("unusable", 0) + self.anchor_report.get("forged", 0)
            if bad:
                warnings.append(
                    f"{bad} line(s) of the anchor files could not be used (torn, corrupted, or "
                    "heads this log did not sign); none was the newest about this log"
                )
            return VerifyResult(
                ok=True,
                uncovered=uncovered,
                authenticated_through=through,
                unauthenticated=last - through,
                warnings=tuple(warnings),
                **common,
            )
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

    def _first_epoch(self) -> int:
        return self.start_epoch if self.started_late else 0

    def _ends_at_rotation(self) -> bool:
        return self.last_type == fmt.CHECKPOINT and self.last_reason == "rotate"

    def run(self) -> VerifyResult:
        try:
            self._run()
        except _Fail as fail:
            return self._result(False, fail)
        except OSError as exc:  # a read error (EIO, a file pulled away): not a verdict
            raise ConfigError(
                f"cannot read {self.files[self.file_index]}: {exc.strerror or type(exc).__name__}"
                "; give the auditor read access to every log file"
            ) from None
        return self._result(True)

    def _authenticated_through(self) -> int:
        """The last record whose bytes a signature covers (public-key mode)."""
        through = self.last_cp_seq if self.last_cp_seq >= 0 else self.first_seq - 1
        for anchor in reversed(self.tail_anchors):
            if anchor.seq > through and self._signed(anchor):
                return anchor.seq
        return through

    def _signed(self, anchor: Anchor) -> bool:
        """Whether this log's checkpoint key signed ``anchor`` (checked once each)."""
        key = id(anchor)
        if key not in self.checked_anchor_sigs:
            assert self.public is not None
            good = anchor.signed_by(self.public)
            self.checked_anchor_sigs[key] = good
            if not good:
                self.anchor_report["forged"] = self.anchor_report.get("forged", 0) + 1
        return self.checked_anchor_sigs[key]

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
        next_anchor = -1  # no anchor is known before the genesis names the log
        must_end = False  # a rotate checkpoint was read: the file must end here
        # The exact start of the next record if it is an event where the chain expects one.
        prefix = b"\x00"
        mac_now: Any = fmt.mac_context(keys[0]) if full else None
        last_file = len(self.files) - 1
        for fi, path in enumerate(self.files):
            self.file_index = fi
            self.line_no = 0
            must_end = False
            base_line = 0
            carry = b""
            with fmt.open_regular(path) as stream:
                while True:
                    chunk = stream.read(_CHUNK)
                    if not chunk:
                        break
                    buf = carry + chunk if carry else chunk
                    lines = buf.split(b"\n")
                    rest = lines.pop()
                    end = len(buf) - len(rest)
                    if not lines:
                        carry = buf
                        if len(carry) > fmt.MAX_LINE:
                            self.line_no = base_line + 1
                            raise _Fail("malformed", "a line is longer than any record", expected)
                        continue
                    view = memoryview(buf)
                    seg_start = 0
                    off = 0
                    for lineno, line in enumerate(lines, base_line + 1):
                        if (
                            line.startswith(prefix)
                            and line[-75:-66] == _SUFFIX
                            and line[-2:] == b'"}'
                        ):
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
                                if expected == next_anchor:
                                    prefix = b"\x00"
                                continue
                        self.records = records
                        self.last_type = last_type
                        self.line_no = lineno
                        n = len(line)
                        if must_end:
                            raise _Fail(
                                "file_boundary",
                                "a record follows the rotate checkpoint in the same file "
                                "(records were moved between files)",
                                expected,
                            )
                        if n > fmt.MAX_LINE:
                            raise _Fail("malformed", "a line is longer than any record", expected)
                        if n < 140 or line[-75:-66] != b'},"mac":"' or line[-2:] != b'"}':
                            raise _Fail("malformed", "not a record line", expected)
                        m = header.match(line)
                        if m is None:
                            raise _Fail("malformed", "the record header is malformed", expected)
                        mac = line[-66:-2]
                        body = line[:-74] + b"}"
                        seq = int(m[1])
                        epoch = int(m[2])
                        rtype = m[4]
                        if records == 0 and seq != 0 and rtype != b"genesis" and self.explicit:
                            # A part of the log: start from the checkpoint before this file.
                            cp, cp_line = self._start_from_previous_file(fi, seq)
                            expected = cp.seq + 1
                            expected_epoch = cp.epoch + 1
                            prev_mac = cp.mac
                            seg = hashlib.sha256(cp_line)
                            next_anchor = self._anchors_ready(expected)
                            if full:
                                mac_now = fmt.mac_context(
                                    self._key(expected_epoch, expected_epoch) or b"-"
                                )
                        mac_body = body
                        cp_data: dict[str, Any] | None = None
                        if rtype == b"checkpoint":
                            cp_data = fmt.checkpoint_data(body)
                            if cp_data is None:
                                raise _Fail(
                                    "malformed",
                                    "the checkpoint's data is not exactly in the written form "
                                    "(members, types, canonical JSON, lowercase signature)",
                                    seq,
                                )
                            mac_body = fmt.checkpoint_mac_body(
                                seq, epoch, m[3].decode("ascii"), cp_data
                            )
                        if full:
                            key = (
                                keys[epoch]
                                if epoch < len(keys)
                                else self._key(epoch, expected_epoch)
                            )
                            if key is None or not compare(
                                digest(key, mac_body, "sha256").hex().encode(), mac
                            ):
                                self._bad_mac(mac_body, mac, seq, epoch)
                        elif mac.strip(_HEX):
                            raise _Fail("malformed", "the MAC is not lowercase hex", seq)
                        if seq != expected:
                            self._bad_seq(seq, expected, mac == prev_mac, fi, lineno)
                        if epoch != expected_epoch:
                            raise _Fail(
                                "wrong_epoch_key",
                                f"record is in epoch {epoch}; the chain requires epoch "
                                f"{expected_epoch}",
                                seq,
                            )
                        if m[3] != prev_mac:
                            raise _Fail(
                                "broken_link", "prev is not the MAC of the previous record", seq
                            )
                        if seq == 0 and rtype != b"genesis":
                            raise _Fail(
                                "bad_genesis", "the first record is not a genesis record", seq
                            )
                        if rtype != b"event":
                            if cp_data is not None:
                                seg.update(view[seg_start:off])
                                self._checkpoint(
                                    cp_data, seq, epoch, prev_mac, mac, seg.hexdigest()
                                )
                                seg = hashlib.sha256()
                                seg_start = off
                                expected_epoch = epoch + 1
                                must_end = cp_data["reason"] == "rotate"
                            else:
                                self._special(rtype.decode("ascii"), body, seq, fi)
                                if seq == 0:
                                    next_anchor = self._anchors_ready(0)
                        if seq in self.anchor_at:
                            seg_now = seg.copy()
                            seg_now.update(view[seg_start : off + n + 1])
                            self._check_anchors(seq, epoch, mac, seg_now.hexdigest())
                            next_anchor = self._next_anchor(seq + 1)
                        last_type = rtype.decode("ascii")
                        prev_mac = mac
                        expected = seq + 1
                        records += 1
                        off += n + 1
                        prefix = _PREFIX % (expected, expected_epoch, prev_mac)
                        if must_end or expected == next_anchor:
                            prefix = b"\x00"
                        if full:
                            mac_now = fmt.mac_context(
                                self._key(expected_epoch, expected_epoch) or b"-"
                            )
                    seg.update(view[seg_start:end])
                    base_line += len(lines)
                    carry = rest
                    del view, buf, lines
            self.line_no = base_line
            self.records = records
            self.last_type = last_type
            if carry and not (fi == last_file and self.allow_open):
                self.line_no += 1
                reason = "torn_line" if fi == last_file else "malformed"
                raise _Fail(reason, "the file ends inside a line (no newline)", expected)
            if fi < last_file and records and not must_end:
                raise _Fail(
                    "file_boundary",
                    "the file does not end with a rotate checkpoint, so the next file does not "
                    "continue it (records were moved between files, or a file is missing)",
                    expected - 1,
                )
        self.head = prev_mac.decode("ascii") if records else None
        self.max_epoch = expected_epoch - (1 if last_type == fmt.CHECKPOINT else 0)
        self.line_no = max(self.line_no, 1)
        if self.records == 0:
            raise _Fail("bad_genesis", "the log holds no records", 0)
        closed = self.last_type == fmt.CHECKPOINT and self.last_reason == "close"
        self._check_unreached_anchors(expected - 1, closed)
        if self.anchor_bad:
            raise _Fail(
                "anchor_unreadable",
                f"the last thing {self.anchor_bad[0]} holds about this log cannot be used, so "
                "the newest head a witness kept is unknown; restore the witness file, or verify "
                "against another witness",
                expected - 1,
            )
        if closed or self.allow_open or (self.explicit and self._ends_at_rotation()):
            return
        raise _Fail(
            "truncated_tail",
            f"the log ends at seq {expected - 1} without its closing checkpoint (last "
            f"checkpoint: seq {self.last_cp_seq}); records after it were removed, or the "
            "writer is still running or crashed (starting it once recovers the log)",
            expected - 1,
        )

    # ---------------------------------------------------------------- anchors

    def _anchors_ready(self, from_seq: int) -> int:
        """The log id is known: select and check the anchors; return the first one's seq."""
        assert self.log_id is not None
        if self.pinned_log_id is not None and self.log_id != self.pinned_log_id:
            raise _Fail(
                "wrong_log",
                f"this is log {self.log_id}, not log {self.pinned_log_id} (--log-id)",
                from_seq,
            )
        if self.anchor_names and self.log_id not in self.anchor_names:
            raise _Fail(
                "wrong_log",
                f"none of the anchors is for this log ({self.log_id}): the log was replaced "
                "by another one, or the anchors are another log's",
                from_seq,
            )
        assert self.public is not None
        if self.anchor_set is not None:
            got = self.anchor_set.for_log(self.log_id, self.public, public_key_hex(self.public))
            mine = got.newest
            self.anchor_found = got.found
            self.anchor_bad = got.last_bad
            self.anchor_report = {
                "found": got.found,
                "replayed": got.replayed,
                "forged": got.forged,
                "other_logs": len(self.anchor_set) - got.found,
                "unusable": self.anchor_set.unusable,
            }
        else:
            mine = [a for a in self.all_anchors if a.log_id == self.log_id]
            self.anchor_found = len(mine)
        self.anchor_at = {}
        for anchor in mine:
            self.anchor_at.setdefault(anchor.seq, []).append(anchor)
        self.anchor_seqs = sorted(self.anchor_at)
        return self._next_anchor(from_seq)

    def _next_anchor(self, from_seq: int) -> int:
        i = bisect.bisect_left(self.anchor_seqs, from_seq)
        return self.anchor_seqs[i] if i < len(self.anchor_seqs) else -1

    def _check_anchors(self, seq: int, epoch: int, mac: bytes, segment: str) -> None:
        for anchor in self.anchor_at[seq]:
            same_record = anchor.mac.encode("ascii") == mac and anchor.epoch == epoch
            if same_record and anchor.segment in (None, segment):
                self.anchors_checked += 1
                if anchor.segment is not None and seq > self.last_cp_seq:
                    self.tail_anchors.append(anchor)
                    del self.tail_anchors[:-8]
                continue
            if not self._signed(anchor):
                continue  # a head nobody with this log's key made: counted, never trusted
            if not same_record:
                raise _Fail(
                    "rolled_back",
                    f"the log holds another record {seq} than the anchor {anchor.source} "
                    f"({anchor.kind}, {anchor.ts}): the history after an earlier point was "
                    "removed and rewritten",
                    seq,
                )
            raise _Fail(
                "anchor_mismatch",
                f"the records from the last checkpoint up to seq {seq} are not those the anchor "
                f"{anchor.source} ({anchor.ts}) vouches for (segment hash differs): they were "
                "altered",
                seq,
            )

    def _check_unreached_anchors(self, last_seq: int, closed: bool) -> None:
        beyond = [
            a
            for seq, found in self.anchor_at.items()
            if seq > last_seq
            for a in found
            if self._signed(a)
        ]
        if not beyond:
            return
        anchor = max(beyond, key=lambda a: a.seq)
        if closed:
            raise _Fail(
                "rolled_back",
                f"the log ends cleanly at seq {last_seq}, but the anchor {anchor.source} "
                f"({anchor.kind}, {anchor.ts}) shows it reached seq {anchor.seq}: it was cut "
                "back to an earlier session's end",
                last_seq,
            )
        raise _Fail(
            "truncated_after_anchor",
            f"the log ends at seq {last_seq}, but the anchor {anchor.source} ({anchor.kind}, "
            f"{anchor.ts}) shows it reached seq {anchor.seq}: records were cut from its tail",
            last_seq,
        )

    # -------------------------------------------------------- a part of the log

    def _start_from_previous_file(self, fi: int, seq: int) -> tuple[fmt.ParsedLine, bytes]:
        """The rotate checkpoint that ends the file before ``files[fi]`` (same directory)."""
        path = self.files[fi]
        m = fmt.LOG_PATTERN.fullmatch(path.name)
        before = (
            path.with_name(fmt.log_file_name(int(m.group(1)) - 1))
            if m is not None and int(m.group(1)) > 1
            else None
        )
        if before is None or not (before.exists() or before.is_symlink()):
            raise _Fail(
                "bad_genesis",
                f"the log begins at seq {seq} here; to verify part of a log, keep the file "
                "before it next to it (its last line is the rotate checkpoint to start from)",
                seq,
            )
        line = _last_line(before)
        cp = fmt.parse_line(line) if line is not None else None
        data = fmt.checkpoint_data(cp.body) if cp is not None else None
        if cp is None or data is None or data["reason"] != "rotate" or cp.seq != seq - 1:
            raise _Fail(
                "sequence_gap",
                f"{before.name} does not end with the rotate checkpoint that precedes seq {seq}",
                seq,
            )
        if self.public is None:
            raise ConfigError("verifying part of a log needs the checkpoint public key")
        fields = {
            **{k: data[k] for k in fmt.CHECKPOINT_DATA_FIELDS},
            "epoch": cp.epoch,
            "seq": cp.seq,
            "mac": cp.mac.decode("ascii"),
        }
        try:
            self.public.verify(bytes.fromhex(data["sig"]), fmt.checkpoint_message(fields))
        except InvalidSignature:
            raise _Fail(
                "checkpoint_signature_invalid",
                f"the rotate checkpoint at the end of {before.name} does not verify",
                cp.seq,
            ) from None
        if self.full:
            key = self._key(cp.epoch, cp.epoch)
            body = fmt.checkpoint_mac_body(cp.seq, cp.epoch, cp.prev, data)
            if key is None or not hmac.compare_digest(
                hmac.digest(key, body, "sha256").hex().encode(), cp.mac
            ):
                raise _Fail(
                    "mac_mismatch",
                    f"the rotate checkpoint at the end of {before.name} fails its MAC",
                    cp.seq,
                )
        self.log_id = data["log_id"]
        if self.expected_log_id is not None and self.log_id != self.expected_log_id:
            raise _Fail("wrong_key", f"the key file is for log {self.expected_log_id}", seq)
        self.first_seq = seq
        self.started_late = True
        self.start_epoch = cp.epoch + 1
        self.last_cp_seq = cp.seq
        assert line is not None
        return cp, line + b"\n"

    # ------------------------------------------------------------- failures

    def _key(self, epoch: int, expected_epoch: int) -> bytes | None:
        if epoch > expected_epoch + 1:
            return None
        while len(self.keys) <= epoch:
            self.keys.append(bytes(fmt.evolve_key(self.keys[-1])))
        return self.keys[epoch]

    def _bad_mac(self, body: bytes, mac: bytes, seq: int, epoch: int) -> None:
        if seq == 0 and self.expected_log_id is not None and self.records == 0:
            try:
                log_id = fmt.loads_bounded(body)["data"]["log_id"]
            except (ValueError, KeyError, TypeError):
                log_id = None
            if log_id is not None and log_id != self.expected_log_id:
                raise _Fail(
                    "wrong_key",
                    f"the key file is for log {self.expected_log_id}, this log is {log_id}",
                    seq,
                )
        # Try the key of every epoch up to past the last one the files or the anchors show,
        # whether or not records of it are still there: a record re-MACed with a later key
        # (the current one, held by whoever controls the host) is named as such even when the
        # records of that epoch were deleted too.
        limit = self._highest_epoch() + EPOCH_SEARCH_MARGIN
        key = self.keys[0]
        for candidate in range(limit + 1):
            known = candidate < len(self.keys)
            key = self.keys[candidate] if known else bytes(fmt.evolve_key(key))
            if hmac.compare_digest(hmac.digest(key, body, "sha256").hex().encode(), mac):
                if candidate == epoch:
                    return  # authentic, but not where the chain expects it: the caller says why
                raise _Fail(
                    "wrong_epoch_key",
                    f"record claims epoch {epoch} but is MACed with the key of epoch {candidate}",
                    seq,
                )
        raise _Fail("mac_mismatch", "the record was altered or forged", seq)

    def _highest_epoch(self) -> int:
        """The highest epoch any record header of the files or any anchor names."""
        if self.highest_epoch is None:
            # A header can claim any epoch; the log can only justify as many epochs as it
            # holds checkpoints (each ends one), and a signed anchor vouches for its own.
            claimed = 0
            checkpoints = 0
            for path in self.files:
                for line in fmt.iter_lines(path):
                    m = fmt._HEADER.match(line)
                    if m is not None and len(m[2]) < 10:
                        claimed = max(claimed, int(m[2]))
                        checkpoints += m[4] == b"checkpoint"
            highest = min(claimed, checkpoints + 1 + self.start_epoch)
            for found in self.anchor_at.values():
                for anchor in found:
                    if anchor.epoch > highest and self._signed(anchor):
                        highest = anchor.epoch
            self.highest_epoch = highest
        return self.highest_epoch

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
            for n, line in enumerate(fmt.iter_lines(self.files[index]), 1):
                if index == fi and n <= lineno:
                    continue
                m = fmt._HEADER.match(line)
                if m is not None and int(m[1]) == wanted:
                    return True
        return False

    # --------------------------------------------------------- special records

    def _data(self, body: bytes, seq: int) -> dict[str, Any]:
        try:
            data = fmt.loads_bounded(body)["data"]
        except (ValueError, KeyError, TypeError):
            raise _Fail("malformed", "the record's JSON is malformed", seq) from None
        if not isinstance(data, dict):
            raise _Fail("malformed", "the record's data is not an object", seq)
        return data

    def _special(self, rtype: str, body: bytes, seq: int, fi: int) -> None:
        if rtype == fmt.GENESIS:
            self._genesis(body, seq)
        elif seq == 0:
            raise _Fail("bad_genesis", "the first record is not a genesis record", seq)
        elif rtype == fmt.OPEN:
            self.sessions += 1
        elif rtype == fmt.RECOVERY:
            self.recoveries += 1
            self._quarantine(self._data(body, seq), seq, fi)
        else:
            raise _Fail("malformed", f"unknown record type {rtype!r}", seq)

    def _quarantine(self, data: dict[str, Any], seq: int, fi: int) -> None:
        """The quarantine file a recovery record names must be there, with its bytes."""
        name, digest, size = data.get("quarantine_file"), data.get("sha256"), data.get("bytes")
        if (
            not isinstance(name, str)
            or not _QUARANTINE_NAME.fullmatch(name)
            or not isinstance(digest, str)
            or type(size) is not int
        ):
            raise _Fail("malformed", "the recovery record is malformed", seq)
        path = self.files[fi].parent / name
        h = hashlib.sha256()
        got = 0
        try:
            with fmt.open_regular(path) as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                    got += len(chunk)
        except ConfigError:
            raise _Fail(
                "quarantine_missing",
                f"{name}, which holds the {size} bytes recovery cut from the log, is missing "
                "or unreadable: keep quarantine files with the log",
                seq,
            ) from None
        if got != size or h.hexdigest() != digest:
            raise _Fail(
                "quarantine_mismatch",
                f"{name} does not hold the bytes recovery cut from the log (SHA-256 differs)",
                seq,
            )

    def _genesis(self, body: bytes, seq: int) -> None:
        if seq != 0:
            raise _Fail("bad_genesis", "a genesis record in the middle of the log", seq)
        data = self._data(body, seq)
        if data.get("format") != fmt.FORMAT:
            raise _Fail("bad_genesis", f"unknown format {str(data.get('format'))[:40]!r}", seq)
        self.log_id = str(data.get("log_id"))[:64]
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

    def _checkpoint(
        self, data: dict[str, Any], seq: int, epoch: int, prev: bytes, mac: bytes, segment: str
    ) -> None:
        if seq == 0:
            raise _Fail("bad_genesis", "the first record is not a genesis record", seq)
        fields = {
            **{k: data[k] for k in fmt.CHECKPOINT_DATA_FIELDS},
            "epoch": epoch,
            "seq": seq,
            "mac": mac.decode("ascii"),
        }
        assert self.public is not None  # set by the genesis record, which came first
        try:
            self.public.verify(bytes.fromhex(data["sig"]), fmt.checkpoint_message(fields))
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
        self.tail_anchors.clear()


def _last_line(path: Path) -> bytes | None:
    """The last complete line of a file (without its newline), read from the end."""
    with fmt.open_regular(path) as f:
        size = f.seek(0, 2)
        start = max(0, size - fmt.MAX_LINE - 1)
        f.seek(start)
        tail: bytes = f.read(size - start)
    if not tail.endswith(b"\n"):
        return None
    cut = tail.rfind(b"\n", 0, len(tail) - 1)
    if cut < 0 and start > 0:
        return None
    return tail[cut + 1 : -1]
