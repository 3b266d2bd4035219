"""Heads and anchors: what leaves the host, and what an auditor checks the log against.

A **head** is the chain's state at one record: log id, sequence number, that record's MAC and
epoch, a time, why it was published, the checkpoint public key, and an Ed25519 signature by the
checkpoint key over all of it. The writer publishes one to every witness after each checkpoint,
each critical event (``immediate``/``mixed``), each start and at close, once the record it names
is durable.

An **anchor** is a head kept off the host, or a checkpoint saved from the log: the log must
still contain that record and extend past it, or records were removed. :func:`load_anchors`
finds anchors in witness files, in saved checkpoint lines or ``vramcore audit show --json``
output, and in exported OpenTelemetry data that carries heads (the tracing plugin's witness).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from vramcore.errors import ConfigError
from vramcore_audit_chain import _format as fmt

__all__ = [
    "HEAD_REASONS",
    "TELEMETRY_HEAD_ATTRIBUTE",
    "Anchor",
    "Head",
    "head_json",
    "load_anchors",
    "sign_head",
]

#: Why a head was published.
HEAD_REASONS = frozenset({"open", "checkpoint", "critical", "close"})
#: The telemetry attribute that carries a head as JSON text (set by vramcore-audit-tracing).
TELEMETRY_HEAD_ATTRIBUTE = "vramcore.audit.chain_head"

_HEAD_KEYS = frozenset({"format", "log_id", "seq", "epoch", "mac", "ts", "reason", "public_key"})
_MAX_WHOLE_DOCUMENT = 16 * 1024 * 1024
_MAX_WALK_NODES = 1_000_000


def _hex(value: object, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and not value.strip("0123456789abcdef")


def _count(value: object) -> bool:
    return type(value) is int and 0 <= value < 1 << 62


@attrs.frozen(kw_only=True)
class Head:
    """A signed statement of where a log stood: ``seq`` is the last record, ``mac`` its MAC.

    :attr sig: the Ed25519 signature (hex) by the log's checkpoint key over
        ``"vramcore-audit-head/1\\n" || canonical_json(every other member)``.
    """

    log_id: str
    seq: int
    epoch: int
    mac: str
    ts: str
    reason: str
    public_key: str
    sig: str = attrs.field(repr=False)

    def unsigned(self) -> dict[str, Any]:
        """Every member but ``sig`` (what the signature covers), with the format tag."""
        return {
            "format": fmt.HEAD_FORMAT,
            "log_id": self.log_id,
            "seq": self.seq,
            "epoch": self.epoch,
            "mac": self.mac,
            "ts": self.ts,
            "reason": self.reason,
            "public_key": self.public_key,
        }

    def to_dict(self) -> dict[str, Any]:
        """The JSON form a witness keeps."""
        return {**self.unsigned(), "sig": self.sig}

    def message(self) -> bytes:
        """The bytes the signature covers."""
        return fmt.HEAD_SIG_PREFIX + fmt.canonical_json(self.unsigned()).encode("ascii")

    def signed_by(self, public: Ed25519PublicKey) -> bool:
        """Whether ``public`` made the signature."""
        try:
            public.verify(bytes.fromhex(self.sig), self.message())
        except (InvalidSignature, ValueError):
            return False
        return True

    @classmethod
    def from_mapping(cls, value: object) -> Head | None:
        """A head from its JSON form; ``None`` if any member is missing, extra or malformed."""
        if not isinstance(value, Mapping) or set(value) != {*_HEAD_KEYS, "sig"}:
            return None
        if value["format"] != fmt.HEAD_FORMAT or value["reason"] not in HEAD_REASONS:
            return None
        if not (_count(value["seq"]) and _count(value["epoch"])):
            return None
        if not (_hex(value["log_id"], 32) and _hex(value["mac"], 64)):
            return None
        if not (_hex(value["public_key"], 64) and _hex(value["sig"], 128)):
            return None
        if not isinstance(value["ts"], str) or len(value["ts"]) > 40:
            return None
        return cls(
            log_id=value["log_id"],
            seq=value["seq"],
            epoch=value["epoch"],
            mac=value["mac"],
            ts=value["ts"],
            reason=value["reason"],
            public_key=value["public_key"],
            sig=value["sig"],
        )


def sign_head(
    signer: Ed25519PrivateKey,
    *,
    log_id: str,
    seq: int,
    epoch: int,
    mac: str,
    reason: str,
    public_key: str,
) -> Head:
    """Make and sign the head of a log at record ``seq``."""
    draft = Head(
        log_id=log_id,
        seq=seq,
        epoch=epoch,
        mac=mac,
        ts=fmt.utc_now_text(),
        reason=reason,
        public_key=public_key,
        sig="",
    )
    return attrs.evolve(draft, sig=signer.sign(draft.message()).hex())


@attrs.frozen(kw_only=True)
class Anchor:
    """A record the log must contain (and extend), with the signature that vouches for it.

    :attr kind: ``"head"`` (a witness's head) or ``"checkpoint"`` (a saved checkpoint).
    :attr source: where it came from (``file:line``), for messages.
    """

    kind: str
    log_id: str
    seq: int
    epoch: int
    mac: str
    ts: str
    source: str
    public_key: str | None = None
    message: bytes = attrs.field(repr=False)
    sig: bytes = attrs.field(repr=False)

    def signed_by(self, public: Ed25519PublicKey) -> bool:
        """Whether the log's checkpoint key signed this anchor."""
        try:
            public.verify(self.sig, self.message)
        except InvalidSignature:
            return False
        return True

    @classmethod
    def from_head(cls, head: Head, source: str) -> Anchor:
        """An anchor from a witness's head."""
        return cls(
            kind="head",
            log_id=head.log_id,
            seq=head.seq,
            epoch=head.epoch,
            mac=head.mac,
            ts=head.ts,
            source=source,
            public_key=head.public_key,
            message=head.message(),
            sig=bytes.fromhex(head.sig),
        )

    @classmethod
    def from_checkpoint(
        cls, seq: int, epoch: int, prev: str, data: Mapping[str, Any], mac: str, source: str
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
            message=fmt.checkpoint_message(signed),
            sig=sig,
        )


def load_anchors(paths: Sequence[str | Path]) -> list[Anchor]:
    """Every anchor in ``paths``: witness files, saved checkpoints, exported telemetry.

    A file may be NDJSON (one head, record line or telemetry record per line; lines that hold
    no anchor are skipped) or one JSON document (``audit show --json`` output, an exported span
    or log batch). Heads are found wherever they are nested, including as the
    :data:`TELEMETRY_HEAD_ATTRIBUTE` attribute in plain or OTLP/JSON form.

    :raises ConfigError: a file is unreadable, not a regular file, or holds no anchor; or a
        thing that claims to be a head is malformed.
    """
    anchors: list[Anchor] = []
    for raw in paths:
        path = Path(raw)
        found = list(_anchors_in_file(path))
        if not found:
            raise ConfigError(
                f"--anchor {path}: no chain head or checkpoint found in it (give a witness "
                "file, a saved checkpoint line, `audit show --json` output or exported telemetry)"
            )
        anchors.extend(found)
    return anchors


def _anchors_in_file(path: Path) -> Iterator[Anchor]:
    with fmt.open_regular(path) as f:
        head = f.read(_MAX_WHOLE_DOCUMENT + 1)
        if len(head) <= _MAX_WHOLE_DOCUMENT and head.lstrip()[:1] in (b"{", b"["):
            try:
                document = fmt.loads_bounded(head)
            except (ValueError, UnicodeDecodeError):
                document = None  # NDJSON, handled line by line below
            if document is not None:
                yield from _walk(document, f"{path}")
                return
        f.seek(0)
        for lineno, line in enumerate(_bounded_lines(f, path), 1):
            yield from _anchors_in_line(line.strip(), f"{path}:{lineno}")


def _bounded_lines(f: Any, path: Path) -> Iterator[bytes]:
    while True:
        line: bytes = f.readline(fmt.MAX_LINE + 1)
        if not line:
            return
        if len(line) > fmt.MAX_LINE:
            raise ConfigError(f"--anchor {path}: a line is longer than {fmt.MAX_LINE} bytes")
        yield line


def _anchors_in_line(line: bytes, source: str) -> Iterator[Anchor]:
    if not line:
        return
    rec = fmt.parse_line(line)
    if rec is not None:
        if rec.type == fmt.CHECKPOINT:
            data = fmt.checkpoint_data(rec.body)
            anchor = None
            if data is not None:
                anchor = Anchor.from_checkpoint(
                    rec.seq, rec.epoch, rec.prev, data, rec.mac.decode("ascii"), source
                )
            if anchor is None:
                raise ConfigError(f"--anchor {source}: a malformed checkpoint record")
            yield anchor
        return
    try:
        value = fmt.loads_bounded(line)
    except (ValueError, UnicodeDecodeError):
        return  # not JSON: not an anchor (telemetry files may hold other text)
    yield from _walk(value, source)


def _walk(value: Any, source: str) -> Iterator[Anchor]:
    """Anchors anywhere inside a parsed JSON value (iterative: no recursion on input)."""
    stack: list[Any] = [value]
    seen = 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > _MAX_WALK_NODES:
            raise ConfigError(f"--anchor {source}: too large to search for chain heads")
        if isinstance(node, list):
            stack.extend(reversed(node))
            continue
        if not isinstance(node, dict):
            continue
        anchor = _anchor_in_object(node, source)
        if anchor is not None:
            yield anchor
            continue
        stack.extend(reversed(list(node.values())))


def _anchor_in_object(node: dict[str, Any], source: str) -> Anchor | None:
    if node.get("format") == fmt.HEAD_FORMAT:
        head = Head.from_mapping(node)
        if head is None:
            raise ConfigError(f"--anchor {source}: a malformed chain head")
        return Anchor.from_head(head, source)
    text = node.get(TELEMETRY_HEAD_ATTRIBUTE)
    if text is None and node.get("key") == TELEMETRY_HEAD_ATTRIBUTE:
        value = node.get("value")  # OTLP/JSON: {"key": ..., "value": {"stringValue": ...}}
        text = value.get("stringValue") if isinstance(value, dict) else None
    if isinstance(text, str):
        try:
            head = Head.from_mapping(fmt.loads_bounded(text))
        except ValueError:
            head = None
        if head is None:
            raise ConfigError(f"--anchor {source}: a malformed chain head in telemetry")
        return Anchor.from_head(head, source)
    if node.get("type") == fmt.CHECKPOINT and {"seq", "epoch", "prev", "data", "mac"} <= set(node):
        data = node["data"]
        anchor = None
        if isinstance(data, dict) and set(data) == {*fmt.CHECKPOINT_DATA_FIELDS, "sig"}:
            anchor = Anchor.from_checkpoint(
                node["seq"], node["epoch"], node["prev"], data, node["mac"], source
            )
        if anchor is None:
            raise ConfigError(f"--anchor {source}: a malformed checkpoint record")
        return anchor
    return None


def head_json(head: Head) -> str:
    """The canonical JSON text of a head (one witness line, one telemetry attribute)."""
    return json.dumps(head.to_dict(), sort_keys=True, separators=(",", ":"))
