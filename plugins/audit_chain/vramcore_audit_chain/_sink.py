"""The audit sink the plugin gives every manager: events into the chain, a verdict at close."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

from vramcore.audit import AuditSink, AuditWitness, SinkContext
from vramcore.errors import AuditError, ConfigError
from vramcore.events import AuditEvent
from vramcore_audit_chain._config import ChainConfig
from vramcore_audit_chain._encode import encode_event
from vramcore_audit_chain._keys import load_key_file, load_public_key
from vramcore_audit_chain._thinning import Thinning
from vramcore_audit_chain._verify import verify_log
from vramcore_audit_chain._writer import ChainWriter

__all__ = ["ChainSink"]


class ChainSink(AuditSink):
    """Writes every event to the hash-chained log in ``config.directory``.

    :param config: the chain settings (:meth:`ChainConfig.from_env` reads them).
    :param context: the manager's worker id, device and key derivation.
    :param witnesses: where the log's heads go. ``None`` (what the plugin's hook passes)
        waits for :meth:`attach_witnesses` before writing anything, so that the writer can
        compare the log with what the witnesses know first.
    :raises ConfigError: the directory is held by another writer or unusable.
    :raises AuditError: the existing log does not continue cleanly, or a witness knows a
        later head of it than the disk holds.
    """

    name = "audit_chain"

    def __init__(
        self,
        config: ChainConfig,
        context: SinkContext,
        *,
        witnesses: Sequence[AuditWitness] | None = (),
    ) -> None:
        self.config = config
        self._writer = ChainWriter(
            config,
            context,
            worker_id=context.worker_id,
            device=context.device,
            witnesses=witnesses,
        )
        self._closed = False
        self._report: dict[str, Any] | None = None
        self._thinning = (
            Thinning(config.thin_verified_seconds) if config.thin_verified_seconds > 0 else None
        )
        self._worker_id = context.worker_id

    @property
    def public_key(self) -> str:
        """The checkpoint public key (hex)."""
        return self._writer.public_key

    @property
    def recovered(self) -> Mapping[str, Any] | None:
        """What start-up recovery quarantined, if anything."""
        return self._writer.recovered

    @property
    def log_id(self) -> str:
        """The log's id."""
        return self._writer.log_id

    def attach_witnesses(self, witnesses: Sequence[AuditWitness]) -> None:
        """Start the log with ``witnesses`` (refusing a log they show was cut back), or add
        them to a started one."""
        if self._writer.started:
            self._writer.add_witnesses(witnesses)
        else:
            self._writer.start(witnesses)

    def emit(self, event: AuditEvent) -> None:
        """Append ``event``; returns once it is as durable as the durability mode promises.

        :raises AuditError: the log cannot be written; or a witness failed (see
            :meth:`ChainWriter.witness_check`): for a critical event only a required one.
        """
        if not self._writer.started:
            self._writer.start(())
        encoded = encode_event(event)
        if self._thinning is None:
            self._writer.append_event(encoded, critical=event.critical)
        else:
            for record in self._thinning.records(event, encoded):
                self._writer.append_event(record, critical=event.critical)
        self._writer.witness_check(critical=event.critical)

    def emit_nowait(self, event: AuditEvent) -> bool:
        """Queue a non-critical ``event`` for the committer if that needs no waiting (see
        :meth:`ChainWriter.try_append_event`); return whether it did.

        The same record as :meth:`emit` writes, as durable as :meth:`emit` makes it in this
        mode (``batched`` and ``mixed`` queue a non-critical event and return); everything
        else (a critical event, ``immediate`` mode, a wait, a failure to report) returns
        ``False`` having written nothing, and the core then calls :meth:`emit`. With
        thinning on, only a verification that thinning drops takes this path.
        """
        writer = self._writer
        if event.critical or not writer.started or writer.witness_news:
            return False
        if self._thinning is not None:
            return self._thinning.drop(event)  # what emit does with it: count it, write nothing
        return writer.try_append_event(encode_event(event))

    def flush(self) -> None:
        """Fsync everything emitted so far."""
        if self._writer.started:
            self._writer.flush()

    def close(self) -> None:
        """Write the closing checkpoint and release the log."""
        if self._closed:
            return
        self._closed = True
        if self._thinning is not None and self._writer.started:
            with contextlib.suppress(AuditError):  # failed earlier: close() raises it below
                for record in self._thinning.pending(self._worker_id):
                    self._writer.append_event(record, critical=False)
        self._writer.close()

    def report(self) -> Mapping[str, Any] | None:
        """After :meth:`close`: verify the log just written and summarise it.

        Verifies with the auditor's initial key file while it is still where setup wrote it
        (full verification), else with the public key (checkpoints only).
        """
        base: dict[str, Any] = {
            "path": str(self.config.directory),
            "written": self._writer.records,
            "durability": self.config.durability.value,
            "public_key": self.public_key,
            "heads_published": self._writer.heads_published,
        }
        if self._thinning is not None:
            base["thinned_verifications"] = self._thinning.thinned
        if not self._closed:
            return {**base, "open": True}
        if self._report is None:
            self._report = {**base, **self._verify()}
        return self._report

    def _verify(self) -> dict[str, Any]:
        key_path = self.config.initial_key_path
        try:
            if key_path.exists():
                key = load_key_file(key_path)
                result = verify_log(
                    [self.config.directory],
                    initial_key=key.initial_key,
                    expected_log_id=key.log_id,
                )
            else:
                result = verify_log(
                    [self.config.directory], public_key=load_public_key(self.public_key)
                )
        except ConfigError as exc:
            return {"verified": False, "reason": "unverifiable", "detail": str(exc)}
        out: dict[str, Any] = {
            "verified": result.ok,
            "mode": result.mode,
            "records": result.records,
            "checkpoints": result.checkpoints,
            "log_id": result.log_id,
        }
        if not result.ok:
            out.update(reason=result.reason, detail=result.detail, file=result.file)
        out["hint"] = f"check it offline: vramcore audit verify {self.config.directory} " + (
            f"--key-file {key_path}" if key_path.exists() else "--public-key checkpoint.pub"
        )
        if key_path.exists():
            out["warning"] = (
                f"the auditor's initial key is still at {key_path}: move it off this host "
                "(to the auditor); while it is here the log is not forward-secure"
            )
        return out
