"""Anchors: what an auditor checks the log against, read from witness files in bounded memory.

A **head** (defined once in the core, :mod:`vramcore._heads`) is the chain's state at one
record, signed by the checkpoint key: the writer publishes one to every witness with each
durable commit. An **anchor** is a head kept off the host, or a checkpoint saved from the log:
the log must still contain that record and extend past it, or records were removed.

:func:`load_anchors` reads witness files, saved checkpoint lines or ``vramcore audit show
--json`` output, and exported OpenTelemetry data, streamed. It keeps, per log, only the newest
few anchors (by sequence number) and the last thing of that log in each file, plus counts:
the newest authentic head proves everything an older one would (a log that holds the newest
head's record holds every record before it, by the chain's links and, for a verifier with only
the public key, by the head's signed segment hash and the checkpoints' ones). Nothing is
dropped silently: heads of other logs, replayed older heads, heads this log did not sign, and
torn or corrupted lines are counted and reported, and a file whose last line about this log
cannot be used fails the verification (the head it held was needed).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from vramcore._heads import HEAD_ATTRIBUTE, Head, HeadScan
from vramcore.errors import ConfigError
from vramcore_audit_chain import _format as fmt

__all__ = ["TELEMETRY_HEAD_ATTRIBUTE", "Anchor", "AnchorSet", "LogAnchors", "load_anchors"]

#: The telemetry attribute that carries a head (the core's :data:`vramcore._heads.HEAD_ATTRIBUTE`).
TELEMETRY_HEAD_ATTRIBUTE = HEAD_ATTRIBUTE
#: How many of the newest anchors of each log are kept (more than one, so that a few forged
#: heads with high sequence numbers cannot hide the newest authentic one).
KEEP_NEWEST = 16
_MAX_IDS = 10_000
_KEYS_PER_LOG = 16
_LOG_ID = re.compile(rb'"log_id\\?"\s*:\s*\\?"([0-9a-f]{32})')
_PUBLIC = re.compile(rb'"public_key\\?"\s*:\s*\\?"([0-9a-f]{64})')


def _hex(value: object, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and not value.strip("0123456789abcdef")


def _count(value: object) -> bool:
    return type(value) is int and 0 <= value < 1 << 62


@attrs.frozen(kw_only=True)
class Anchor:
    """A record the log must contain (and extend), with the signature that vouches for it.

    :attr kind: ``"head"`` (a witness's head) or ``"checkpoint"`` (a saved checkpoint).
    :attr segment: for a head, the SHA-256 of the log's records from the last checkpoint up to
        and including this one (signed): it authenticates them without the MAC key.
    :attr source: where it came from (``file:line``), for messages.
    :attr line: ``(file index, line)`` among the anchor files, for ordering within a file.
    """

    kind: str
    log_id: str
    seq: int
    epoch: int
    mac: str
    ts: str
    source: str
    segment: str | None = None
    public_key: str | None = None
    line: tuple[int, int] = (0, 0)
    #: what the signature covers: a checkpoint's message, or the head itself (its message is
    #: built only when a signature is checked: most anchors never need it)
    signed: bytes | Head = attrs.field(repr=False)
    sig: bytes = attrs.field(repr=False)

    @property
    def message(self) -> bytes:
        """The bytes the signature covers."""
        return self.signed.message() if isinstance(self.signed, Head) else self.signed

    def signed_by(self, public: Ed25519PublicKey) -> bool:
        """Whether the log's checkpoint key signed this anchor."""
        try:
            public.verify(self.sig, self.message)
        except (InvalidSignature, ValueError):
            return False
        return True

    @classmethod
    def from_head(cls, head: Head, source: str, line: tuple[int, int] = (0, 0)) -> Anchor:
        """An anchor from a witness's head."""
        return cls(
            kind="head",
            log_id=head.log_id,
            seq=head.seq,
            epoch=head.epoch,
            mac=head.mac,
            ts=head.ts,
            source=source,
            segment=head.segment,
            public_key=head.public_key,
            line=line,
            signed=head,
            sig=bytes.fromhex(head.sig),
        )

    @classmethod
    def from_checkpoint(
        cls,
        seq: int,
        epoch: int,
        prev: str,
        data: Mapping[str, Any],
        mac: str,
        source: str,
        line: tuple[int, int] = (0, 0),
    ) -> Anchor | None:
        """An anchor from a checkpoint record (``None`` if it is not a well-formed one)."""
        if not _hex(mac, 64) or not _hex(prev, 64) or not _count(seq) or not _count(epoch):
            return None
        try:
            fields = {name: data[name] for name in fmt.CHECKPOINT_DATA_FIELDS}
            sig = bytes.fromhex(data["sig"])
        except (KeyError, TypeError, ValueError):
            return None
        if not _hex(fields["log_id"], 32) or fields["head"] != prev:
            return None
        signed = {**fields, "epoch": epoch, "seq": seq, "mac": mac}
        return cls(
            kind="checkpoint",
            log_id=fields["log_id"],
            seq=seq,
            epoch=epoch,
            mac=mac,
            ts=str(fields["ts"])[:40],
            source=source,
            line=line,
            signed=fmt.checkpoint_message(signed),
            sig=sig,
        )


@attrs.define
class _Bad:
    """An unusable line: where, and which logs it may have been about."""

    source: str
    line: tuple[int, int]
    what: str


@attrs.define
class LogAnchors:
    """What the anchor files hold about one log (see :meth:`AnchorSet.for_log`).

    :attr newest: the newest anchors kept (highest ``seq`` first), signatures not yet checked.
    :attr found: how many anchors of this log the files hold.
    :attr replayed: heads that came after a newer head of this log in the same file.
    :attr last_bad: per anchor file, the last thing about this log when it is unusable (a torn
        or corrupted line naming it, a head with a broken signature): the head it held was
        needed. Set by :meth:`AnchorSet.for_log`.
    """

    newest: list[Anchor] = attrs.field(factory=list)
    found: int = 0
    replayed: int = 0
    last_bad: list[str] = attrs.field(factory=list)
    forged: int = 0


class AnchorSet:
    """The anchors in some files, read once and kept in bounded memory.

    Holds, per log: the :data:`KEEP_NEWEST` newest anchors, how many there were, and how many
    were replayed; per file: the last anchor of each log and the last unusable line naming each
    log id or public key. Counts every line it could not use.

    :raises ConfigError: a file cannot be read (named), or holds no anchor at all.
    """

    def __init__(self, paths: Sequence[str | Path]) -> None:
        self.paths = [Path(p) for p in paths]
        self._logs: dict[str, LogAnchors] = {}
        # per (file, log id): the last anchor naming each public key (a few keys at most)
        self._last_in_file: dict[tuple[int, str], dict[str | None, Anchor]] = {}
        self._last_by_key: dict[tuple[int, str], Anchor] = {}
        self._max_seq_in_file: dict[tuple[int, str], int] = {}
        self._bad_by_id: dict[tuple[int, str], _Bad] = {}
        #: lines (or parts of documents) that could not be used, over all files.
        self.unusable = 0
        #: heads found, over all logs and files.
        self.total = 0
        for index, path in enumerate(self.paths):
            before = self.total
            try:
                self._read(index, path)
            except OSError as exc:
                raise ConfigError(
                    f"--anchor {path}: cannot be read ({exc.strerror or exc}); give the auditor "
                    "read access to the witness file"
                ) from None
            if self.total == before:
                raise ConfigError(
                    f"--anchor {path}: no chain head or checkpoint found in it (give a witness "
                    "file, a saved checkpoint line, `audit show --json` output or exported "
                    "telemetry)"
                )

    def __len__(self) -> int:
        return self.total

    def __iter__(self) -> Iterator[Anchor]:
        """The anchors kept (the newest of each log)."""
        for entry in self._logs.values():
            yield from entry.newest

    @property
    def log_ids(self) -> set[str]:
        """Every log the files hold anchors of."""
        return set(self._logs)

    def _read(self, index: int, path: Path) -> None:
        scan = HeadScan(path, match=_checkpoint_in_object)
        for found in scan:
            line = (index, _line_no(found.source))
            if found.kind == "head" and found.head is not None:
                self._add(Anchor.from_head(found.head, found.source, line))
            elif found.kind == "match":
                anchor = found.value
                if isinstance(anchor, Anchor):
                    self._add(attrs.evolve(anchor, source=found.source, line=line))
                else:
                    self._bad(index, line, found.source, found.text, "a malformed checkpoint")
            elif found.kind == "bad_head":
                self._bad(index, line, found.source, found.text, "a malformed chain head")
            else:
                self._bad(index, line, found.source, found.text, "a torn or corrupted line")

    def _add(self, anchor: Anchor) -> None:
        self.total += 1
        entry = self._logs.get(anchor.log_id)
        if entry is None:
            if len(self._logs) >= _MAX_IDS:
                raise ConfigError(
                    f"--anchor {anchor.source}: heads of more than {_MAX_IDS} logs; give the "
                    "auditor the witness of the logs they verify"
                )
            entry = self._logs[anchor.log_id] = LogAnchors()
        entry.found += 1
        key = (anchor.line[0], anchor.log_id)
        if anchor.seq < self._max_seq_in_file.get(key, -1):
            entry.replayed += 1
        self._max_seq_in_file[key] = max(anchor.seq, self._max_seq_in_file.get(key, -1))
        by_key = self._last_in_file.setdefault(key, {})
        if len(by_key) < _KEYS_PER_LOG or anchor.public_key in by_key:
            by_key[anchor.public_key] = anchor
        if anchor.public_key is not None and (
            len(self._last_by_key) < _MAX_IDS
            or (anchor.line[0], anchor.public_key) in self._last_by_key
        ):
            self._last_by_key[(anchor.line[0], anchor.public_key)] = anchor
        newest = entry.newest
        if len(newest) < KEEP_NEWEST or anchor.seq > newest[-1].seq:
            newest.append(anchor)
            newest.sort(key=lambda a: a.seq, reverse=True)
            del newest[KEEP_NEWEST:]

    def _bad(self, index: int, line: tuple[int, int], source: str, text: bytes, what: str) -> None:
        self.unusable += 1
        ids = {m.decode() for m in _LOG_ID.findall(text[: fmt.MAX_LINE])}
        ids |= {m.decode() for m in _PUBLIC.findall(text[: fmt.MAX_LINE])}
        for found_id in ids:
            if len(self._bad_by_id) < _MAX_IDS or (index, found_id) in self._bad_by_id:
                self._bad_by_id[(index, found_id)] = _Bad(source, line, what)

    def for_log(self, log_id: str, public: Ed25519PublicKey, public_hex: str) -> LogAnchors:
        """What the files hold about ``log_id``, whose checkpoint key is ``public``.

        Checks the signature of the last anchor of this log in each file; a file whose last
        line about this log is unusable (torn, corrupted, or a head this key did not sign)
        is listed in ``last_bad``.
        """
        entry = self._logs.get(log_id, LogAnchors())
        out = LogAnchors(
            newest=list(entry.newest), found=entry.found, replayed=entry.replayed, forged=0
        )
        for index in range(len(self.paths)):
            by_key = self._last_in_file.get((index, log_id), {})
            # The last head of this log with this log's key, if its key signed it.
            last = by_key.get(public_hex)
            bad = [
                b
                for b in (
                    self._bad_by_id.get((index, log_id)),
                    self._bad_by_id.get((index, public_hex)),
                )
                if b is not None
            ]
            if last is not None and not last.signed_by(public):
                out.forged += 1
                bad.append(_Bad(last.source, last.line, "a head this log's key did not sign"))
                last = None
            for other_key, other in by_key.items():
                if other_key == public_hex or other.kind != "head":
                    continue
                if isinstance(other.signed, Head) and other.signed.self_signed():
                    out.forged += 1  # signed by someone else's key: never this log's head
                else:
                    bad.append(_Bad(other.source, other.line, "a corrupted head of this log"))
            # A head with this log's key but another log id that its key did not sign: this
            # log's head with its log id corrupted.
            keyed = self._last_by_key.get((index, public_hex))
            if keyed is not None and keyed.log_id != log_id and not keyed.signed_by(public):
                bad.append(_Bad(keyed.source, keyed.line, "a head whose log id was altered"))
            worst = max(bad, key=lambda b: b.line, default=None)
            if worst is not None and (last is None or worst.line > last.line):
                out.last_bad.append(f"{worst.source} ({worst.what})")
        return out


def load_anchors(paths: Sequence[str | Path]) -> AnchorSet:
    """The anchors in ``paths``: witness files, saved checkpoints, exported telemetry.

    A file may be NDJSON (one head, record line or telemetry record per line; lines that hold
    no anchor are skipped) or one JSON document (``audit show --json`` output, an exported span
    or log batch). Heads are found wherever they are nested, including as the
    :data:`TELEMETRY_HEAD_ATTRIBUTE` attribute in plain or OTLP/JSON form.

    :raises ConfigError: a file is unreadable (named), not a regular file, or holds no anchor.
    """
    return AnchorSet(paths)


def _line_no(source: str) -> int:
    _, _, tail = source.rpartition(":")
    return int(tail) if tail.isdigit() else 0


def _checkpoint_in_object(node: dict[str, Any]) -> Anchor | str | None:
    """A checkpoint record (a saved log line, or ``audit show --json`` output) as an anchor;
    ``"bad"`` for one that is malformed; ``None`` for anything else."""
    if node.get("type") != fmt.CHECKPOINT or not {"seq", "epoch", "prev", "data", "mac"} <= set(
        node
    ):
        return None
    data = node["data"]
    anchor = None
    if isinstance(data, dict) and set(data) == {*fmt.CHECKPOINT_DATA_FIELDS, "sig"}:
        anchor = Anchor.from_checkpoint(
            node["seq"], node["epoch"], node["prev"], data, node["mac"], ""
        )
    return anchor if anchor is not None else "bad"
