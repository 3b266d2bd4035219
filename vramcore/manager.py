"""The VramManager: seal shards into VRAM, verify them before use, free them, audit it all.

One manager serves one device of one backend. It orchestrates; the work lives beside it:
sources and loading in :mod:`vramcore._loading`, digests in :mod:`vramcore.digest`, the checks
in :mod:`vramcore._verification`, shared state in :mod:`vramcore._residency`, audit events in
:mod:`vramcore._emitter`, narration in :mod:`vramcore.narration`.

It is thread-safe: seals, verifications and deallocations of different shards run in
parallel; a shard being used inside :meth:`VramManager.verified` is freed only after every such
block has left, and :meth:`VramManager.close` waits (bounded) for seals and verifications in
progress before it closes the backend.

Failure rules:

* nothing stays allocated when a seal fails at any step (allocation, copy, digest, audit);
* the core decides every outcome itself: a narration wrapper that swallows an exception or
  returns something else cannot make a seal or a verification pass
  (:func:`vramcore.narration.perform`), and a hook that returns garbage is a typed error;
* a security-critical event (sealed, verification failed, policy violation) that an audit
  sink cannot record fails the operation with :class:`~vramcore.errors.AuditError`;
* no message, event or repr carries the token, the seal key, a signature or a pointer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, NoReturn

import attrs

from vramcore._emitter import Emitter
from vramcore._hookutil import BUILTIN_PLUGIN, implementers
from vramcore._loading import FileSource, MemorySource, Source, StagingFactory, StagingPool
from vramcore._residency import Residency, Resident
from vramcore._tensors import attach_tensor_views
from vramcore._verification import (
    Problem,
    check_leaves,
    check_sample,
    digest_problem,
    quarantine_problem,
    sample_ranges,
    seal_problem,
)
from vramcore.audit import DEFAULT_SINK_TIMEOUT, AuditSink, AuditTrail, SinkContext
from vramcore.backend import AllocatorBackend, DeviceBuffer, DeviceInfo
from vramcore.digest import (
    DEFAULT_LEAF_SIZE,
    DIGEST_ALG,
    LeafHasher,
    ShardDigest,
    compute_digest,
    default_workers,
    sealing_digest,
)
from vramcore.errors import (
    AuditError,
    ConfigError,
    InsufficientVram,
    IntegrityViolation,
    InvalidInput,
    ManagerClosed,
    NotSealed,
    PolicyViolation,
    SealVerificationFailed,
    VramError,
)
from vramcore.narration import Operation, perform
from vramcore.plugins import get_plugin_manager, select_backend
from vramcore.policy import Finding, VramPolicy
from vramcore.scrub import Scrubber
from vramcore.seal import SecretKey, WorkerToken
from vramcore.shard import SealedShard
from vramcore.validation import (
    check_device_index,
    check_flag,
    check_leaf_size,
    check_path,
    check_policy,
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
_CLOSED = "this VramManager is closed; create a new one"


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
    :param audit: ``"required"`` (refuse to start with no durable audit sink) or
        ``"disabled"`` (no sinks are created, explicitly).
    :param policy: the VRAM-only policy (default: :class:`~vramcore.policy.VramPolicy()`).
    :param leaf_size: Merkle leaf size (a multiple of 4096; default 65536).
    :param chunk_bytes: host staging buffer size for file loads and VRAM read-back.
    :param hash_workers: threads hashing leaves on the host (default ``VRAMCORE_HASH_WORKERS``
        or the number of cores).
    :param close_timeout: seconds :meth:`close` waits for operations in progress.
    :param audit_timeout: seconds an audit sink may take to record one event; a sink that
        takes longer counts as failed (fail closed for critical events).

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
        audit: Literal["required", "disabled"] = "required",
        policy: VramPolicy | None = None,
        leaf_size: int = DEFAULT_LEAF_SIZE,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        hash_workers: int | None = None,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        audit_timeout: float = DEFAULT_SINK_TIMEOUT,
    ) -> None:
        if audit not in ("required", "disabled"):
            raise InvalidInput(f"audit must be 'required' or 'disabled', got {audit!r:.40}")
        self.leaf_size = check_leaf_size(leaf_size)
        check_size(chunk_bytes, field="chunk_bytes")
        self._workers = default_workers() if hash_workers is None else check_workers(hash_workers)
        self._close_timeout = check_seconds(close_timeout, field="close_timeout")
        self._token = (
            worker_token if isinstance(worker_token, WorkerToken) else WorkerToken(worker_token)
        )
        self.worker_id = clean_text(
            worker_id if worker_id is not None else f"{socket.gethostname()}:{os.getpid()}",
            field="worker_id",
            limit=256,
        )
        self.policy = check_policy(policy)
        self._chunk_bytes = max(self.leaf_size, chunk_bytes // self.leaf_size * self.leaf_size)
        self._pm = plugin_manager if plugin_manager is not None else get_plugin_manager()
        self._hook = self._pm.hook
        self._residency = Residency()
        self._closed = False
        self._audit = AuditTrail(self._pm, check_seconds(audit_timeout, field="audit_timeout"))
        self._key: SecretKey | None = None
        self._sink_context: SinkContext | None = None
        self._owns_backend = not isinstance(allocator, AllocatorBackend)
        # Whether a device digest answers for this backend: None until the first digest.
        self._device_digest: bool | None = None
        self._scrubber: Scrubber | None = None
        self._scrub_lock = threading.Lock()
        try:
            self._backend = self._make_backend(allocator)
            self._staging = self._make_staging()
            self._start(device, audit)
        except BaseException:
            self._teardown(close_backend=True)
            raise

    # -- start-up -------------------------------------------------------------------

    def _make_backend(self, allocator: str | AllocatorBackend | None) -> AllocatorBackend:
        if isinstance(allocator, AllocatorBackend):
            return allocator
        if allocator is not None and not isinstance(allocator, str):
            raise InvalidInput("allocator must be a backend name or an AllocatorBackend")
        backend = select_backend(self._pm, allocator).factory()
        if not isinstance(backend, AllocatorBackend):
            raise ConfigError(
                f"the allocator plugin ({implementers(self._hook.vramcore_allocator_backends)}) "
                f"built a {type(backend).__name__}, not an AllocatorBackend"
            )
        return backend

    def _make_staging(self) -> StagingFactory:
        """Two staging buffers: the backend's own (pinned) when it lends them, else a pool."""
        chunk = self._chunk_bytes
        if type(self._backend).staging is not AllocatorBackend.staging:
            return lambda: self._backend.staging(2, chunk)
        pool = StagingPool(chunk)
        return lambda: pool.borrow(2)

    def _start(self, device: int, audit: str) -> None:
        devices = self._probe()
        self.device = check_device_index(device, len(devices))
        self.device_info = devices[self.device]
        self._emitter = Emitter(
            self._audit, worker_id=self.worker_id, device=self.device, backend=self._backend.name
        )
        if audit == "required":
            self._sink_context = SinkContext.from_token(
                self._token, worker_id=self.worker_id, device=self.device
            )
            self._audit.collect(self._sink_context)
            self._audit.require_durable()
        self._enforce(self.policy.check_device(self.device_info))
        key = self._hook.vramcore_seal_key(token=self._token, worker_id=self.worker_id)
        if not isinstance(key, SecretKey):
            raise ConfigError(
                f"the seal key provider ({implementers(self._hook.vramcore_seal_key)}) returned "
                f"{type(key).__name__}, not a SecretKey; the manager did not start"
            )
        self._key = key
        hook = self._hook.vramcore_device_digest
        if not any(i.plugin_name != BUILTIN_PLUGIN for i in hook.get_hookimpls()):
            self._device_digest = False
        log.info(
            "vramcore manager started: backend=%s GPU %d (%s), worker=%s, token %s, %d sink(s)",
            self._backend.name,
            self.device,
            self.device_info.name,
            self.worker_id,
            self._token.fingerprint,
            len(self._audit.sinks),
        )

    def _probe(self) -> Sequence[DeviceInfo]:
        devices = self._hook.vramcore_probe_devices(backend=self._backend)
        if not isinstance(devices, list | tuple) or not all(
            isinstance(d, DeviceInfo) for d in devices
        ):
            raise ConfigError(
                f"the device probe ({implementers(self._hook.vramcore_probe_devices)}) returned "
                f"{type(devices).__name__}, not a list of DeviceInfo"
            )
        return list(devices)

    def _enforce(self, findings: Sequence[Finding]) -> None:
        """Audit every finding; raise for the refused ones (reported ones are logged)."""
        for finding in findings:
            self._emitter.policy_violation(
                self.device, finding.rule, finding.detail, refused=finding.refused
            )
        refused = [f for f in findings if f.refused]
        for finding in findings:
            if not finding.refused:
                log.warning("VRAM-only policy: %s", finding.detail)
        if refused:
            raise PolicyViolation(
                f"VRAM-only policy refused: {'; '.join(f.detail for f in refused)}",
                rule=refused[0].rule,
                device=self.device,
            )

    def _attributes(self, shard_id: str, nbytes: int, **more: Any) -> dict[str, Any]:
        return {
            "shard_id": shard_id,
            "device": self.device,
            "device_name": self.device_info.name,
            "nbytes": nbytes,
            "backend": self._backend.name,
            **more,
        }

    # -- capacity -------------------------------------------------------------------

    def available_vram(self) -> int:
        """Free bytes on the device now (as the backend reports them)."""
        self._check_open()
        return self._backend.mem_info(self.device)[0]

    def total_vram(self) -> int:
        """Total bytes of the device."""
        self._check_open()
        return self._backend.mem_info(self.device)[1]

    def used_vram(self) -> int:
        """Bytes this manager holds on the device (sealed shards and seals in progress)."""
        return self._residency.used

    # -- sealing --------------------------------------------------------------------

    def seal_model(
        self,
        data: bytes | bytearray | memoryview,
        *,
        shard_id: str | None = None,
        expected_sha256: str | None = None,
        compute_sha256: bool = False,
    ) -> SealedShard:
        """Copy ``data`` into VRAM and seal it.

        ``data`` must not change until this returns (the copy and the hashes read it).

        :param data: the shard's bytes (any C-contiguous buffer).
        :param shard_id: a name (1-256 of ``[A-Za-z0-9._:-]``, no ``..``); default a random id.
        :param expected_sha256: the SHA-256 the bytes must have; computed while copying and
            checked before the shard is sealed (on mismatch nothing stays allocated).
        :param compute_sha256: record the bytes' SHA-256 in the seal even without
            ``expected_sha256`` (it costs one more pass of hashing, overlapped with the copy).
        :raises IntegrityViolation: ``expected_sha256`` does not match.
        :raises InsufficientVram: the device lacks room.
        """
        self._check_open()
        try:
            view = memoryview(data).cast("B")
        except (TypeError, ValueError):
            raise InvalidInput(
                "data must be bytes or a C-contiguous buffer (bytes, bytearray, memoryview, "
                f"numpy array), got {type(data).__name__}"
            ) from None
        source = MemorySource(
            view,
            self._chunk_bytes,
            expected_sha256=expected_sha256,
            want_sha256=check_flag(compute_sha256, field="compute_sha256"),
        )
        return self._seal(self._shard_id(shard_id), source)

    def seal_file(
        self,
        path: str | os.PathLike[str],
        *,
        shard_id: str | None = None,
        expected_sha256: str | None = None,
        compute_sha256: bool = False,
        progress: Callable[[int, int], None] | None = None,
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
        :raises InvalidInput: the path is missing, not a regular file, or empty.
        :raises IntegrityViolation: SHA-256 mismatch, a malformed safetensors header, or the
            file changed size (or its safetensors header changed) while being read. The tensor
            map recorded is parsed again from the bytes in VRAM and must equal the one read
            before loading.
        """
        self._check_open()
        p = check_path(path)
        if progress is not None and not callable(progress):
            raise InvalidInput("progress must be callable as progress(done, total)")
        if shard_id is None:
            with contextlib.suppress(InvalidInput):
                shard_id = check_shard_id(p.name)
        sid = self._shard_id(shard_id)
        try:
            source = FileSource(
                p,
                self._chunk_bytes,
                expected_sha256=expected_sha256,
                want_sha256=check_flag(compute_sha256, field="compute_sha256"),
                progress=progress,
            )
        except IntegrityViolation as exc:  # a malformed header, refused before allocating
            with contextlib.suppress(VramError):
                self._emitter.seal_refused(sid, 0, exc.reason, str(exc))
            raise
        return self._seal(sid, source)

    def _shard_id(self, shard_id: str | None) -> str:
        return check_shard_id(shard_id) if shard_id is not None else f"shard-{uuid.uuid4().hex}"

    def _seal(self, shard_id: str, source: Source) -> SealedShard:
        nbytes = source.nbytes

        committed: list[SealedShard] = []

        def seal(op: Operation) -> SealedShard:
            self._residency.reserve(shard_id)
            allocated: list[DeviceBuffer] = []  # set even if a wrapper raises after allocating
            buf: DeviceBuffer | None = None
            try:
                buf = self._allocate(shard_id, nbytes, allocated)
                digest, file_sha256 = self._load(shard_id, buf, source)
                op.attributes["leaf_count"] = digest.leaf_count
                shard = self._sign(shard_id, buf, digest, source, file_sha256)
                attach_tensor_views(buf, shard.tensors, self._backend)
                self._emitter.sealed(shard)
            except BaseException as exc:
                self._abandon(shard_id, nbytes, allocated[0] if allocated else None, exc)
                with contextlib.suppress(Exception):  # capacity as it is after the clean-up
                    self._capacity_attributes(op)
                raise
            resident = Resident(shard, buf, digest, leaves_checked=digest.source == "host")
            if not self._residency.commit(resident):
                # close() ran meanwhile: this shard must not outlive the manager.
                self._release_buffer(shard_id, buf)
                raise ManagerClosed("the manager was closed while the shard was being sealed")
            committed.append(shard)
            return shard

        attributes = self._attributes(
            shard_id, nbytes, digest_alg=DIGEST_ALG, leaf_size=self.leaf_size
        )
        with self._residency.operation():
            try:
                result: SealedShard = perform(self._hook, "seal", seal, **attributes)
            except BaseException:
                if committed:
                    # A wrapper failed around a seal that succeeded: the caller never gets
                    # the seal, so the shard must not stay resident.
                    with contextlib.suppress(VramError):
                        self._release_buffer(shard_id, self._residency.take(shard_id).buffer)
                raise
        return result

    def _allocate(self, shard_id: str, nbytes: int, allocated: list[DeviceBuffer]) -> DeviceBuffer:
        def allocate(op: Operation) -> DeviceBuffer:
            free = self._backend.mem_info(self.device)[0]
            if nbytes > free:
                raise InsufficientVram(nbytes, free, device=self.device)
            buf = self._backend.allocate(self.device, nbytes)
            self._residency.add_bytes(nbytes)
            try:
                if not isinstance(buf, DeviceBuffer) or buf.nbytes != nbytes:
                    raise ConfigError(
                        f"backend {self._backend.name} returned a malformed allocation"
                    )
                finding = self.policy.check_allocation(self._backend.memory_kind(buf), self.device)
                self._enforce([finding] if finding else [])
                self._emitter.allocated(shard_id, nbytes)
            except BaseException:
                self._free(buf)
                raise
            allocated.append(buf)
            self._capacity_attributes(op)
            return buf

        result: DeviceBuffer = perform(
            self._hook, "allocate", allocate, **self._attributes(shard_id, nbytes)
        )
        return result

    def _load(
        self, shard_id: str, buf: DeviceBuffer, source: Source
    ) -> tuple[ShardDigest, str | None]:
        """Copy the source in; return the shard's digest (device or host) and file SHA-256.

        When no device digest answers for this backend, the leaves are hashed on the host from
        the very bytes handed to the device (read once, hashed once, nothing read back; the
        first verification confirms them in VRAM). Whether a device answers is learnt at the
        first seal, which hashes on both sides and refuses a device digest that disagrees with
        the host's.
        """
        hasher = (
            LeafHasher(source.nbytes, self.leaf_size, self._workers)
            if self._device_digest is not True
            else None
        )
        load = perform(
            self._hook,
            "copy",
            lambda op: source.load(self._backend, buf, staging=self._staging, hasher=hasher),
            **self._attributes(shard_id, source.nbytes, source=source.kind),
        )
        self._residency.check_running()
        host = load.leaves

        def digest(op: Operation) -> ShardDigest:
            result = sealing_digest(
                self._hook,
                self._backend,
                buf,
                self.leaf_size,
                host_leaves=host,
                ask_device=self._device_digest is not False,
                read_back=lambda: self._compute(buf, None),
            )
            self._device_digest = result.source == "device"
            op.attributes["source"] = result.source
            op.attributes["leaf_count"] = result.leaf_count
            return result

        sealed: ShardDigest = perform(
            self._hook, "digest", digest, **self._digest_attributes(shard_id, buf)
        )
        return sealed, load.file_sha256

    def _digest_attributes(self, shard_id: str, buf: DeviceBuffer) -> dict[str, Any]:
        return {
            "shard_id": shard_id,
            "device": self.device,
            "nbytes": buf.nbytes,
            "backend": self._backend.name,
            "leaf_size": self.leaf_size,
        }

    def _compute(
        self, buf: DeviceBuffer, leaf_range: tuple[int, int] | None
    ) -> tuple[bytes | None, bytes, str]:
        return compute_digest(
            self._hook,
            self._backend,
            buf,
            self.leaf_size,
            staging=self._staging,
            workers=self._workers,
            leaf_range=leaf_range,
        )

    def _digest(
        self, shard_id: str, buf: DeviceBuffer, leaf_range: tuple[int, int] | None
    ) -> tuple[bytes | None, bytes, str]:
        def digest(op: Operation) -> tuple[bytes | None, bytes, str]:
            root, leaves, where = self._compute(buf, leaf_range)
            self._device_digest = where == "device"
            op.attributes["source"] = where
            op.attributes["leaf_count"] = len(leaves) // 32
            return root, leaves, where

        result: tuple[bytes | None, bytes, str] = perform(
            self._hook, "digest", digest, **self._digest_attributes(shard_id, buf)
        )
        return result

    def _sign(
        self,
        shard_id: str,
        buf: DeviceBuffer,
        digest: ShardDigest,
        source: Source,
        file_sha256: str | None,
    ) -> SealedShard:
        unsigned = SealedShard(
            shard_id=shard_id,
            gpu_device=self.device,
            vram_bytes=buf.nbytes,
            digest=digest.root.hex(),
            digest_alg=DIGEST_ALG,
            leaf_size=self.leaf_size,
            sealed_at=datetime.now(UTC),
            signature=b"\x00" * 32,
            tensors=source.tensors,
            file_sha256=file_sha256,
        )
        return attrs.evolve(unsigned, signature=self._require_key().mac(unsigned.signed_message()))

    def _capacity_attributes(self, op: Operation) -> None:
        free, total = self._backend.mem_info(self.device)
        op.attributes["vram_used"] = total - free
        op.attributes["vram_total"] = total

    def _free(self, buf: DeviceBuffer) -> None:
        self._backend.free(buf)
        self._residency.add_bytes(-buf.nbytes)

    def _abandon(
        self, shard_id: str, nbytes: int, buf: DeviceBuffer | None, exc: BaseException
    ) -> None:
        """Undo a failed seal: free what was allocated and audit it, then let ``exc`` go on."""
        self._residency.cancel(shard_id)
        reason = (
            f"{type(exc).__name__}: {exc}" if isinstance(exc, VramError) else type(exc).__name__
        )
        try:
            with contextlib.suppress(VramError):  # the original error matters more
                if isinstance(exc, IntegrityViolation):  # the input, not the device, failed
                    self._emitter.seal_refused(shard_id, nbytes, exc.reason, str(exc))
                else:
                    self._emitter.allocation_failed(shard_id, nbytes, reason)
        finally:
            if buf is not None:
                self._free(buf)
        if buf is not None:
            with contextlib.suppress(VramError):
                self._emitter.deallocated(shard_id, nbytes)

    def _require_key(self) -> SecretKey:
        if self._key is None or self._key.wiped:
            raise ManagerClosed(_CLOSED)
        return self._key

    # -- verification ---------------------------------------------------------------

    def verify_sealed(self, shard: SealedShard, *, sample: float | int | None = None) -> None:
        """Check ``shard``'s signature and recompute its digest from VRAM.

        :param sample: ``None`` (default) re-hashes every byte and compares the root. A float
            in ``(0, 1]`` (a fraction of the leaves) or an int ``>= 1`` (a number of leaves)
            re-hashes only that many leaves, chosen afresh by a CSPRNG on every call, and
            compares them with the sealed leaf hashes (themselves checked against the signed
            root once). If ``c`` of ``n`` leaves are corrupted and ``k`` are sampled, the
            corruption is caught with probability ``1 - C(n-c, k) / C(n, k)`` (at least
            ``1 - (1 - k/n)**c``): sample 1 % of the leaves of a shard with 300 corrupted
            leaves and it is caught 95 % of the time.
        :raises SealVerificationFailed: bad signature (``reason="signature"``), another
            device (``"device"``), a seal that is not the resident one (``"stale"``), a shard
            a scrub quarantined (``"quarantined"``), or bytes that changed (``"digest"``, with
            ``corrupted_ranges`` and ``tensors``). Audited as a critical event first.
        :raises NotSealed: no shard with this id is resident here.
        :raises ManagerClosed: the manager is closed (or closes meanwhile).
        """
        self._check_open()
        shard_id = _shard_id_of(shard)
        with self._residency.reading(shard_id) as resident, self._residency.operation():
            self._verify(shard, resident, sample)

    @contextlib.contextmanager
    def verified(
        self, shard: SealedShard, *, sample: float | int | None = None
    ) -> Iterator[DeviceBuffer]:
        """Verify ``shard`` (see :meth:`verify_sealed`), then yield its device buffer.

        The buffer stays allocated until the block exits, even if another thread asks to
        deallocate the shard meanwhile. Use ``buffer.native`` for the backend's own object.
        """
        self._check_open()
        shard_id = _shard_id_of(shard)
        with self._residency.reading(shard_id) as resident:
            with self._residency.operation():
                self._verify(shard, resident, sample)
            assert resident is not None  # _verify raised otherwise
            yield resident.buffer

    def _verify(
        self, shard: SealedShard, resident: Resident | None, sample: float | int | None
    ) -> None:
        if resident is None:
            self._not_resident(shard)
        wanted = check_sample(sample)

        def verify(op: Operation) -> None:
            problem = seal_problem(shard, self._require_key(), self.device, resident.shard)
            if problem is None and resident.quarantined:
                problem = quarantine_problem(resident.quarantined)
            checked = 0
            if problem is None:
                if wanted is None:
                    problem, checked = self._full_check(shard, resident)
                else:
                    problem, checked = self._sampled_check(shard, resident, wanted)
            op.attributes["mode"] = "full" if wanted is None else "sampled"
            op.attributes["leaves_checked"] = checked
            if problem is not None:
                op.attributes["outcome"] = "mismatch"
                op.attributes["reason"] = str(problem.reason)
                self._fail(shard, problem)
            self._emitter.verified(
                shard, mode="full" if wanted is None else "sampled", leaves_checked=checked
            )

        perform(
            self._hook,
            "verify",
            verify,
            **self._attributes(
                shard.shard_id,
                shard.vram_bytes,
                digest_alg=shard.digest_alg,
                leaf_size=shard.leaf_size,
            ),
        )

    def _full_check(self, shard: SealedShard, resident: Resident) -> tuple[Problem | None, int]:
        root, leaves, _ = self._digest(shard.shard_id, resident.buffer, None)
        assert root is not None
        self._residency.check_running()
        return digest_problem(shard, resident.digest.leaves, root, leaves), len(leaves) // 32

    def _sampled_check(
        self, shard: SealedShard, resident: Resident, wanted: float | int
    ) -> tuple[Problem | None, int]:
        ranges, count = sample_ranges(resident.digest.leaf_count, wanted)
        return self._check_leaves(shard, resident, ranges), count

    def _check_leaves(
        self, shard: SealedShard, resident: Resident, ranges: Iterable[tuple[int, int]]
    ) -> Problem | None:
        def rehash(first: int, stop: int) -> bytes:
            _, now, _ = self._digest(shard.shard_id, resident.buffer, (first, stop))
            self._residency.check_running()
            return now

        return check_leaves(shard, resident, ranges, rehash)

    def scrub_slice(self, shard_id: str, first: int, stop: int) -> bool | None:
        """Re-verify leaves ``first`` to ``stop - 1`` of a resident shard (for the scrubber).

        A mismatch quarantines the shard (:meth:`verified` refuses it, reason
        ``"quarantined"``, until it is deallocated and sealed again) and is audited as a
        failed verification.

        :return: ``True`` when the leaves match, ``False`` when the shard was found corrupted
            (or already quarantined), ``None`` when it is no longer resident.
        """
        self._check_open()
        with self._residency.reading(shard_id) as resident, self._residency.operation():
            if resident is None:
                return None
            if resident.quarantined:
                return False
            stop = min(stop, resident.digest.leaf_count)
            if first >= stop:
                return True
            shard = resident.shard
            problem = self._check_leaves(shard, resident, [(first, stop)])
            if problem is None:
                return True
            resident.quarantined = f"a scrub found {problem.detail}"
            self._emitter.verification_failed(
                shard.shard_id,
                reason=problem.reason,
                detail=f"scrub: {problem.detail}",
                ranges=problem.ranges,
                tensors=problem.tensors,
            )
            log.error("scrub: shard %s is corrupted: %s", shard.shard_id, problem.detail)
            return False

    def scrub(self, bytes_per_second: int, *, slice_seconds: float = 0.1) -> Scrubber:
        """Start re-verifying every sealed shard continuously, within ``bytes_per_second``.

        Opt-in background scrubbing: a daemon thread walks the resident shards leaf range by
        leaf range, re-hashing from VRAM and comparing with the sealed leaves, never faster
        than the budget. A corrupted shard is quarantined and audited (see
        :meth:`scrub_slice`). The scrubber stops with :meth:`close` or its own
        :meth:`~vramcore.scrub.Scrubber.stop`.

        :param bytes_per_second: the budget, at least one leaf per second.
        :param slice_seconds: how much of the budget one step spends (smaller: smoother).
        :raises InvalidInput: a bad budget, or a scrubber already runs.
        """
        self._check_open()
        scrubber = Scrubber(self, bytes_per_second, slice_seconds=slice_seconds)
        with self._scrub_lock:
            if self._scrubber is not None and self._scrubber.running:
                raise InvalidInput("a scrubber already runs on this manager; stop it first")
            self._scrubber = scrubber
        scrubber.start()
        return scrubber

    def _not_resident(self, shard: SealedShard) -> NoReturn:
        # A forged, tampered or foreign seal is a verification failure (audited), not
        # merely "not resident": check the signature and device before saying NotSealed.
        problem = seal_problem(shard, self._require_key(), self.device, None)
        if problem is not None:
            self._fail(shard, problem)
        raise NotSealed(
            f"shard {shard.shard_id} is not resident on this manager (never sealed here, "
            "or deallocated); seal it again"
        )

    def _fail(self, shard: SealedShard, problem: Problem) -> NoReturn:
        self._emitter.verification_failed(
            shard.shard_id,
            reason=problem.reason,
            detail=problem.detail,
            ranges=problem.ranges,
            tensors=problem.tensors,
        )
        raise SealVerificationFailed(
            f"seal of shard {shard.shard_id} failed verification: {problem.detail}",
            shard_id=shard.shard_id,
            reason=problem.reason,
            corrupted_ranges=problem.ranges,
            tensors=problem.tensors,
        )

    # -- deallocation ---------------------------------------------------------------

    def deallocate(self, shard: SealedShard | str) -> None:
        """Free a shard's VRAM. Waits for open :meth:`verified` blocks on it to exit.

        :raises NotSealed: the shard is not resident here.
        :raises InvalidInput: called from inside a ``verified()`` block of the same shard.
        """
        self._check_open()
        shard_id = shard.shard_id if isinstance(shard, SealedShard) else check_shard_id(shard)
        with self._residency.operation():
            resident = self._residency.take(shard_id)
            self._release_buffer(shard_id, resident.buffer)

    def _release_buffer(self, shard_id: str, buf: DeviceBuffer) -> None:
        def deallocate(op: Operation) -> None:
            self._free(buf)
            self._capacity_attributes(op)
            self._emitter.deallocated(shard_id, buf.nbytes)

        perform(self._hook, "deallocate", deallocate, **self._attributes(shard_id, buf.nbytes))

    def shards(self) -> list[SealedShard]:
        """The seals of every shard resident on this manager."""
        return self._residency.seals()

    # -- lifecycle --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ManagerClosed(_CLOSED)

    def close(self) -> None:
        """Free every resident shard, flush and close the sinks, wipe the key and token.

        Waits for :meth:`verified` blocks to exit and, up to ``close_timeout`` seconds, for
        seals and verifications in progress (those still running then fail with
        :class:`~vramcore.errors.ManagerClosed` at their next step). Only then is the backend
        closed; if an operation is still stuck in the backend, the backend is left open
        rather than closed under it, and this raises. Idempotent. Raises
        :class:`~vramcore.errors.AuditError` after cleaning up if a sink failed to close.
        """
        with self._scrub_lock:
            scrubber, self._scrubber = self._scrubber, None
        if scrubber is not None:
            scrubber.stop()
        residents = self._residency.take_all()
        if residents is None:
            return
        stuck = self._residency.wait_idle(self._close_timeout)
        errors: list[BaseException] = []
        for resident in residents:
            try:
                self._release_buffer(resident.shard.shard_id, resident.buffer)
            except BaseException as exc:
                errors.append(exc)
        errors.extend(self._teardown(close_backend=not stuck))
        if stuck:
            raise ManagerClosed(
                f"{stuck} operation(s) were still running in the backend "
                f"{self._close_timeout:g} s after close(); the backend was left open"
            )
        if errors:
            raise AuditError(
                f"closing the manager hit {len(errors)} error(s); the first: "
                f"{type(errors[0]).__name__}: {errors[0]}"
            ) from errors[0]

    def _teardown(self, *, close_backend: bool) -> list[BaseException]:
        self._closed = True
        errors = self._audit.close()
        if close_backend and self._owns_backend and getattr(self, "_backend", None) is not None:
            try:
                self._backend.close()
            except Exception as exc:
                errors.append(exc)
        if self._key is not None:
            self._key.wipe()
        if self._sink_context is not None:
            self._sink_context.wipe()
        self._token.wipe()
        return errors

    @property
    def sinks(self) -> tuple[AuditSink, ...]:
        """The audit sinks this manager delivers to."""
        return self._audit.sinks

    @property
    def backend_name(self) -> str:
        """Name of the allocator backend in use."""
        return self._backend.name

    @property
    def token_fingerprint(self) -> str:
        """The worker token's fingerprint (safe to log)."""
        return self._token.fingerprint

    def __enter__(self) -> VramManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._residency)} shard(s)"
        backend = getattr(getattr(self, "_backend", None), "name", "?")
        return (
            f"<VramManager {backend} GPU{getattr(self, 'device', '?')} "
            f"worker={self.worker_id} token={self._token.fingerprint} {state}>"
        )


def _shard_id_of(shard: object) -> str:
    if not isinstance(shard, SealedShard):
        raise InvalidInput(f"expected a SealedShard, got {type(shard).__name__}")
    return shard.shard_id
