"""The VramManager: the facade that seals shards into VRAM, verifies them, frees them.

It owns the backend, the residency table, the audit sinks and the seal key and delegates:
start-up to :class:`vramcore._startup.Startup`, a seal to :class:`vramcore._sealing.Sealing`,
a verification to :class:`vramcore._verification.Verification`, a directory to
:class:`vramcore._sealdir.SealDir`; every digest comes from :mod:`vramcore._digests`. It is
thread-safe; nothing stays allocated when a seal fails; no message, event or repr carries
the token, the seal key, a signature or a pointer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Literal

from vramcore._core import CLOSED, raise_close_errors
from vramcore._loading import (
    MemorySource,
    Source,
    as_bytes_view,
    check_readers,
    default_readers,
    staging_for,
)
from vramcore._residency import Residency
from vramcore._sealdir import ModelCheck, SealDir, SealedModel
from vramcore._sealing import CROSS_CHECKS, Sealing, open_file
from vramcore._startup import Startup, make_backend
from vramcore._verification import (
    ScrubTarget,
    Verification,
    check_sample,
    fail,
    refuse_absent,
    seal_problem,
)
from vramcore.audit import DEFAULT_SINK_TIMEOUT, AuditMode, AuditSink, AuditTrail
from vramcore.backend import AllocatorBackend, DeviceBuffer
from vramcore.digest import DEFAULT_LEAF_SIZE, default_workers
from vramcore.errors import InvalidInput, ManagerClosed
from vramcore.plugins import get_plugin_manager
from vramcore.policy import VramPolicy, check_policy
from vramcore.scrub import Scrubber, ScrubberSlot
from vramcore.seal import SecretValue, WorkerToken
from vramcore.shard import SealedShard
from vramcore.validation import (
    check_flag,
    check_leaf_size,
    check_path,
    check_seconds,
    check_shard_id,
    check_size,
    check_workers,
    clean_text,
)

__all__ = ["DEFAULT_CHUNK_BYTES", "DEFAULT_CLOSE_TIMEOUT", "VramManager"]

log = logging.getLogger("vramcore")

#: Host staging size for file loads and VRAM read-back (two such buffers at most in flight).
DEFAULT_CHUNK_BYTES = 8 << 20
#: Seconds :meth:`VramManager.close` waits for seals and verifications in progress.
DEFAULT_CLOSE_TIMEOUT = 30.0


class VramManager:
    """Seal model shards into VRAM and verify them before every use.

    :param worker_token: the worker's secret (``str``/``bytes``, at least 16 bytes, or a
        :class:`~vramcore.seal.WorkerToken`); it must be given.
    :param device: device index on the backend.
    :param allocator: backend name, a ready :class:`~vramcore.backend.AllocatorBackend`
        (not closed by the manager), or ``None`` to use ``VRAMCORE_ALLOCATOR`` or the best
        viable backend.
    :param worker_id: public id put on every audit event (default ``host:pid``).
    :param plugin_manager: plugins to use (default: installed ones, see
        :func:`vramcore.plugins.get_plugin_manager`).
    :param audit: ``"required"`` (refuse to start with no durable audit sink; a sink that
        cannot record a critical event fails the operation), ``"best_effort"`` (every sink
        gets every event, none can stop an operation: telemetry-only deployments) or
        ``"disabled"`` (no sinks are created, explicitly).
    :param policy: the VRAM-only policy (default: :class:`~vramcore.policy.VramPolicy()`).
    :param leaf_size: Merkle leaf size (a multiple of 4096; default 65536).
    :param chunk_bytes: host staging buffer size for file loads and VRAM read-back.
    :param hash_workers: threads hashing leaves on the host (default ``VRAMCORE_HASH_WORKERS``
        or the number of cores).
    :param read_threads: threads reading a file into the staging buffers of
        :meth:`seal_file`, each hashing what it read (default ``VRAMCORE_READ_THREADS``, else
        the hash workers up to 8; at most 64).
    :param close_timeout: seconds :meth:`close` waits for operations in progress.
    :param audit_timeout: seconds an audit sink may take to record one event; a sink that
        takes longer counts as failed (fail closed for critical events).
    :param seal_key_provider: the plugin that provides the seal key (default
        ``VRAMCORE_SEAL_KEY_PROVIDER``; none: the key is derived from the token and no plugin
        is asked; see :func:`~vramcore.hookspecs.vramcore_seal_key`).

    :raises InvalidInput: an argument of the wrong type or value.
    :raises AuditError: ``audit="required"`` and no plugin provided a durable sink.
    :raises PolicyViolation: the device breaks the VRAM-only policy (audited first).
    :raises BackendUnavailable: the allocator cannot be used here.
    :raises ConfigError: a plugin answered a hook with something unusable.
    """

    def __init__(
        self,
        worker_token: str | bytes | WorkerToken,
        device: int = 0,
        *,
        allocator: str | AllocatorBackend | None = None,
        worker_id: str | None = None,
        plugin_manager: Any = None,
        audit: AuditMode = "required",
        policy: VramPolicy | None = None,
        leaf_size: int = DEFAULT_LEAF_SIZE,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        hash_workers: int | None = None,
        read_threads: int | None = None,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        audit_timeout: float = DEFAULT_SINK_TIMEOUT,
        seal_key_provider: str | None = None,
    ) -> None:
        secret = SecretValue(worker_token)  # from here on no frame holds the raw token
        del worker_token
        self.leaf_size = check_leaf_size(leaf_size)
        check_size(chunk_bytes, field="chunk_bytes")
        workers = default_workers() if hash_workers is None else check_workers(hash_workers)
        self._readers = (
            default_readers(workers) if read_threads is None else check_readers(read_threads)
        )
        self._close_timeout = check_seconds(close_timeout, field="close_timeout")
        self._token = WorkerToken.adopt(secret)
        self.worker_id = clean_text(
            worker_id if worker_id is not None else f"{socket.gethostname()}:{os.getpid()}",
            field="worker_id",
            limit=256,
        )
        self.policy = check_policy(policy)
        self._chunk_bytes = max(self.leaf_size, chunk_bytes // self.leaf_size * self.leaf_size)
        self._pm = plugin_manager if plugin_manager is not None else get_plugin_manager()
        self._residency = Residency()
        self._closed = False
        self._audit = AuditTrail(
            self._pm, check_seconds(audit_timeout, field="audit_timeout"), mode=audit
        )
        self._startup = Startup(
            self._pm,
            self._audit,
            self._token,
            worker_id=self.worker_id,
            policy=self.policy,
            key_provider=seal_key_provider,
        )
        self._owns_backend = not isinstance(allocator, AllocatorBackend)
        self._backend: AllocatorBackend | None = None
        self._scrubber = ScrubberSlot()
        try:
            self._backend = make_backend(self._pm, allocator)
            self._staging = staging_for(self._backend, self._chunk_bytes)
            self._core = self._startup.run(
                self._backend,
                device,
                leaf_size=self.leaf_size,
                staging=self._staging,
                workers=workers,
                residency=self._residency,
            )
            self.device: int = self._core.device
            self.device_info = self._core.device_info
        except BaseException:
            self._teardown(close_backend=True)
            raise

    def available_vram(self) -> int:
        """Free bytes on the device now (as the backend reports them)."""
        self._check_open()
        return self._core.backend.mem_info(self.device)[0]

    def total_vram(self) -> int:
        """Total bytes of the device."""
        self._check_open()
        return self._core.backend.mem_info(self.device)[1]

    def used_vram(self) -> int:
        """Bytes this manager holds on the device (sealed shards and seals in progress)."""
        return self._residency.used

    def seal_model(
        self,
        data: bytes | bytearray | memoryview,
        *,
        shard_id: str | None = None,
        expected_sha256: str | None = None,
        compute_sha256: bool = False,
        cross_check: Literal["sample", "full"] = "sample",
    ) -> SealedShard:
        """Copy ``data`` into VRAM and seal it.

        ``data`` must not change until this returns (the copy and the hashes read it).

        :param data: the shard's bytes (any C-contiguous buffer).
        :param shard_id: a name (1-256 of ``[A-Za-z0-9._:-]``, no ``..``); default a random id.
        :param expected_sha256: the SHA-256 the bytes must have; computed while copying and
            checked before the shard is sealed (on mismatch nothing stays allocated).
        :param compute_sha256: record the bytes' SHA-256 in the seal even without
            ``expected_sha256`` (it costs one more pass of hashing, overlapped with the copy).
        :param cross_check: how a device digest is checked against host hashes of the bytes
            as they were staged for the copy: ``"sample"`` (four CSPRNG-drawn leaves of every
            copy chunk, so a lost or stale chunk is always caught, and the device's root
            rebuilt from its own leaves) or ``"full"`` (every leaf). Without a device digest
            every leaf is host-hashed.
        :raises IntegrityViolation: ``expected_sha256`` does not match (``sha256_mismatch``),
            or the bytes in VRAM are not the bytes staged (``cross_check``).
        :raises InsufficientVram: the device lacks room.
        """
        self._check_open()
        source = MemorySource(
            as_bytes_view(data),
            self._chunk_bytes,
            expected_sha256=expected_sha256,
            want_sha256=check_flag(compute_sha256, field="compute_sha256"),
        )
        return self._seal(_new_shard_id(shard_id), source, cross_check)

    def seal_file(
        self,
        path: str | os.PathLike[str],
        *,
        shard_id: str | None = None,
        expected_sha256: str | None = None,
        compute_sha256: bool = False,
        progress: Callable[[int, int], None] | None = None,
        cross_check: Literal["sample", "full"] = "sample",
    ) -> SealedShard:
        """Stream a file into VRAM, byte for byte, and seal it.

        The file is read in ``chunk_bytes`` chunks through two staging buffers (pinned ones
        when the backend lends them): host memory stays bounded whatever the file size, and
        reading, copying and hashing overlap. A ``.safetensors`` file is sealed whole (header
        included) and its tensor map recorded, so a failed verification names the tensors.

        :param shard_id: default: the file name when it is a valid shard id, else a random id.
        :param expected_sha256: the file's published SHA-256; computed while loading (on a
            thread of its own) and checked before the shard is sealed.
        :param compute_sha256: record the file's SHA-256 in the seal without checking it.
        :param progress: called as ``progress(bytes_loaded, total_bytes)`` after each chunk.
        :param cross_check: as for :meth:`seal_model`.
        :raises InvalidInput: the path is missing, not a regular file, or empty.
        :raises IntegrityViolation: SHA-256 mismatch, a malformed safetensors header, the
            file changed size (or its safetensors header changed) while being read, or the
            bytes in VRAM are not the bytes staged (``cross_check``).
        """
        self._check_open()
        p = check_path(path)
        if progress is not None and not callable(progress):
            raise InvalidInput("progress must be callable as progress(done, total)")
        if shard_id is None:
            with contextlib.suppress(InvalidInput):
                shard_id = check_shard_id(p.name)
        sid = _new_shard_id(shard_id)
        want = check_flag(compute_sha256, field="compute_sha256")
        source = open_file(
            self._core,
            sid,
            p,
            self._chunk_bytes,
            expected_sha256,
            want_sha256=want,
            progress=progress,
            readers=self._readers,
        )
        return self._seal(sid, source, cross_check)

    def _seal(self, shard_id: str, source: Source, cross_check: object) -> SealedShard:
        if cross_check not in CROSS_CHECKS:
            raise InvalidInput(f"cross_check must be 'sample' or 'full', got {cross_check!r:.40}")
        sealing = Sealing(
            self._core, shard_id, source, staging=self._staging, cross_check=str(cross_check)
        )
        return sealing.run()

    def seal_dir(
        self,
        path: str | os.PathLike[str],
        *,
        signature: str | os.PathLike[str] | None = None,
        public_key: str | os.PathLike[str] | None = None,
        shard_prefix: str | None = None,
        parallel: int | None = None,
    ) -> SealedModel:
        """Seal a model directory: one shard per file, all or nothing (:mod:`vramcore._sealdir`).

        Reads ``model.safetensors.index.json`` when present (its ``weight_map`` must agree with
        the shards' headers), else seals every ``*.safetensors``. With ``signature`` (an OpenSSF
        Model Signing bundle) and ``public_key`` (the publisher's PEM key), every file must be
        signed and each shard's SHA-256 is checked against the signed manifest as its bytes are
        copied. Audited as ``vram.model_sealed`` (with the key fingerprint and manifest digest).
        The returned attestation is signed under this worker's key (:meth:`verify_model`).

        :param shard_prefix: shard ids are ``<prefix>:<file>`` (default: the directory's name).
        :param parallel: shards sealed at once, each with its own SHA-256 stream (default:
            one per four CPUs, at most 4, and at least 2 for a signed seal on 2 CPUs or more;
            see :mod:`vramcore._sealdir`). The result, the
            audit trail's per-shard order and the all-or-nothing rule do not depend on it.
        :raises InvalidInput: not a model directory, not a bundle or key, or a bad
            ``parallel`` (usage).
        :raises IntegrityViolation: the directory's parts disagree, a file escapes it, the
            signature does not verify or cover the files, or a file is not the one signed.
        """
        self._check_open()
        return SealDir(
            self,
            path,
            signature=signature,
            public_key=public_key,
            shard_prefix=shard_prefix,
            parallel=parallel,
            signer=self._core,
            emitter=self._core.emitter,
        ).run()

    def verify_model(self, model: SealedModel, *, sample: float | int | None = None) -> None:
        """Check a model attestation's own signature, then verify every shard it lists.

        The attestation's signature covers the list of shards, their files and order, the
        index and the publisher (key fingerprint, manifest digest): an edited attestation, or
        one another worker sealed, fails before any shard is read. Each shard is then
        verified from VRAM as by :meth:`verify_sealed` (``sample`` as there).

        :raises SealVerificationFailed: the attestation's signature (``reason="signature"``,
            audited) or a shard (see :meth:`verify_sealed`).
        :raises NotSealed: a shard it lists is not resident here.
        """
        self._check_open()
        wanted = check_sample(sample)
        ModelCheck(self._core, self._core.emitter, model).run()
        for shard in model.shards:
            self.verify_sealed(shard, sample=wanted)

    def verify_attestation(self, attestation: SealedShard | SealedModel) -> None:
        """Check the signatures of an attestation read back (``from_json``), without VRAM.

        For a :class:`~vramcore.SealedModel`, its own signature and every shard's; for a
        :class:`~vramcore.SealedShard`, its seal. Each must be valid under this worker's key
        and name this manager's device. The shards need not be resident: this says the
        attestation is one this worker signed, unedited; only :meth:`verify_sealed` /
        :meth:`verify_model` in the process holding the shards checks the bytes in VRAM.

        :raises SealVerificationFailed: a signature does not verify (``"signature"``) or the
            device differs (``"device"``); audited.
        """
        self._check_open()
        if isinstance(attestation, SealedModel):
            ModelCheck(self._core, self._core.emitter, attestation).run()
            shards = attestation.shards
        elif isinstance(attestation, SealedShard):
            shards = (attestation,)
        else:
            raise InvalidInput(
                f"expected a SealedShard or a SealedModel, got {type(attestation).__name__}"
            )
        for shard in shards:
            problem = seal_problem(shard, self._core.key(), self.device, None)
            if problem is not None:
                fail(self._core, shard, problem)

    def verify_sealed(self, shard: SealedShard, *, sample: float | int | None = None) -> None:
        """Check ``shard``'s signature and recompute its digest from VRAM.

        :param sample: ``None`` (default) re-hashes every byte and compares the root. A float
            in ``(0, 1]`` (a fraction of the leaves) or an int ``>= 1`` (a number of leaves)
            re-hashes that many leaves, drawn afresh by a CSPRNG on every call, and compares
            them with the sealed leaf hashes (checked against the signed root once). ``k`` of
            ``n`` leaves catch ``c`` corrupted ones with probability at least
            ``1 - (1 - k/n)**c`` (1 % of the leaves, 300 corrupted: 95 %).
        :raises SealVerificationFailed: bad signature (``reason="signature"``), another
            device (``"device"``), a seal that is not the resident one (``"stale"``), a shard
            a scrub quarantined (``"quarantined"``), bytes that changed (``"digest"``, with
            ``corrupted_ranges`` and ``tensors``), or bytes that could not be read or hashed
            (``"digest_failed"``). Audited as a critical event first.
        :raises NotSealed: no shard with this id is resident here.
        :raises ManagerClosed: the manager is closed (or closes meanwhile).
        """
        with self.verified(shard, sample=sample):
            pass

    @contextlib.contextmanager
    def verified(
        self, shard: SealedShard, *, sample: float | int | None = None
    ) -> Iterator[DeviceBuffer]:
        """Verify ``shard`` (see :meth:`verify_sealed`), then yield its device buffer.

        The buffer stays allocated until the block exits, even if another thread asks to
        deallocate the shard meanwhile. Use ``buffer.native`` for the backend's own object.
        """
        self._check_open()
        if not isinstance(shard, SealedShard):
            raise InvalidInput(f"expected a SealedShard, got {type(shard).__name__}")
        wanted = check_sample(sample)
        with self._residency.reading(shard.shard_id) as resident:
            with self._residency.operation():
                if resident is None:
                    refuse_absent(self._core, shard)
                Verification(self._core, shard, resident).run(wanted)
            yield resident.buffer

    def scrub(self, bytes_per_second: int, *, slice_seconds: float = 0.1) -> Scrubber:
        """Start re-verifying every sealed shard continuously, within ``bytes_per_second``.

        Opt-in background scrubbing: a daemon thread walks the resident shards leaf range by
        leaf range, re-hashing from VRAM and comparing with the sealed leaves, never faster
        than the budget. A corrupted shard is quarantined (:meth:`verified` refuses it, reason
        ``"quarantined"``, until it is deallocated and sealed again) and audited as a failed
        verification; a shard whose bytes cannot be read is audited (``"digest_failed"``)
        and skipped. It stops with :meth:`close` or its own :meth:`~vramcore.scrub.Scrubber.stop`.

        :param bytes_per_second: the budget, at least one leaf per second.
        :param slice_seconds: how much of the budget one step spends (smaller: smoother).
        :raises InvalidInput: a bad budget, or a scrubber already runs.
        """
        self._check_open()
        scrubber = Scrubber(ScrubTarget(self._core), bytes_per_second, slice_seconds=slice_seconds)
        return self._scrubber.start(scrubber)

    def deallocate(self, shard: SealedShard | str) -> None:
        """Free a shard's VRAM. Waits for open :meth:`verified` blocks on it to exit.

        :raises NotSealed: the shard is not resident here.
        :raises InvalidInput: called from inside a ``verified()`` block of the same shard.
        """
        self._check_open()
        shard_id = shard.shard_id if isinstance(shard, SealedShard) else check_shard_id(shard)
        with self._residency.operation():
            resident = self._residency.take(shard_id)
            self._core.release_buffer(shard_id, resident.buffer)

    def shards(self) -> list[SealedShard]:
        """The seals of every shard resident on this manager."""
        return self._residency.seals()

    def _check_open(self) -> None:
        if self._closed:
            raise ManagerClosed(CLOSED)

    def close(self) -> None:
        """Free every resident shard, flush and close the sinks, wipe the key and token.

        Waits for :meth:`verified` blocks to exit and, up to ``close_timeout`` seconds, for
        seals and verifications in progress (those still running then fail with
        :class:`~vramcore.errors.ManagerClosed` at their next step). Only then is the backend
        closed; if an operation is still stuck in the backend, the backend is left open
        rather than closed under it, and this raises. Idempotent. Raises
        :class:`~vramcore.errors.AuditError` after cleaning up if a sink failed to close.
        """
        self._scrubber.stop()
        residents = self._residency.take_all()
        if residents is None:
            return
        stuck = self._residency.wait_idle(self._close_timeout)
        errors = self._core.release_all(residents) + self._teardown(close_backend=not stuck)
        raise_close_errors(stuck, self._close_timeout, errors)

    def _teardown(self, *, close_backend: bool) -> list[BaseException]:
        self._closed = True
        errors = self._audit.close()
        if close_backend and self._owns_backend and self._backend is not None:
            try:
                self._backend.close()
            except Exception as exc:
                errors.append(exc)
        for secret in (self._startup.key, self._startup.plugin_keys, self._token):
            if secret is not None:
                secret.wipe()
        return errors

    @property
    def sinks(self) -> tuple[AuditSink, ...]:
        """The audit sinks this manager delivers to."""
        return self._audit.sinks

    @property
    def backend_name(self) -> str:
        """Name of the allocator backend in use."""
        return self._backend.name if self._backend is not None else "?"

    @property
    def token_fingerprint(self) -> str:
        """The worker token's fingerprint (safe to log)."""
        return self._token.fingerprint

    def __enter__(self) -> VramManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if not hasattr(self, "_residency"):  # __init__ failed early (a traceback shows it)
            return "<VramManager not started>"
        state = "closed" if self._closed else f"{len(self._residency)} shard(s)"
        return (
            f"<VramManager {self.backend_name} GPU{getattr(self, 'device', '?')} "
            f"worker={self.worker_id} token={self._token.fingerprint} {state}>"
        )


def _new_shard_id(shard_id: str | None) -> str:
    return check_shard_id(shard_id) if shard_id is not None else f"shard-{uuid.uuid4().hex}"
