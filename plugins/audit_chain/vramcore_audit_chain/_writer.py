"""The chain writer: sequencing, MACs, group commit, checkpoints, rotation, recovery.

One lock, ``_lock``, guards the chain (sequence, head, key, queue) and is held only to build
and MAC a record (a few µs). Writes and fsyncs happen outside it, one committer at a time:
the thread that finds no commit running becomes the leader, takes *everything* queued so
far, writes it in one call and fsyncs once; threads that need durability meanwhile wait on a
condition and are served together by the next commit (leader/follower group commit). A
flusher thread commits batched records within ``flush_interval`` and writes time-based
checkpoints.

A checkpoint ends its epoch: it is MACed with the old key, the key evolves one way, the old key
is wiped, and once the checkpoint is fsynced the state file is replaced with the new key.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import attrs

from vramcore.audit import SinkContext
from vramcore.errors import AuditError, ConfigError
from vramcore_audit_chain import _format as fmt
from vramcore_audit_chain._config import ChainConfig, Durability
from vramcore_audit_chain._keys import (
    ChainState,
    fsync_dir,
    public_key_hex,
    read_state,
    signing_key,
    state_cipher,
    write_key_file,
    write_private_file,
    write_state,
)
from vramcore_audit_chain._recovery import recover

__all__ = ["ChainWriter"]

log = logging.getLogger("vramcore.audit_chain")

_BATCH_BYTES = 1024 * 1024
_CP_MARKER = b'","type":"checkpoint","data":{'


class _Rotate:
    pass


_ROTATE = _Rotate()


@attrs.frozen
class _SaveState:
    epoch: int
    seq: int
    head: str
    key: bytearray = attrs.field(repr=False)


_Item = bytes | _Rotate | _SaveState


class ChainWriter:
    """Appends records to one audit chain directory; one writer per directory (flock).

    :param config: where and how to write.
    :param keys: the sink context; its plugin keys (signing key, state key, initial chain key)
        are derived while opening and not kept.
    :param worker_id: written into the genesis and open records.
    :param device: likewise.
    :raises ConfigError: another process holds the log, or the directory is unusable.
    :raises AuditError: the existing log does not continue cleanly (truncated, altered,
        state missing); the writer refuses to append to it.
    """

    def __init__(
        self, config: ChainConfig, keys: SinkContext, *, worker_id: str = "", device: int = -1
    ) -> None:
        self._cfg = config
        self._sync_all = config.durability is Durability.IMMEDIATE
        self._sync_critical = config.durability is Durability.MIXED
        self._dir = config.directory
        self._worker_id = worker_id
        self._device = device
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the flusher waits here
        self._drained = threading.Condition(self._lock)  # backpressure waits here
        self._committing = False
        self._pending: list[_Item] = []
        self._pending_bytes = 0
        self._first_pending_at = 0.0
        self._flush_now = False
        self._seg_lines: list[bytes] = []
        self._epoch_records = 0
        self._epoch_started = time.monotonic()
        self._durable_seq = -1
        self._records_written = 0
        self._failed: BaseException | None = None
        self._closed = False
        self._stopping = False
        self._fd = -1
        self._lock_fd = -1
        self._key = bytearray()
        self._mac: Any = None
        self._log_id = ""
        self._epoch = 0
        self._seq_next = 0
        self._head = fmt.GENESIS_PREV
        self._file_index = 1
        self._file_bytes = 0
        self.recovered: dict[str, Any] | None = None
        self._signer = signing_key(keys)
        self.public_key = public_key_hex(self._signer)
        self._cipher = state_cipher(keys)
        try:
            self._acquire_lock()
            self._open(keys)
        except BaseException:
            self._release()
            raise
        self._flusher = threading.Thread(
            target=self._run_flusher, name="vramcore-audit-chain-flusher", daemon=True
        )
        self._flusher.start()

    # ------------------------------------------------------------------ public

    @property
    def directory(self) -> Path:
        """The log directory."""
        return self._dir

    @property
    def records(self) -> int:
        """Records appended by this writer (events and chain records)."""
        return self._records_written

    def append_event(self, data: str, *, critical: bool) -> int:
        """Append an event record (``data``: canonical JSON); return its sequence number.

        Returns when the record is as durable as the configured mode promises.
        """
        sync = self._sync_all or (critical and self._sync_critical)
        with self._lock:
            if self._failed is not None or self._closed:
                self._check_usable()
            if (
                self._file_bytes >= self._cfg.max_bytes
                or self._epoch_records >= self._cfg.checkpoint_records
            ):
                self._roll_if_due()
            # _record(), inlined: this is the hot path.
            seq = self._seq_next
            body = (
                f'{{"seq":{seq},"epoch":{self._epoch},"prev":"{self._head}",'
                f'"type":"event","data":{data}}}'
            ).encode("ascii")
            ctx = self._mac.copy()
            ctx.update(body)
            mac = ctx.hexdigest()
            line = body[:-1] + b',"mac":"' + mac.encode("ascii") + b'"}\n'
            self._seq_next = seq + 1
            self._head = mac
            pending = self._pending
            if not pending:
                self._first_pending_at = time.monotonic()
                if not sync:
                    self._wake.notify()
            pending.append(line)
            size = len(line)
            self._pending_bytes += size
            self._file_bytes += size
            self._seg_lines.append(line)
            self._epoch_records += 1
            self._records_written += 1
            if sync:
                pass
            elif self._pending_bytes < _BATCH_BYTES:
                return seq
            else:
                if not self._flush_now:
                    self._flush_now = True
                    self._wake.notify()
                while self._pending_bytes > self._cfg.max_pending_bytes and self._failed is None:
                    self._drained.wait()
                self._check_usable()
                return seq
        self._commit_through(seq)
        return seq

    def flush(self) -> None:
        """Make every record appended so far durable."""
        with self._lock:
            self._check_usable()
            target = self._seq_next - 1
        self._commit_through(target)

    def close(self) -> None:
        """Write the closing checkpoint, make it durable, wipe the key and release the log."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            failed = self._failed
            if failed is None:
                self._checkpoint("close")
            self._stopping = True
            self._wake.notify_all()
            target = self._seq_next - 1
        self._flusher.join()
        try:
            if failed is None:
                self._commit_through(target, closing=True)
        finally:
            self._release()
        if failed is not None:
            raise AuditError(
                f"audit chain in {self._dir} failed earlier and was closed without its closing "
                f"checkpoint: {type(failed).__name__}: {failed}"
            )

    # --------------------------------------------------------------- sequencing

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise AuditError(
                f"audit chain in {self._dir} cannot write ({type(self._failed).__name__}: "
                f"{self._failed}); fix the storage and restart the worker"
            )
        if self._closed:
            raise AuditError(f"audit chain in {self._dir} is closed")

    def _record(self, rtype: str, data: str) -> int:
        seq = self._seq_next
        body = fmt.build_body(seq, self._epoch, self._head, rtype, data)
        line, mac = fmt.build_line(body, self._key)
        self._seq_next = seq + 1
        self._head = mac
        if not self._pending:
            self._first_pending_at = time.monotonic()
        self._pending.append(line)
        self._pending_bytes += len(line)
        self._file_bytes += len(line)
        self._seg_lines.append(line)
        self._epoch_records += 1
        self._records_written += 1
        return seq

    def _checkpoint_due(self) -> bool:
        return self._epoch_records > 0 and (
            self._epoch_records >= self._cfg.checkpoint_records
            or time.monotonic() - self._epoch_started >= self._cfg.checkpoint_seconds
        )

    def _roll_if_due(self) -> None:
        """Rotate or checkpoint when due by size or count (time is the flusher's job)."""
        if self._file_bytes >= self._cfg.max_bytes:
            self._checkpoint("rotate")
            self._pending.append(_ROTATE)
            self._file_bytes = 0
        elif self._epoch_records >= self._cfg.checkpoint_records:
            self._checkpoint("periodic")

    def _checkpoint(self, reason: str) -> None:
        seq = self._seq_next
        fields: dict[str, Any] = {
            "epoch": self._epoch,
            "head": self._head,
            "log_id": self._log_id,
            "reason": reason,
            "records": seq,
            "segment": hashlib.sha256(b"".join(self._seg_lines)).hexdigest(),
            "seq": seq,
            "ts": fmt.utc_now_text(),
        }
        data = {k: v for k, v in fields.items() if k not in ("epoch", "seq")}
        data["sig"] = self._signer.sign(fmt.checkpoint_message(fields)).hex()
        self._record(fmt.CHECKPOINT, fmt.canonical_json(data))
        self._seg_lines = [self._seg_lines[-1]]
        self._evolve()
        self._pending.append(_SaveState(self._epoch, seq, self._head, bytearray(self._key)))

    def _evolve(self) -> None:
        new = fmt.evolve_key(self._key)
        self._key[:] = bytes(len(self._key))
        self._key = new
        self._mac = fmt.mac_context(new)
        self._epoch += 1
        self._epoch_records = 0
        self._epoch_started = time.monotonic()

    # ------------------------------------------------------------------ commit

    def _commit_through(self, seq: int, *, closing: bool = False) -> None:
        """Return once record ``seq`` is durable; lead a group commit if nobody is."""
        with self._lock:
            while True:
                if self._failed is not None and not closing:
                    self._check_usable()
                if self._durable_seq >= seq:
                    return
                if not self._committing:
                    break
                self._drained.wait()
            self._committing = True
            items, self._pending = self._pending, []
            self._pending_bytes = 0
            self._flush_now = False
            upto = self._seq_next - 1
        durable = False
        try:
            self._write(items)
            durable = True
        except BaseException as exc:
            with self._lock:
                self._failed = exc
            raise AuditError(
                f"audit chain in {self._dir} could not write: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            for item in items:
                if isinstance(item, _SaveState):
                    item.key[:] = bytes(len(item.key))
            with self._lock:
                self._committing = False
                if durable:
                    self._durable_seq = upto
                self._drained.notify_all()

    def _write(self, items: list[_Item]) -> None:
        chunk: list[bytes] = []
        dirty = False
        for item in items:
            if isinstance(item, bytes):
                chunk.append(item)
                continue
            self._write_all(b"".join(chunk))
            chunk = []
            os.fsync(self._fd)
            dirty = False
            if isinstance(item, _Rotate):
                os.close(self._fd)
                self._fd = -1
                self._file_index += 1
                self._fd = self._open_log(self._file_index, create=True)
            else:
                write_state(
                    self._dir / fmt.STATE_NAME,
                    self._cipher,
                    ChainState(self._log_id, item.epoch, item.seq, item.head, item.key),
                )
        if chunk:
            self._write_all(b"".join(chunk))
            dirty = True
        if dirty:
            os.fsync(self._fd)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def _run_flusher(self) -> None:
        while True:
            with self._lock:
                while True:
                    if self._stopping:
                        return
                    if self._pending:
                        left = self._first_pending_at + self._cfg.flush_interval - time.monotonic()
                        if left <= 0 or self._flush_now:
                            break
                        self._wake.wait(left)
                        continue
                    if self._checkpoint_due() and self._failed is None:
                        self._checkpoint("periodic")
                        break
                    left = self._epoch_started + self._cfg.checkpoint_seconds - time.monotonic()
                    self._wake.wait(min(max(left, 0.01), 1.0))
                target = self._seq_next - 1
            try:
                self._commit_through(target)
            except AuditError as exc:
                log.error("%s", exc)
                return

    # ------------------------------------------------------------------ files

    def _acquire_lock(self) -> None:
        try:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the audit log directory {self._dir} (VRAMCORE_AUDIT_LOG): "
                f"{exc.strerror}"
            ) from None
        path = self._dir / fmt.LOCK_NAME
        self._lock_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._lock_fd, 32, 0).decode("ascii", "replace").strip()
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise ConfigError(
                f"the audit log {self._dir} is in use by another writer (pid {holder or '?'}); "
                "give each worker process its own VRAMCORE_AUDIT_LOG directory"
            ) from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode("ascii"), 0)

    def _release(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self._lock_fd, 0)
                os.close(self._lock_fd)
            self._lock_fd = -1
        self._key[:] = bytes(len(self._key))
        self._key = bytearray()
        self._mac = None

    def _open_log(self, index: int, *, create: bool) -> int:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_CREAT
        if create:
            flags |= os.O_EXCL
        fd = os.open(self._dir / fmt.log_file_name(index), flags, 0o600)
        if create:
            fsync_dir(self._dir)
        return fd

    def _open(self, keys: SinkContext) -> None:
        files = fmt.log_files(self._dir)
        state = read_state(self._dir / fmt.STATE_NAME, self._cipher)
        if (
            state is not None
            and state.seq == -1
            and len(files) == 1
            and files[0][1].stat().st_size == 0
        ):
            # Setup crashed after creating the first file, before its genesis record: the
            # empty file holds nothing, and setup resumes from the saved initial state.
            files[0][1].unlink()
            files = []
        if not files:
            if state is not None and state.seq >= 0:
                raise AuditError(
                    f"the audit chain state in {self._dir} records a log of at least "
                    f"{state.seq + 1} records, but no log file is there: the log was deleted "
                    "or moved. Restore it, or move the directory away to start a new log"
                )
            self._setup(keys, state)
            clean = True
        else:
            if state is None:
                raise AuditError(
                    f"{self._dir} holds audit log files but no chain state ({fmt.STATE_NAME}); "
                    "the writer cannot continue this log. Restore the state file, or move the "
                    "log away (keep it for the auditor) to start a new one"
                )
            resume = recover(self._dir, files, state)
            self._log_id = state.log_id
            self._key = resume.key
            self._mac = fmt.mac_context(self._key)
            self._epoch = resume.epoch
            self._seq_next = resume.next_seq
            self._head = resume.head
            self._seg_lines = resume.segment_lines
            self._epoch_records = resume.epoch_records
            self._file_index = resume.file_index
            self._file_bytes = resume.file_bytes
            self._fd = self._open_log(self._file_index, create=False)
            clean = resume.clean
            if resume.state_stale:
                write_state(
                    self._dir / fmt.STATE_NAME,
                    self._cipher,
                    ChainState(self._log_id, self._epoch, resume.cp_seq, resume.cp_mac, self._key),
                )
            if resume.quarantine is not None:
                self.recovered = resume.quarantine
                data = dict(resume.quarantine, ts=fmt.utc_now_text())
                self._record(fmt.RECOVERY, fmt.canonical_json(data))
            state.wipe()
        open_data = {
            "clean": clean,
            "device": self._device,
            "pid": os.getpid(),
            "ts": fmt.utc_now_text(),
            "worker_id": self._worker_id,
        }
        self._record(fmt.OPEN, fmt.canonical_json(open_data))
        items, self._pending = self._pending, []
        self._pending_bytes = 0
        self._write(items)
        self._durable_seq = self._seq_next - 1

    def _setup(self, keys: SinkContext, state: ChainState | None) -> None:
        if state is None:
            log_id = secrets.token_hex(16)
            base = keys.derive_key(fmt.CHAIN_KEY_PURPOSE)
            key = fmt.initial_key(base.export(), secrets.token_bytes(32))
            base.wipe()
            write_key_file(
                self._cfg.initial_key_path, log_id=log_id, key=key, public_key=self.public_key
            )
            write_private_file(
                self._dir / fmt.PUBLIC_KEY_NAME, (self.public_key + "\n").encode(), replace=True
            )
            state = ChainState(log_id, 0, -1, fmt.GENESIS_PREV, bytearray(key))
            write_state(self._dir / fmt.STATE_NAME, self._cipher, state)
            key[:] = bytes(len(key))
        self._log_id = state.log_id
        self._key = bytearray(state.key)
        self._mac = fmt.mac_context(self._key)
        state.wipe()
        self._epoch = 0
        self._seq_next = 0
        self._head = fmt.GENESIS_PREV
        self._file_index = 1
        self._file_bytes = 0
        self._fd = self._open_log(1, create=True)
        genesis = {
            "checkpoint_records": self._cfg.checkpoint_records,
            "checkpoint_seconds": self._cfg.checkpoint_seconds,
            "device": self._device,
            "format": fmt.FORMAT,
            "key_id": fmt.key_id(self._key),
            "log_id": self._log_id,
            "public_key": self.public_key,
            "ts": fmt.utc_now_text(),
            "worker_id": self._worker_id,
        }
        self._record(fmt.GENESIS, fmt.canonical_json(genesis))
