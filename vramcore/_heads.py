"""The audit chain's head: its wire format, defined once, and the one reader of heads in files.

A **head** says where an audit log stood at one record, signed by the log's checkpoint key
(Ed25519), so that a witness off the host can keep it and an auditor can later prove the log
still holds that record and everything before it::

    {"epoch":E,"format":"vramcore-audit-head/2","log_id":…,"mac":M,"public_key":…,
     "reason":R,"segment":G,"seq":S,"sig":…,"ts":…}

``segment`` is the SHA-256 of the exact bytes of the log's records from its last checkpoint
(inclusive; the genesis if none) up to and including record ``S``: with the signed ``mac`` it
lets a verifier holding only the public key authenticate those records. The signature covers
``"vramcore-audit-head/2\\n" || canonical_json(every other member)``.

The audit chain builds heads and checks them against a log; witnesses (a file, exported
telemetry) keep them. :class:`HeadScan` is the one routine that finds heads in what a witness
kept (NDJSON, one JSON document, OpenTelemetry exports in plain or OTLP/JSON attribute form),
streamed, counting every line it could not use instead of skipping it silently;
:func:`newest_head` picks the newest trustworthy head of one log out of such a file.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from vramcore.validation import json_depth_ok

__all__ = [
    "HEAD_ATTRIBUTE",
    "HEAD_FORMAT",
    "HEAD_MEMBERS",
    "HEAD_REASONS",
    "HEAD_SIG_PREFIX",
    "Found",
    "Head",
    "HeadScan",
    "canonical_json",
    "newest_head",
]

#: Format tag of a head.
HEAD_FORMAT = "vramcore-audit-head/2"
#: Domain separation prefix of a head's signature.
HEAD_SIG_PREFIX = b"vramcore-audit-head/2\n"
#: The telemetry attribute that carries a head as its canonical JSON text.
HEAD_ATTRIBUTE = "vramcore.audit.chain_head"
#: Why a head was published: a durable commit, the session's open record, a checkpoint, a
#: critical event made durable on its own, the closing checkpoint.
HEAD_REASONS = frozenset({"commit", "open", "checkpoint", "critical", "close"})
#: Every member of a head, ``sig`` included.
HEAD_MEMBERS = frozenset(
    {"format", "log_id", "seq", "epoch", "mac", "segment", "ts", "reason", "public_key", "sig"}
)
#: The longest line (or head text) a reader looks at; longer ones are counted as unusable.
MAX_LINE = 1 << 20
#: A file that is one JSON document is parsed whole only up to this size.
MAX_DOCUMENT = 16 * 1024 * 1024
_MAX_HEAD_TEXT = 4096
_MAX_NODES = 1_000_000
_HEX = "0123456789abcdef"
_HEX_RE = re.compile(r"[0-9a-f]+")
_TOP_CANDIDATES = 8
#: An object with at least this many of a head's members claims to be a head: if it does not
#: parse as one, it is a corrupted head (counted), never silently something else.
_CLAIMS_HEAD = 5
#: A head exactly as the chain writes it (canonical JSON): read without a JSON parser.
_HEAD_LINE = re.compile(
    rb'\{"epoch":(0|[1-9][0-9]{0,17}),"format":"vramcore-audit-head/2",'
    rb'"log_id":"([0-9a-f]{32})","mac":"([0-9a-f]{64})","public_key":"([0-9a-f]{64})",'
    rb'"reason":"(commit|open|checkpoint|critical|close)","segment":"([0-9a-f]{64})",'
    rb'"seq":(0|[1-9][0-9]{0,17}),"sig":"([0-9a-f]{128})","ts":"([\x20\x21\x23-\x5b\x5d-\x7e]{0,40})"\}'
)


def canonical_json(value: Mapping[str, Any]) -> str:
    """Sorted keys, no whitespace, ASCII only (``\\uXXXX`` escapes): what a signature covers."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _hex(value: object, length: int) -> bool:
    return type(value) is str and len(value) == length and _HEX_RE.fullmatch(value) is not None


def _count(value: object) -> bool:
    return type(value) is int and 0 <= value < 1 << 62


def _public(key: Ed25519PublicKey | str | bytes) -> Ed25519PublicKey | None:
    if isinstance(key, Ed25519PublicKey):
        return key
    try:
        raw = bytes.fromhex(key) if isinstance(key, str) else key
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        return None


@attrs.frozen(kw_only=True)
class Head:
    """A signed statement of where a log stood: ``seq`` is its last record, ``mac`` that
    record's MAC, ``segment`` the hash of its records since the last checkpoint."""

    log_id: str
    seq: int
    epoch: int
    mac: str
    segment: str
    ts: str
    reason: str
    public_key: str
    sig: str = attrs.field(repr=False)

    def unsigned(self) -> dict[str, Any]:
        """Every member but ``sig`` (what the signature covers), with the format tag."""
        return {
            "format": HEAD_FORMAT,
            "log_id": self.log_id,
            "seq": self.seq,
            "epoch": self.epoch,
            "mac": self.mac,
            "segment": self.segment,
            "ts": self.ts,
            "reason": self.reason,
            "public_key": self.public_key,
        }

    def to_dict(self) -> dict[str, Any]:
        """The JSON form a witness keeps."""
        return {**self.unsigned(), "sig": self.sig}

    def to_json(self) -> str:
        """The canonical JSON text (one witness line, one telemetry attribute)."""
        return canonical_json(self.to_dict())

    def message(self) -> bytes:
        """The bytes the signature covers."""
        return HEAD_SIG_PREFIX + canonical_json(self.unsigned()).encode("ascii")

    def signed_by(self, public_key: Ed25519PublicKey | str | bytes) -> bool:
        """Whether ``public_key`` (an Ed25519 key, or its raw bytes or hex) made the signature."""
        public = _public(public_key)
        if public is None:
            return False
        try:
            public.verify(bytes.fromhex(self.sig), self.message())
        except (InvalidSignature, ValueError):
            return False
        return True

    def self_signed(self) -> bool:
        """Whether the key the head names signed it (an intact head; not yet *this* log's)."""
        return self.signed_by(self.public_key)

    @classmethod
    def parse(cls, value: object) -> Head | None:
        """A head from its JSON form (a mapping, or its JSON text); ``None`` if any member is
        missing, extra or malformed. The signature is not checked here."""
        if isinstance(value, str | bytes):
            if len(value) > _MAX_HEAD_TEXT:
                return None
            value = _loads(value)
        if not isinstance(value, Mapping) or set(value) != HEAD_MEMBERS:
            return None
        if value["format"] != HEAD_FORMAT or value["reason"] not in HEAD_REASONS:
            return None
        if not (_count(value["seq"]) and _count(value["epoch"])):
            return None
        if not (_hex(value["log_id"], 32) and _hex(value["mac"], 64)):
            return None
        if not (_hex(value["segment"], 64) and _hex(value["public_key"], 64)):
            return None
        if not _hex(value["sig"], 128) or not isinstance(value["ts"], str):
            return None
        if len(value["ts"]) > 40:
            return None
        return cls(
            log_id=value["log_id"],
            seq=value["seq"],
            epoch=value["epoch"],
            mac=value["mac"],
            segment=value["segment"],
            ts=value["ts"],
            reason=value["reason"],
            public_key=value["public_key"],
            sig=value["sig"],
        )

    @classmethod
    def build(
        cls,
        sign: Callable[[bytes], bytes],
        *,
        log_id: str,
        seq: int,
        epoch: int,
        mac: str,
        segment: str,
        ts: str,
        reason: str,
        public_key: str,
    ) -> Head:
        """Make a head and sign it with ``sign`` (an Ed25519 private key's ``sign``)."""
        if reason not in HEAD_REASONS:
            raise ValueError(f"unknown head reason {reason!r}")
        draft = cls(
            log_id=log_id,
            seq=seq,
            epoch=epoch,
            mac=mac,
            segment=segment,
            ts=ts,
            reason=reason,
            public_key=public_key,
            sig="",
        )
        return attrs.evolve(draft, sig=sign(draft.message()).hex())


@attrs.frozen(kw_only=True)
class Found:
    """One thing :class:`HeadScan` found.

    :attr kind: ``"head"`` (a well-formed head, signature not checked), ``"bad_head"``
        (something that claims to be a head but is malformed), ``"unreadable"`` (a line that is
        not JSON: torn, corrupted, too long), or ``"match"`` (an object the scan's ``match``
        callback recognised; its result is in ``value``).
    :attr source: ``path:line`` (or ``path`` for a whole document).
    :attr text: the raw bytes it came from (at most :data:`MAX_LINE`), to attribute a bad or
        unreadable line to a log by the ids it still contains.
    """

    kind: str
    source: str
    head: Head | None = None
    value: Any = None
    text: bytes = attrs.field(default=b"", repr=False)


class HeadScan:
    """Finds every chain head in a witness file or in exported telemetry, streamed.

    The file is NDJSON (each line a head, a telemetry record, or anything else), or one JSON
    document (an OTLP/JSON export, ``audit show --json`` output) of at most
    :data:`MAX_DOCUMENT` bytes. Heads are found wherever they are nested: as a head object, or
    as the :data:`HEAD_ATTRIBUTE` attribute in plain (``{"vramcore.audit.chain_head": "…"}``) or
    OTLP/JSON (``{"key": …, "value": {"stringValue": "…"}}``) form. Memory stays bounded by the
    longest line; nothing is skipped silently: lines that are not JSON, and things that claim
    to be heads but are malformed, are yielded (and counted in :attr:`unusable`).

    :param path: the file.
    :param match: called on every JSON object that is not a head; a non-``None`` result is
        yielded as a ``"match"`` (and the object is not searched further).
    :raises OSError: from iteration: the file cannot be opened or read, or is not a regular
        file.
    """

    def __init__(
        self, path: Path | str, *, match: Callable[[dict[str, Any]], Any] | None = None
    ) -> None:
        self.path = Path(path)
        self._match = match
        #: lines read, heads found, and things that could not be used.
        self.lines = 0
        self.heads = 0
        self.unusable = 0

    def __iter__(self) -> Iterator[Found]:
        with open_regular(self.path) as f:
            start = f.read(MAX_DOCUMENT + 1)
            if len(start) <= MAX_DOCUMENT and start.lstrip()[:1] in (b"{", b"["):
                document = _loads(start)
                if document is not None:
                    self.lines = start.count(b"\n") + (0 if start.endswith(b"\n") else 1)
                    yield from self._walk(document, str(self.path), start[:MAX_LINE])
                    return
            f.seek(0)
            for lineno, line in enumerate(_lines(f), 1):
                self.lines = lineno
                yield from self._line(line, f"{self.path}:{lineno}")

    def _line(self, line: bytes | None, source: str) -> Iterator[Found]:
        if line is None:  # longer than any line a witness writes
            self.unusable += 1
            yield Found(kind="unreadable", source=source)
            return
        text = line.strip()
        if not text:
            return
        m = _HEAD_LINE.fullmatch(text) if text.startswith(b'{"epoch":') else None
        if m is not None:  # a witness line as the chain writes it: no JSON parser needed
            self.heads += 1
            head = Head(
                log_id=m[2].decode(),
                seq=int(m[7]),
                epoch=int(m[1]),
                mac=m[3].decode(),
                segment=m[6].decode(),
                ts=m[9].decode(),
                reason=m[5].decode(),
                public_key=m[4].decode(),
                sig=m[8].decode(),
            )
            yield Found(kind="head", source=source, head=head, text=text)
            return
        value = _loads(text)
        if value is None:
            self.unusable += 1
            yield Found(kind="unreadable", source=source, text=text)
            return
        yield from self._walk(value, source, text)

    def _walk(self, value: Any, source: str, text: bytes) -> Iterator[Found]:
        stack: list[Any] = [value]
        seen = 0
        while stack:
            node = stack.pop()
            seen += 1
            if seen > _MAX_NODES:
                self.unusable += 1
                yield Found(kind="unreadable", source=source, text=text)
                return
            if isinstance(node, list):
                stack.extend(reversed(node))
                continue
            if not isinstance(node, dict):
                continue
            found = self._object(node, source, text)
            if found is not None:
                if found.kind == "bad_head":
                    self.unusable += 1
                elif found.kind == "head":
                    self.heads += 1
                yield found
                continue
            stack.extend(reversed(list(node.values())))

    def _object(self, node: dict[str, Any], source: str, text: bytes) -> Found | None:
        fmt = node.get("format")
        if (isinstance(fmt, str) and fmt.startswith("vramcore-audit-head")) or len(
            HEAD_MEMBERS.intersection(node)
        ) >= _CLAIMS_HEAD:
            return _head_found(Head.parse(node), source, text)
        attribute = node.get(HEAD_ATTRIBUTE)
        if attribute is None and node.get("key") == HEAD_ATTRIBUTE:
            inner = node.get("value")
            attribute = inner.get("stringValue") if isinstance(inner, dict) else inner
        if attribute is not None:
            head = Head.parse(attribute) if isinstance(attribute, str) else None
            return _head_found(head, source, text)
        if self._match is not None:
            value = self._match(node)
            if value is not None:
                return Found(kind="match", source=source, value=value, text=text)
        return None


def _head_found(head: Head | None, source: str, text: bytes) -> Found:
    if head is None:
        return Found(kind="bad_head", source=source, text=text)
    return Found(kind="head", source=source, head=head, text=text)


def newest_head(path: Path | str, log_id: str) -> Head | None:
    """The newest head of ``log_id`` in a witness file or telemetry export that can be trusted.

    Anyone who may append to a shared witness may append a replayed older head, an unsigned
    or corrupted one, or one signed by another key; taking the last line would let them hide
    the real newest head. So: the log's key is pinned by the first intact (self-signed) head of
    ``log_id`` in the file, and the answer is the head with the highest ``seq`` signed by that
    key, wherever it is. One pass; signatures are checked only for the pin and the best few
    candidates (a second pass checks every candidate if all of those fail).

    :raises OSError: the file cannot be read (see :class:`HeadScan`).
    """
    pinned: str | None = None
    candidates: list[Head] = []  # the highest-seq heads of log_id, best first
    for found in HeadScan(path):
        head = found.head
        if head is None or head.log_id != log_id:
            continue
        if pinned is None:
            if not head.self_signed():
                continue
            pinned = head.public_key
        if head.public_key != pinned:
            continue
        if len(candidates) < _TOP_CANDIDATES or head.seq > candidates[-1].seq:
            candidates.append(head)
            candidates.sort(key=lambda h: h.seq, reverse=True)
            del candidates[_TOP_CANDIDATES:]
    if pinned is None:
        return None
    for head in candidates:
        if head.signed_by(pinned):
            return head
    best: Head | None = None
    for found in HeadScan(path):  # every top candidate was forged: check them all
        head = found.head
        if head is None or head.log_id != log_id or head.public_key != pinned:
            continue
        if (best is None or head.seq > best.seq) and head.signed_by(pinned):
            best = head
    return best


def open_regular(path: Path) -> BinaryIO:
    """Open ``path`` for reading, refusing anything but a regular file (a FIFO would block).

    :raises OSError: it cannot be opened, or is not a regular file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _lines(f: BinaryIO) -> Iterator[bytes | None]:
    """Lines of ``f`` (without the newline); ``None`` for a line longer than :data:`MAX_LINE`,
    which is skipped unread beyond that."""
    while line := f.readline(MAX_LINE + 1):
        if len(line) > MAX_LINE and not line.endswith(b"\n"):
            while (rest := f.readline(MAX_LINE)) and not rest.endswith(b"\n"):
                pass
            yield None
            continue
        yield line.rstrip(b"\n")


def _loads(text: str | bytes) -> Any:
    """JSON, or ``None`` if it is not JSON or nests deeper than 32 levels."""
    raw = text.encode("utf-8", "replace") if isinstance(text, str) else text
    if not json_depth_ok(raw):
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None
