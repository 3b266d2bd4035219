"""``vramcore audit verify | show | public-key``."""

from __future__ import annotations

import argparse
import collections
import functools
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vramcore import (
    EXIT_FAILURE,
    EXIT_INTERNAL,
    EXIT_OK,
    Commands,
    Console,
    UsageError,
    read_worker_token,
)
from vramcore.audit import SinkContext
from vramcore.errors import AuditError, ConfigError, InvalidInput
from vramcore_audit_chain import _format as fmt
from vramcore_audit_chain._head import load_anchors
from vramcore_audit_chain._keys import load_key_file, load_public_key, public_key_hex, signing_key
from vramcore_audit_chain._verify import REASONS, collect_log_files, verify_log

__all__ = ["EXIT_CRASH", "add_commands"]

#: Exit code when a command itself fails unexpectedly (a bug): never 1, which means "the log
#: is not intact", and never 0 (the core's :data:`vramcore.EXIT_INTERNAL`).
EXIT_CRASH = EXIT_INTERNAL

_Handler = Callable[[argparse.Namespace, Console], int]


def _guarded(handler: _Handler) -> _Handler:
    """Run ``handler``; an unexpected exception is one line and :data:`EXIT_CRASH`."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace, console: Console) -> int:
        try:
            return handler(args, console)
        except (UsageError, ConfigError, InvalidInput, AuditError):
            raise  # the CLI prints these in one line (exit 2, or 1 for integrity)
        except OSError as exc:  # a file that fails on read: input, not a bug
            where = exc.filename if exc.filename is not None else "a file of the log"
            raise ConfigError(
                f"cannot read {where}: {exc.strerror or type(exc).__name__}; check that the "
                "auditor can read every log, key and anchor file"
            ) from None
        except Exception as exc:
            console.error(
                f"vramcore audit failed unexpectedly ({type(exc).__name__}); this is a bug in "
                "vramcore-audit-chain, not a verdict on the log (exit 3)",
                kind="internal",
                exit_code=EXIT_CRASH,
            )
            return EXIT_CRASH

    return run


def add_commands(commands: Commands) -> None:
    """Register the ``audit`` command group."""
    group = commands.group("audit", help="verify and read the tamper-evident audit log")
    p = group.add(
        "verify",
        help="prove an audit log intact (exit 0) or name the first bad record (exit 1)",
        handler=_guarded(cmd_verify),
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="log directory or audit-*.ndjson")
    p.add_argument(
        "--key-file",
        help="the auditor's initial key file written at setup (default: $VRAMCORE_AUDIT_KEY_FILE)",
    )
    p.add_argument(
        "--public-key",
        help="checkpoint public key (64 hex digits or a file such as checkpoint.pub); "
        "alone, checks signatures and checkpoints only",
    )
    p.add_argument(
        "--live",
        action="store_true",
        help="the log is still being written: accept a missing closing checkpoint and a "
        "torn last line",
    )
    p.add_argument(
        "--anchor",
        action="append",
        default=[],
        metavar="FILE",
        help="a witness file, a saved checkpoint or exported telemetry holding heads of this "
        "log: the log must contain and extend every one (repeatable)",
    )
    p.add_argument(
        "--log-id",
        help="the log this must be (32 hex digits); needed when the anchors name several logs",
    )
    p = group.add(
        "show", help="print audit records (not verified: run verify)", handler=_guarded(cmd_show)
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="log directory or audit-*.ndjson")
    p.add_argument("--type", dest="rtype", choices=sorted(fmt.RECORD_TYPES), help="record type")
    p.add_argument("--event-type", help="event type, such as vram.sealed")
    p.add_argument("--shard", help="only records about this shard id")
    p.add_argument("--since", help="from this UTC time (ISO 8601)")
    p.add_argument("--until", help="up to this UTC time (ISO 8601)")
    p.add_argument("--limit", type=int, help="at most this many records (the last ones)")
    group.add(
        "public-key",
        help="print the checkpoint public key derived from VRAMCORE_WORKER_TOKEN",
        handler=_guarded(cmd_public_key),
    )


def cmd_verify(args: argparse.Namespace, console: Console) -> int:
    """Verify a log; exit 0 intact, 1 with the first bad record, 2 on usage errors."""
    key_path = args.key_file or os.environ.get("VRAMCORE_AUDIT_KEY_FILE") or None
    public = load_public_key(args.public_key) if args.public_key else None
    if key_path is None and public is None:
        raise UsageError(
            "give --key-file (the auditor-initial.key written when the log was created; or set "
            "VRAMCORE_AUDIT_KEY_FILE) or --public-key (checkpoint.pub) for checkpoint-only "
            "verification"
        )
    anchors = load_anchors(args.anchor)
    if key_path is not None:
        key = load_key_file(Path(key_path))
        result = verify_log(
            args.paths,
            initial_key=key.initial_key,
            public_key=public or load_public_key(key.public_key),
            expected_log_id=key.log_id,
            allow_open=args.live,
            anchors=anchors,
            log_id=args.log_id,
        )
    else:
        result = verify_log(
            args.paths,
            public_key=public,
            allow_open=args.live,
            anchors=anchors,
            log_id=args.log_id,
        )
    data = result.to_dict()
    if result.reason is not None:
        data["reason_text"] = REASONS.get(result.reason, "")
    console.result(data, result.summary())
    return EXIT_OK if result.ok else EXIT_FAILURE


def _time(text: str | None, option: str) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"{option} must be an ISO 8601 time such as 2026-01-31T12:00:00Z"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _records(paths: list[str]) -> Iterator[tuple[str, int, dict[str, Any] | None]]:
    """Every line of the log as a parsed object (``None`` if it is not one), streamed; a line
    longer than any record is skipped unread, so memory stays bounded."""
    for path in collect_log_files(paths):
        with fmt.open_regular(path) as f:
            n = 0
            while line := f.readline(fmt.MAX_LINE + 1):
                n += 1
                if len(line) > fmt.MAX_LINE and not line.endswith(b"\n"):
                    while (rest := f.readline(fmt.MAX_LINE)) and not rest.endswith(b"\n"):
                        pass
                    yield path.name, n, None
                    continue
                try:
                    rec = fmt.loads_bounded(line)
                except (ValueError, UnicodeDecodeError):
                    yield path.name, n, None
                    continue
                yield path.name, n, rec if isinstance(rec, dict) else None


def _record_time(data: dict[str, Any]) -> datetime | None:
    text = data.get("timestamp") or data.get("ts")
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _printable(value: object) -> str:
    text = str(value)
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)[:200]


def _summary(rtype: str, data: dict[str, Any]) -> str:
    if rtype == fmt.EVENT:
        parts = [str(data.get("event_type", "?"))]
        for key in ("shard_id", "device", "nbytes", "reason", "rule", "thinned", "count"):
            if key in data:
                parts.append(f"{key}={data[key]}")
        return " ".join(parts)
    if rtype == fmt.CHECKPOINT:
        return f"reason={data.get('reason')} records={data.get('records')}"
    if rtype == fmt.RECOVERY:
        return f"quarantined {data.get('bytes')} bytes to {data.get('quarantine_file')}"
    if rtype == fmt.OPEN:
        return f"worker={data.get('worker_id')} clean={data.get('clean')}"
    return f"log_id={data.get('log_id')} worker={data.get('worker_id')}"


def cmd_show(args: argparse.Namespace, console: Console) -> int:
    """Print records, filtered; unparseable lines are counted, not printed."""
    since = _time(args.since, "--since")
    until = _time(args.until, "--until")
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    # With --limit only the last records are kept while reading: memory stays bounded.
    selected: collections.deque[dict[str, Any]] = collections.deque(maxlen=args.limit)
    bad = 0
    for name, line_no, rec in _records(args.paths):
        if rec is None or not isinstance(rec.get("data"), dict):
            bad += 1
            continue
        data = rec["data"]
        if args.rtype and rec.get("type") != args.rtype:
            continue
        if args.event_type and data.get("event_type") != args.event_type:
            continue
        if args.shard and data.get("shard_id") != args.shard:
            continue
        if since or until:
            when = _record_time(data)
            if when is None or (since and when < since) or (until and when > until):
                continue
        selected.append({"file": name, "line": line_no, **rec})
    lines = [
        _printable(
            f"{r.get('seq', '?'):>8} {_record_time(r['data']) or '-'} {r.get('type', '?'):<10} "
            f"{_summary(str(r.get('type')), r['data'])}"
        )
        for r in selected
    ]
    if bad:
        lines.append(f"({bad} unreadable line(s) skipped; run `vramcore audit verify`)")
    lines.append(f"({len(selected)} record(s) shown, NOT verified; use `vramcore audit verify`)")
    console.result(
        {"records": list(selected), "count": len(selected), "unreadable": bad}, "\n".join(lines)
    )
    return EXIT_OK


def cmd_public_key(args: argparse.Namespace, console: Console) -> int:
    """Print the public key that checks this worker's checkpoints."""
    token = read_worker_token()  # wrapped as it is read: no frame holds the raw token
    if token is None:
        raise UsageError(
            "set VRAMCORE_WORKER_TOKEN (or VRAMCORE_WORKER_TOKEN_FILE) to the worker's token"
        )
    try:
        public = public_key_hex(
            signing_key(SinkContext.from_token(token, worker_id="", device=-1, scope=fmt.KEY_SCOPE))
        )
    finally:
        token.wipe()
    console.result({"public_key": public}, public)
    return EXIT_OK
