"""The chain writer: sequencing, MACs, group commit, checkpoints, rotation, recovery.

One lock, ``_lock``, guards the chain (sequence, head, key, queue) and is held only to build
and MAC a record (a few µs). Writes and fsyncs happen outside it, one committer at a time:
the thread that finds no commit running becomes the leader, takes *everything* queued so
far, writes it in one call and fsyncs once; threads that need durability meanwhile wait on a
condition and are served together by the next commit (leader/follower group commit). A
flusher thread commits batched records within ``flush_interval`` and writes time-based
checkpoints.

A checkpoint ends its epoch: it is MACed with the old key, the key evolves one way, the old key
is wiped, and once the checkpoint is fsynced the state file is replaced with the new key (once
per commit, however many checkpoints it holds, so a commit's cost does not grow with them).

Heads leave the host through witnesses: the committer publishes one after every commit (one
head per group commit, naming its last record), once the commit is durable and before any
thread waiting for that commit is released. So whatever ``emit`` acknowledged as durable is
covered by a head the witnesses hold, and a witness never knows a head the disk lacks.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from vramcore._heads import Head
from vramcore.audit import AuditWitness, SinkContext
from vramcore.errors import AuditError, ConfigError
from vramcore_audit_chain import _format as fmt
from vramcore_audit_chain._config import ChainConfig, Durability
from vramcore_audit_chain._keys import (
    ChainState,
    fsync_dir,
    load_key_file,
    public_key_hex,
    read_state,
    signing_key,
    state_cipher,
    write_key_file,
    write_private_file,
    write_state,
)
from vramcore_audit_chain._recovery import Resume, quarantine_tail, recover

__all__ = ["ChainWriter"]

log = logging.getLogger("vramcore.audit_chain")

_BATCH_BYTES = 1024 * 1024
#: try_append_event's longest wait for the chain lock (held for µs, a checkpoint's signature
#: at most); past it the event goes the slow way, which the core bounds in time.
_NOWAIT_LOCK_SECONDS = 0.05
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
#: When several reasons to publish a head meet in one commit, the strongest names it.
_HEAD_RANK = {"commit": 0, "critical": 1, "open": 2, "checkpoint": 3, "close": 4}


class ChainWriter:
    """Appends records to one audit chain directory; one writer per directory (flock).

    Opening reads only: it takes the lock and checks the existing log against the state.
    :meth:`start` (called by the constructor unless ``witnesses`` is ``None``) compares the
    log with what the witnesses know, and only then writes (setup, recovery, ``open``).

    :param config: where and how to write.
    :param keys: the sink context; its plugin keys (signing key, state key, initial chain key)
        are derived while opening and not kept.
    :param worker_id: written into the genesis and open records.
    :param device: likewise.
    :param witnesses: where heads go; ``None`` defers :meth:`start` to the caller.
    :raises ConfigError: another process holds the log, or the directory is unusable.
    :raises AuditError: the existing log does not continue cleanly (truncated, altered,
        state missing, behind a witness); the writer refuses to append to it.
    """

    def __init__(
        self,
        config: ChainConfig,
        keys: SinkContext,
        *,
        worker_id: str = "",
        device: int = -1,
        witnesses: Sequence[AuditWitness] | None = (),
    ) -> None:
        self._cfg = config
        # Critical events are made durable before append_event returns in every mode (the
        # core's contract for a durable sink); ``immediate`` does so for every event.
        self._sync_all = config.durability is Durability.IMMEDIATE
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
        # SHA-256 of the records since the last checkpoint (inclusive): checkpoints and heads
        # sign it, so a verifier with only the public key can check those records.
        self._seg_hash = hashlib.sha256()
        self._epoch_records = 0
        self._epoch_started = time.monotonic()
        self._durable_seq = -1
        self._records_written = 0
        self._failed: BaseException | None = None
        self._closed = False
        self._stopping = False
        self._started = False
        self._fd = -1
        self._lock_fd = -1
        self._dir_fd = -1
        self._key = bytearray()
        self._mac: Any = None
        self._log_id = ""
        self._epoch = 0
        self._seq_next = 0
        self._head = fmt.GENESIS_PREV
        self._last_cp_seq = -1
        self._file_index = 1
        self._file_bytes = 0
        self._witnesses: list[AuditWitness] = []
        self._head_due: str | None = None
        self._witness_down: dict[str, str] = {}
        self._witness_unreported: list[str] = []
        self.heads_published = 0
        #: Publish a head with every durable commit (the default). ``False`` is only for
        #: measuring what that costs (the benchmark): heads then follow only the open record,
        #: checkpoints, critical events and the close, and acknowledged events between them
        #: are not witnessed.
        self.heads_every_commit = True
        self.recovered: dict[str, Any] | None = None
        self._signer = signing_key(keys)
        self.public_key = public_key_hex(self._signer)
        self._cipher = state_cipher(keys)
        self._state: ChainState | None = None
        self._resume: Resume | None = None
        self._files: list[Path] = []
        self._base_key: bytearray | None = None
        self._flusher: threading.Thread | None = None
        try:
            self._acquire_lock()
            self._prepare(keys)
        except BaseException:
            self._release()
            raise
        if witnesses is not None:
            self.start(witnesses)

    # ------------------------------------------------------------------ public

    @property
    def directory(self) -> Path:
        """The log directory."""
        return self._dir

    @property
    def records(self) -> int:
        """Records appended by this writer (events and chain records)."""
        return self._records_written

    @property
    def log_id(self) -> str:
        """The log's id (from its genesis)."""
        return self._log_id

    @property
    def started(self) -> bool:
        """Whether :meth:`start` ran."""
        return self._started

    def start(self, witnesses: Sequence[AuditWitness] = ()) -> None:
        """Check the log against ``witnesses``, then write setup / recovery / ``open``.

        Called once; the witnesses also receive every head from now on.

        :raises AuditError: a witness knows a later head of this log than the disk holds
            (rolled back, or its tail cut), or a required witness is unreadable; nothing was
            written. Also when a required witness cannot take the ``open`` head.
        """
        if self._started:
            raise AuditError(f"the audit chain writer of {self._dir} is already started")
        self._started = True
        self._witnesses = list(witnesses)
        try:
            self._open()
        except BaseException:
            self._closed = True
            self._release()
            raise
        self._flusher = threading.Thread(
            target=self._run_flusher, name="vramcore-audit-chain-flusher", daemon=True
        )
        self._flusher.start()
        self._raise_if_required_witness_down("the session's open record")

    def add_witnesses(self, witnesses: Sequence[AuditWitness]) -> None:
        """Publish future heads to ``witnesses`` too (they were not asked about the past)."""
        with self._lock:
            self._witnesses.extend(witnesses)

    @property
    def witness_news(self) -> bool:
        """Whether a witness is failing or has a failure not reported yet (a hint, read
        without the lock: :meth:`witness_check` decides)."""
        return bool(self._witness_down or self._witness_unreported)

    def witness_check(self, *, critical: bool) -> None:
        """Raise :class:`AuditError` to report witness failures, as a failing sink reports.

        For a critical event: only while a *required* witness is failing (fail closed). For
        another event: once for each failure not yet reported.
        """
        with self._lock:
            if not self._witness_down and not self._witness_unreported:
                return
            required = {w.name for w in self._witnesses if w.required}
            down = {n: why for n, why in self._witness_down.items() if n in required}
            fresh, self._witness_unreported = self._witness_unreported, []
            if critical and not down:
                self._witness_unreported = fresh  # report them on a non-critical event
                return
        if critical:
            raise AuditError(
                f"required audit witness(es) {_names(down)} could not keep the log's head; "
                "the critical event is in the log but the operation was refused (fail closed). "
                "Restore the witness (VRAMCORE_AUDIT_WITNESS) or stop requiring it"
            )
        if fresh:
            raise AuditError(
                f"audit witness(es) {', '.join(sorted(set(fresh)))} could not keep the log's "
                "head; the event itself is in the log"
            )

    def append_event(self, data: str, *, critical: bool) -> int:
        """Append an event record (``data``: canonical JSON); return its sequence number.

        Returns when the record is as durable as the configured mode promises: a critical
        event is durable (and its head witnessed) in every mode.
        """
        sync = self._sync_all or critical
        with self._lock:
            if self._failed is not None or self._closed or not self._started:
                self._check_usable()
            if (
                self._file_bytes >= self._cfg.max_bytes
                or self._epoch_records >= self._cfg.checkpoint_records
            ):
                self._roll_if_due()
            seq = self._seq_next
            line, mac = self._event_line(seq, data)
            self._queue_event(line, mac, notify=not sync)
            if sync:
                if critical:
                    self._want_head("critical")
            elif self._pending_bytes < _BATCH_BYTES:
                if time.monotonic() - self._first_pending_at <= self._cfg.flush_interval:
                    return seq
                # Records have waited longer than the flush interval: the committer is behind
                # (a slow disk). Wait for this one, so what a crash can lose stays bounded by
                # time, not by how far the queue has grown.
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

    def try_append_event(self, data: str) -> bool:
        """Queue a non-critical event record if that needs no waiting; return whether it did.

        The fast path of ``batched`` and ``mixed`` mode: the record is built, MACed and
        queued for the committer exactly as :meth:`append_event` queues it, and nothing is
        written. Returns ``False``, having appended nothing, whenever :meth:`append_event`
        would wait or do more than queue: ``immediate`` mode, a checkpoint or rotation due,
        the queue full or older than the flush interval, a witness failure to report, or the
        writer failed, closed or not started.
        """
        if self._sync_all or self.witness_news:
            return False
        if not self._lock.acquire(timeout=_NOWAIT_LOCK_SECONDS):
            return False  # the lock is held for µs: someone is stuck, let the lane time out
        try:
            if (
                self._failed is not None
                or self._closed
                or not self._started
                or self._file_bytes >= self._cfg.max_bytes
                or self._epoch_records >= self._cfg.checkpoint_records
                or (
                    self._pending
                    and time.monotonic() - self._first_pending_at > self._cfg.flush_interval
                )
            ):
                return False
            line, mac = self._event_line(self._seq_next, data)
            if self._pending_bytes + len(line) >= _BATCH_BYTES:
                return False  # the lane's append_event starts the commit and may wait
            self._queue_event(line, mac, notify=True)
            return True
        finally:
            self._lock.release()

    def flush(self) -> None:
        """Make every record appended so far durable."""
        with self._lock:
            self._check_usable()
            target = self._seq_next - 1
        self._commit_through(target)

    def close(self) -> None:
        """Write the closing checkpoint, make it durable, publish the head, wipe the key and
        release the log.

        :raises AuditError: the chain failed earlier, or a required witness could not take
            the closing head.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self._started:
                self._stopping = True
        if not self._started:
            self._release()
            return
        with self._lock:
            failed = self._failed
            if failed is None:
                self._checkpoint("close")
            self._stopping = True
            self._wake.notify_all()
            target = self._seq_next - 1
        if self._flusher is not None:
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
        self._raise_if_required_witness_down("the closing checkpoint")

    # --------------------------------------------------------------- sequencing

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise AuditError(
                f"audit chain in {self._dir} cannot write ({type(self._failed).__name__}: "
                f"{self._failed}); fix the storage and restart the worker"
            )
        if self._closed:
            raise AuditError(f"audit chain in {self._dir} is closed")
        if not self._started:
            raise AuditError(f"audit chain in {self._dir} is not started")

    def _want_head(self, reason: str) -> None:
        if self._witnesses and (
            self._head_due is None or _HEAD_RANK[reason] > _HEAD_RANK[self._head_due]
        ):
            self._head_due = reason

    def _event_line(self, seq: int, data: str) -> tuple[bytes, str]:
        """The event record ``seq`` and its MAC (``_record``, inlined: the hot path); the
        chain is not changed."""
        body = (
            f'{{"seq":{seq},"epoch":{self._epoch},"prev":"{self._head}",'
            f'"type":"event","data":{data}}}'
        ).encode("ascii")
        ctx = self._mac.copy()
        ctx.update(body)
        mac = ctx.hexdigest()
        return body[:-1] + b',"mac":"' + mac.encode("ascii") + b'"}\n', mac

    def _queue_event(self, line: bytes, mac: str, *, notify: bool) -> None:
        """Put the event record built by :meth:`_event_line` on the chain (lock held)."""
        self._seq_next += 1
        self._head = mac
        pending = self._pending
        if not pending:
            self._first_pending_at = time.monotonic()
            if notify:
                self._wake.notify()
        pending.append(line)
        size = len(line)
        self._pending_bytes += size
        self._file_bytes += size
        self._seg_hash.update(line)
        self._epoch_records += 1
        self._records_written += 1

    def _append_line(self, line: bytes, mac: str) -> int:
        seq = self._seq_next
        self._seq_next = seq + 1
        self._head = mac
        if not self._pending:
            self._first_pending_at = time.monotonic()
        self._pending.append(line)
        self._pending_bytes += len(line)
        self._file_bytes += len(line)
        self._seg_hash.update(line)
        self._epoch_records += 1
        self._records_written += 1
        return seq

    def _record(self, rtype: str, data: str) -> int:
        body = fmt.build_body(self._seq_next, self._epoch, self._head, rtype, data)
        line, mac = fmt.build_line(body, self._key)
        return self._append_line(line, mac)

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
        data: dict[str, Any] = {
            "head": self._head,
            "log_id": self._log_id,
            "reason": reason,
            "records": seq,
            "segment": self._seg_hash.hexdigest(),
            "ts": fmt.utc_now_text(),
        }
        line, mac = fmt.build_checkpoint(
            seq, self._epoch, self._head, data, self._key, self._signer.sign
        )
        self._append_line(line, mac)
        self._last_cp_seq = seq
        self._seg_hash = hashlib.sha256(line)
        self._evolve()
        self._pending.append(_SaveState(self._epoch, seq, self._head, bytearray(self._key)))
        self._want_head("close" if reason == "close" else "checkpoint")

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
            head_reason, self._head_due = self._head_due, None
            if (
                head_reason is None
                and self.heads_every_commit
                and self._witnesses
                and upto > self._durable_seq
            ):
                head_reason = "commit"  # every durable commit is witnessed
            head_mac = self._head
            head_segment = self._seg_hash.hexdigest()
            # The last record is in the current epoch unless it is the checkpoint that
            # ended the previous one.
            head_epoch = self._epoch - (1 if upto == self._last_cp_seq else 0)
        durable = False
        try:
            self._write(items)
            durable = True
            if head_reason is not None:
                self._publish(upto, head_epoch, head_mac, head_segment, head_reason)
        except BaseException as exc:
            if not durable:
                with self._lock:
                    self._failed = exc
                raise AuditError(
                    f"audit chain in {self._dir} could not write: {type(exc).__name__}: {exc}"
                ) from exc
            raise
        finally:
            for item in items:
                if isinstance(item, _SaveState):
                    item.key[:] = bytes(len(item.key))
            with self._lock:
                self._committing = False
                if durable:
                    self._durable_seq = max(self._durable_seq, upto)
                self._drained.notify_all()

    def _write(self, items: list[_Item]) -> None:
        chunk: list[bytes] = []
        dirty = False
        save: _SaveState | None = None
        for item in items:
            if isinstance(item, bytes):
                chunk.append(item)
                continue
            if isinstance(item, _SaveState):
                # Only the newest epoch key is ever needed; it is saved once the whole
                # commit is durable (the state never runs ahead of the log).
                save = item
                continue
            self._write_all(b"".join(chunk))
            chunk = []
            os.fsync(self._fd)
            dirty = False
            os.close(self._fd)
            self._fd = -1
            self._file_index += 1
            self._fd = self._open_log(self._file_index, create=True)
        if chunk:
            self._write_all(b"".join(chunk))
            dirty = True
        if dirty:
            os.fsync(self._fd)
        if save is not None:
            write_state(
                self._dir / fmt.STATE_NAME,
                self._cipher,
                ChainState(self._log_id, save.epoch, save.seq, save.head, save.key),
            )

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def _publish(self, seq: int, epoch: int, mac: str, segment: str, reason: str) -> None:
        """Sign the head at ``seq`` and give it to every witness (the committer calls this)."""
        head = Head.build(
            self._signer.sign,
            log_id=self._log_id,
            seq=seq,
            epoch=epoch,
            mac=mac,
            segment=segment,
            ts=fmt.utc_now_text(),
            reason=reason,
            public_key=self.public_key,
        ).to_dict()
        for witness in list(self._witnesses):
            try:
                witness.publish(head)
            except Exception as exc:
                log.error(
                    "audit witness %s failed to keep head %d of log %s: %s",
                    witness.name,
                    seq,
                    self._log_id,
                    type(exc).__name__,
                )
                with self._lock:
                    self._witness_down[witness.name] = type(exc).__name__
                    self._witness_unreported.append(witness.name)
            else:
                if witness.name in self._witness_down:
                    with self._lock:
                        self._witness_down.pop(witness.name, None)
        self.heads_published += 1

    def _raise_if_required_witness_down(self, what: str) -> None:
        with self._lock:
            required = {w.name for w in self._witnesses if w.required}
            down = {n: why for n, why in self._witness_down.items() if n in required}
        if down:
            raise AuditError(
                f"required audit witness(es) {_names(down)} could not keep the head of "
                f"{what} in {self._dir} (fail closed); restore the witness "
                "(VRAMCORE_AUDIT_WITNESS) or stop requiring it"
            )

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
        # The lock is held on the directory itself, which cannot be deleted while it holds
        # the log: removing or replacing chain.lock (which only shows the holder's pid)
        # cannot let a second writer in.
        try:
            self._dir_fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(
                f"cannot open the audit log directory {self._dir}: {exc.strerror}"
            ) from None
        try:
            fcntl.flock(self._dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = "?"
            with contextlib.suppress(OSError, ValueError, ConfigError):
                raw = fmt.read_bounded(self._dir / fmt.LOCK_NAME, 64)
                holder = raw.decode("ascii").strip() or "?"
            os.close(self._dir_fd)
            self._dir_fd = -1
            raise ConfigError(
                f"the audit log {self._dir} is in use by another writer (pid {holder[:20]}); "
                "give each worker process its own VRAMCORE_AUDIT_LOG directory"
            ) from None
        path = self._dir / fmt.LOCK_NAME
        with contextlib.suppress(OSError):
            if path.is_symlink() or not path.is_file():
                path.unlink()
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            self._lock_fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise ConfigError(
                f"cannot write {path} (it shows the writer's pid): {exc.strerror}; remove it"
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
        if self._dir_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._dir_fd)  # releases the flock
            self._dir_fd = -1
        self._key[:] = bytes(len(self._key))
        self._key = bytearray()
        self._mac = None
        for secret in (self._base_key, self._state.key if self._state is not None else None):
            if secret is not None:
                secret[:] = bytes(len(secret))
        self._base_key = None
        if self._resume is not None:
            self._resume.key[:] = bytes(len(self._resume.key))
            self._resume = None

    def _open_log(self, index: int, *, create: bool) -> int:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_CREAT
        if create:
            flags |= os.O_EXCL
        fd = os.open(self._dir / fmt.log_file_name(index), flags, 0o600)
        if create:
            fsync_dir(self._dir)
        return fd

    def _prepare(self, keys: SinkContext) -> None:
        """Read the state and the log's tail; decide between setup and resuming (no writes)."""
        files = fmt.log_files(self._dir)
        for _, path in files:
            if not stat.S_ISREG(path.lstat().st_mode):
                raise AuditError(
                    f"{path} is not a regular file (a link, device or FIFO): the writer will not "
                    "append to this log. Keep the directory for the auditor and start a new one"
                )
        state = read_state(self._dir / fmt.STATE_NAME, self._cipher)
        self._state = state
        if (
            state is not None
            and state.seq == -1
            and len(files) == 1
            and files[0][1].stat().st_size == 0
        ):
            files = []  # setup stopped after creating the first file: _setup starts it again
        if not files:
            if state is not None and state.seq >= 0:
                raise AuditError(
                    f"the audit chain state in {self._dir} records a log of at least "
                    f"{state.seq + 1} records, but no log file is there: the log was deleted "
                    "or moved. Restore it, or move the directory away to start a new log"
                )
            if state is None:
                if self._cfg.initial_key_path.exists():
                    raise _key_file_conflict(self._cfg.initial_key_path)
                base = keys.derive_key(fmt.CHAIN_KEY_PURPOSE)
                self._base_key = bytearray(base.export())
                base.wipe()
            return
        if state is None:
            raise AuditError(
                f"{self._dir} holds audit log files but no chain state ({fmt.STATE_NAME}); "
                "the writer cannot continue this log. Restore the state file, or move the "
                "log away (keep it for the auditor) to start a new one"
            )
        self._files = [path for _, path in files]
        self._resume = recover(self._dir, files, state)
        self._log_id = state.log_id

    def _open(self) -> None:
        resume = self._resume
        if resume is None:
            self._setup()
            clean = True
        else:
            self._check_witnesses(resume)
            self._key = resume.key
            self._mac = fmt.mac_context(self._key)
            self._epoch = resume.epoch
            self._seq_next = resume.next_seq
            self._head = resume.head
            self._last_cp_seq = resume.cp_seq if resume.tail[-1].seq == resume.cp_seq else -1
            self._seg_hash = hashlib.sha256(b"".join(resume.segment_lines))
            self._epoch_records = resume.epoch_records
            self._file_index = resume.file_index
            self._file_bytes = resume.file_bytes
            quarantine = quarantine_tail(self._dir, resume)
            if resume.rotated:
                # The writer stopped between a rotate checkpoint and the next file.
                self._file_index += 1
                self._file_bytes = 0
                self._fd = self._open_log(self._file_index, create=True)
            else:
                self._fd = self._open_log(self._file_index, create=False)
            clean = resume.clean
            if resume.state_stale:
                write_state(
                    self._dir / fmt.STATE_NAME,
                    self._cipher,
                    ChainState(self._log_id, self._epoch, resume.cp_seq, resume.cp_mac, self._key),
                )
            if quarantine is not None:
                self.recovered = quarantine
                data = dict(quarantine, ts=fmt.utc_now_text())
                self._record(fmt.RECOVERY, fmt.canonical_json(data))
            self._resume = None  # the key now belongs to the writer
        if self._state is not None:
            self._state.wipe()
            self._state = None
        open_data = {
            "clean": clean,
            "device": self._device,
            "pid": os.getpid(),
            "ts": fmt.utc_now_text(),
            "worker_id": self._worker_id,
        }
        self._record(fmt.OPEN, fmt.canonical_json(open_data))
        self._want_head("open")
        with self._lock:
            upto = self._seq_next - 1
            self._committing = True
            items, self._pending = self._pending, []
            self._pending_bytes = 0
            head_reason, self._head_due = self._head_due, None
            segment = self._seg_hash.hexdigest()
        try:
            self._write(items)
            self._durable_seq = upto
            if head_reason is not None:
                self._publish(upto, self._epoch, self._head, segment, head_reason)
        finally:
            with self._lock:
                self._committing = False

    def _check_witnesses(self, resume: Resume) -> None:
        """Refuse to go on when a witness knows a later head of this log than the disk holds."""
        public = self._signer.public_key()
        by_seq = {rec.seq: rec for rec in resume.tail}
        last = resume.next_seq - 1
        for witness in self._witnesses:
            try:
                raw = witness.latest(self._log_id)
            except Exception as exc:
                if witness.required:
                    raise AuditError(
                        f"required audit witness {witness.name} cannot be read "
                        f"({type(exc).__name__}), so the writer cannot tell whether the log in "
                        f"{self._dir} was rolled back; it refuses to start (fail closed)"
                    ) from None
                log.warning("audit witness %s cannot be read: %s", witness.name, type(exc))
                self._witness_unreported.append(witness.name)  # reported on the next emit
                continue
            if raw is None:
                continue
            head = Head.parse(raw)
            if head is None or head.log_id != self._log_id or not head.signed_by(public):
                # Someone who may append to the witness put a head there that this log did
                # not sign, and the witness took it for the newest: the real newest is hidden.
                if witness.required:
                    raise AuditError(
                        f"required audit witness {witness.name} returned a head of the log in "
                        f"{self._dir} that its key did not sign: the witness was written by "
                        "someone else, so the writer cannot tell whether the log was rolled "
                        "back; it refuses to start (fail closed)"
                    )
                log.warning(
                    "audit witness %s returned a head that this log's key did not sign",
                    witness.name,
                )
                self._witness_unreported.append(witness.name)
                continue
            if head.seq > last:
                raise AuditError(
                    f"witness {witness.name} saw the audit log in {self._dir} reach record "
                    f"{head.seq} ({head.reason}, {head.ts}), but the log on disk ends at "
                    f"record {last}: records were removed (an old copy of the log and "
                    f"{fmt.STATE_NAME} put back, or its tail cut after a crash). The writer "
                    "refuses to continue it; keep the directory for the auditor (`vramcore "
                    "audit verify DIR --anchor WITNESS`) and start a new log elsewhere"
                )
            rec = by_seq.get(head.seq)
            if rec is None:
                # Older than the last checkpoint (a witness that missed heads since): scan.
                rec = fmt.record_at(self._files, head.seq)
            if rec is not None and rec.mac.decode("ascii") != head.mac:
                raise AuditError(
                    f"witness {witness.name} saw another record {head.seq} in the audit log "
                    f"in {self._dir} ({head.ts}) than the disk holds: the log was rolled back "
                    "and rewritten. The writer refuses to continue it; keep the directory for "
                    "the auditor (`vramcore audit verify DIR --anchor WITNESS`)"
                )

    def _setup(self) -> None:
        """Start a new log. Every step can be interrupted and resumed: the state (holding the
        initial key) is saved first, then the auditor's key file, the public key, the file."""
        state = self._state
        if state is None:
            assert self._base_key is not None
            key = fmt.initial_key(self._base_key, secrets.token_bytes(32))
            self._base_key[:] = bytes(len(self._base_key))
            self._base_key = None
            state = ChainState(secrets.token_hex(16), 0, -1, fmt.GENESIS_PREV, key)
            self._state = state
            write_state(self._dir / fmt.STATE_NAME, self._cipher, state)
        self._ensure_key_file(state)
        write_private_file(
            self._dir / fmt.PUBLIC_KEY_NAME, (self.public_key + "\n").encode(), replace=True
        )
        self._log_id = state.log_id
        self._key = bytearray(state.key)
        self._mac = fmt.mac_context(self._key)
        self._epoch = 0
        self._seq_next = 0
        self._head = fmt.GENESIS_PREV
        self._file_index = 1
        self._file_bytes = 0
        first = self._dir / fmt.log_file_name(1)
        with contextlib.suppress(FileNotFoundError):
            if first.stat().st_size == 0:
                first.unlink()  # created by a setup that stopped before the genesis
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

    def _ensure_key_file(self, state: ChainState) -> None:
        """Write the auditor's key file, unless this log's own is already there."""
        path = self._cfg.initial_key_path
        if path.exists():
            try:
                existing = load_key_file(path)
            except ConfigError:
                raise _key_file_conflict(path) from None
            if existing.log_id != state.log_id or existing.key_id != fmt.key_id(state.key):
                raise _key_file_conflict(path)
            return
        write_key_file(path, log_id=state.log_id, key=state.key, public_key=self.public_key)


def _key_file_conflict(path: Path) -> ConfigError:
    return ConfigError(
        f"{path} already exists; it belongs to another audit log. Move it away (to the "
        "auditor) before starting a new log here, or set VRAMCORE_AUDIT_INITIAL_KEY_FILE"
    )


def _names(down: dict[str, str]) -> str:
    return ", ".join(f"{name} ({why})" for name, why in sorted(down.items()))
