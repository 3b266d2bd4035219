"""The VramManager: seal shards into VRAM, verify them before use, free them, audit it all.

One manager serves one device of one backend. It is thread-safe: seals, verifications and
deallocations of different shards run in parallel; a shard being used inside
:meth:`VramManager.verified` is freed only after every such block has left.

Failure rules:

* nothing stays allocated when a seal fails at any step (allocation, copy, digest, audit);
* a security-critical event (sealed, verification failed, policy violation) that an audit
  sink cannot record fails the operation with :class:`~vramcore.errors.AuditError`;
* no message, event or repr carries the token, the seal key, a signature or a pointer.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NoReturn

import attrs

from vramcore import events
from vramcore.audit import AuditSink, AuditTrail, SinkContext
from vramcore.backend import AllocatorBackend, DeviceBuffer, DeviceInfo
from vramcore.digest import (
    DEFAULT_LEAF_SIZE,
    DIGEST_ALG,
    StagingPool,
    leaf_count,
    merkle_root,
    read_and_hash,
)
from vramcore.errors import (
    AuditError,
    ConfigError,
    InsufficientVram,
    IntegrityViolation,
    InvalidInput,
    NotSealed,
    PolicyViolation,
    SealVerificationFailed,
    VramError,
)
from vramcore.loading import check_expected_sha256, device_reader, stream_file
from vramcore.narration import Operation
from vramcore.plugins import get_plugin_manager, select_backend
from vramcore.policy import Finding, VramPolicy
from vramcore.residency import Residency, Resident
from vramcore.safetensors import parse_tensor_map, read_tensor_map
from vramcore.seal import SecretKey, WorkerToken
from vramcore.shard import SealedShard, TensorRange
from vramcore.validation import (
    check_device_index,
    check_sha256_hex,
    check_shard_id,
    check_size,
    clean_text,
    scrub_text,
)
from vramcore.verification import Problem, digest_problem, seal_problem

__all__ = ["DEFAULT_CHUNK_BYTES", "VramManager"]

log = logging.getLogger("vramcore")

#: Host staging size for file loads and VRAM read-back (two such buffers at most in flight).
DEFAULT_CHUNK_BYTES = 8 << 20


class VramManager:
    """Seal model shards into VRAM and verify them before every use.

    :param worker_token: the worker's secret (``str``/``bytes``, at least 16 bytes, or a
        :class:`~vramcore.seal.WorkerToken`); defaults to nothing: it must be given.
    :param device: device index on the backend.
    :param allocator: backend name, a ready :class:`~vramcore.backend.AllocatorBackend`
        (not closed by the manager), or ``None`` to use ``VRAMCORE_ALLOCATOR`` or the best
        viable backend.
    :param worker_id: public id put on every audit event (default ``host:pid``).
    :param plugin_manager: plugins to use (default: installed ones, see
        :func:`vramcore.plugins.get_plugin_manager`).
    :param audit: ``"required"`` (refuse to start with no audit sink) or ``"disabled"``
        (no sinks are created, explicitly).
    :param policy: the VRAM-only policy (default: strict).
    :param leaf_size: Merkle leaf size (a multiple of 4096; default 65536).
    :param chunk_bytes: host staging buffer size for file loads and VRAM read-back.

    :raises AuditError: ``audit="required"`` and no plugin provided a sink.
    :raises PolicyViolation: the device breaks the VRAM-only policy (audited first).
    :raises BackendUnavailable: the allocator cannot be used here.
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
    ) -> None:
        if audit not in ("required", "disabled"):
            raise InvalidInput(f"audit must be 'required' or 'disabled', got {audit!r}")
        if leaf_size <= 0 or leaf_size % 4096:
            raise InvalidInput(f"leaf_size must be a positive multiple of 4096, got {leaf_size}")
        check_size(chunk_bytes, field="chunk_bytes")
        self._token = (
            worker_token if isinstance(worker_token, WorkerToken) else WorkerToken(worker_token)
        )
        self.worker_id = clean_text(
            worker_id if worker_id is not None else f"{socket.gethostname()}:{os.getpid()}",
            field="worker_id",
            limit=256,
        )
        self.leaf_size = leaf_size
        self.policy = policy or VramPolicy()
        self._chunk_bytes = max(leaf_size, chunk_bytes // leaf_size * leaf_size)
        self._staging = StagingPool(self._chunk_bytes)
        self._pm = plugin_manager if plugin_manager is not None else get_plugin_manager()
        self._hook = self._pm.hook
        self._residency = Residency()
        self._closed = False
        self._audit = AuditTrail(self._hook)
        self._key: SecretKey | None = None
        self._sink_context: SinkContext | None = None
        self._owns_backend = not isinstance(allocator, AllocatorBackend)
        try:
            self._backend = self._make_backend(allocator)
            self._start(device, audit)
        except BaseException:
            self._teardown()
            raise

    # -- start-up -------------------------------------------------------------------

    def _make_backend(self, allocator: str | AllocatorBackend | None) -> AllocatorBackend:
        if isinstance(allocator, AllocatorBackend):
            return allocator
        if allocator is not None and not isinstance(allocator, str):
            raise InvalidInput("allocator must be a backend name or an AllocatorBackend")
        return select_backend(self._pm, allocator).factory()

    def _start(self, device: int, audit: str) -> None:
        devices = self._probe()
        self.device = check_device_index(device, len(devices))
        self.device_info = devices[self.device]
        if audit == "required":
            self._sink_context = SinkContext.from_token(
                self._token, worker_id=self.worker_id, device=self.device
            )
            self._audit.collect(self._sink_context)
            self._audit.require_durable()
        self._enforce(self.policy.check_device(self.device_info))
        key = self._hook.vramcore_seal_key(token=self._token, worker_id=self.worker_id)
        if not isinstance(key, SecretKey):
            raise ConfigError("the seal key provider returned no SecretKey")
        self._key = key
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
        return list(devices or ())

    def _enforce(self, findings: Sequence[Finding], device: int | None = None) -> None:
        if not findings:
            return
        where = self.device if device is None else device
        for finding in findings:
            self._emit(
                events.PolicyViolation(
                    worker_id=self.worker_id, device=where, rule=finding.rule, detail=finding.detail
                )
            )
        first = findings[0]
        raise PolicyViolation(
            f"VRAM-only policy refused: {'; '.join(f.detail for f in findings)}",
            rule=first.rule,
            device=where,
        )

    # -- audit --------------------------------------------------------------------

    def _emit(self, event: events.AuditEvent) -> None:
        self._audit.emit(event)

    # -- narration ----------------------------------------------------------------

    def _narrate(self, name: str, step: Callable[[Operation], Any], **attributes: Any) -> Any:
        def run(op: Operation) -> Any:
            try:
                result = step(op)
            except BaseException as exc:
                op.attributes.setdefault("outcome", "error")
                op.attributes["error_type"] = type(exc).__name__
                raise
            op.attributes.setdefault("outcome", "ok")
            return result

        return self._hook.vramcore_operation(op=Operation(name, run, **attributes))

    def _base_attributes(self, shard_id: str, nbytes: int) -> dict[str, Any]:
        return {
            "shard_id": shard_id,
            "device": self.device,
            "device_name": self.device_info.name,
            "nbytes": nbytes,
            "backend": self._backend.name,
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
    ) -> SealedShard:
        """Copy ``data`` into VRAM and seal it.

        :param data: the shard's bytes (any C-contiguous buffer).
        :param shard_id: a name (1-256 of ``[A-Za-z0-9._:-]``, no ``..``); default a random id.
        :param expected_sha256: the SHA-256 the bytes must have; checked before anything is
            allocated.
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
        nbytes = check_size(view.nbytes, field="data size")
        sid = self._shard_id(shard_id)
        file_sha = None
        if expected_sha256 is not None:
            file_sha = check_expected_sha256(hashlib.sha256(view).hexdigest(), expected_sha256)

        def write(buf: DeviceBuffer, op: Operation) -> None:
            for offset in range(0, nbytes, self._chunk_bytes):
                self._backend.copy_in(buf, offset, view[offset : offset + self._chunk_bytes])

        return self._seal(sid, nbytes, write, "memory", (), file_sha)

    def seal_file(
        self,
        path: str | os.PathLike[str],
        *,
        shard_id: str | None = None,
        expected_sha256: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> SealedShard:
        """Stream a file into VRAM, byte for byte, and seal it.

        The file is read in ``chunk_bytes`` chunks straight into the device buffer: host memory
        stays bounded by two chunks whatever the file size. A ``.safetensors`` file is sealed
        whole (header included) and its tensor map recorded, so a failed verification names the
        tensors. ``expected_sha256`` (the file's published SHA-256) is computed while loading
        and checked before the shard is sealed; on mismatch nothing stays allocated.

        :param shard_id: default: the file name when it is a valid shard id, else a random id.
        :param progress: called as ``progress(bytes_loaded, total_bytes)`` after each chunk.
        :raises InvalidInput: the path is missing, not a regular file, or empty.
        :raises IntegrityViolation: SHA-256 mismatch, a malformed safetensors header, or the
            file changed size (or its safetensors header changed) while being read. The tensor
            map recorded is parsed again from the bytes in VRAM and must equal the one read
            before loading.
        """
        self._check_open()
        p = Path(path)
        try:
            st = p.stat()
        except OSError as exc:
            raise InvalidInput(f"cannot read {p}: {exc.strerror or exc}") from None
        if not p.is_file():
            raise InvalidInput(f"{p} is not a regular file")
        nbytes = check_size(st.st_size, field=f"size of {p}")
        if shard_id is None:
            try:
                shard_id = check_shard_id(p.name)
            except InvalidInput:
                shard_id = None
        sid = self._shard_id(shard_id)
        expected = check_sha256_hex(expected_sha256) if expected_sha256 is not None else None
        tensors: tuple[TensorRange, ...] = ()
        if p.suffix == ".safetensors":
            with p.open("rb") as fh:
                tensors = read_tensor_map(fh, nbytes)
        digest_of_file: list[str] = []

        def write(buf: DeviceBuffer, op: Operation) -> None:
            digest_of_file.append(
                stream_file(self._backend, buf, p, nbytes, self._staging, progress)
            )
            if expected is not None:
                check_expected_sha256(digest_of_file[0], expected)
            if tensors and parse_tensor_map(device_reader(self._backend, buf), nbytes) != tensors:
                # Without expected_sha256 nothing else notices a header rewritten mid-load.
                raise IntegrityViolation(f"{p} changed while it was loaded (safetensors header)")

        return self._seal(sid, nbytes, write, "file", tensors, lambda: digest_of_file[0])

    def _shard_id(self, shard_id: str | None) -> str:
        return check_shard_id(shard_id) if shard_id is not None else f"shard-{uuid.uuid4().hex}"

    def _seal(
        self,
        shard_id: str,
        nbytes: int,
        write: Callable[[DeviceBuffer, Operation], None],
        source: str,
        tensors: tuple[TensorRange, ...],
        file_sha: str | Callable[[], str | None] | None,
    ) -> SealedShard:
        attributes = self._base_attributes(shard_id, nbytes)
        attributes |= {"digest_alg": DIGEST_ALG, "leaf_size": self.leaf_size}

        def seal(op: Operation) -> SealedShard:
            self._residency.reserve(shard_id)
            buf: DeviceBuffer | None = None
            allocated: list[DeviceBuffer] = []  # set even if a narration wrapper then raises
            try:
                buf = self._allocate(shard_id, nbytes, allocated)
                self._narrate(
                    "copy",
                    lambda cop: write(buf, cop),
                    **self._base_attributes(shard_id, nbytes),
                    source=source,
                )
                leaves = self._digest(shard_id, buf)
                op.attributes["leaf_count"] = len(leaves)
                shard = self._sign(shard_id, buf, leaves, tensors, file_sha)
                self._emit(
                    events.VramSealed(
                        worker_id=self.worker_id,
                        shard_id=shard_id,
                        device=self.device,
                        nbytes=nbytes,
                        digest=shard.digest,
                        digest_alg=shard.digest_alg,
                        leaf_size=shard.leaf_size,
                        backend=self._backend.name,
                        file_sha256=shard.file_sha256 or "",
                    )
                )
            except BaseException as exc:
                self._abandon(shard_id, nbytes, allocated[0] if allocated else None, exc)
                with contextlib.suppress(Exception):  # capacity as it is after the clean-up
                    self._capacity_attributes(op)
                raise
            if not self._residency.commit(Resident(shard, buf, leaves)):
                # close() ran meanwhile: this shard must not outlive the manager.
                self._release_buffer(shard_id, buf)
                raise VramError("the manager was closed while the shard was being sealed")
            return shard

        result: SealedShard = self._narrate("seal", seal, **attributes)
        return result

    def _allocate(self, shard_id: str, nbytes: int, allocated: list[DeviceBuffer]) -> DeviceBuffer:
        def allocate(op: Operation) -> DeviceBuffer:
            free = self._backend.mem_info(self.device)[0]
            if nbytes > free:
                raise InsufficientVram(nbytes, free, device=self.device)
            buf = self._backend.allocate(self.device, nbytes)
            self._residency.add_bytes(nbytes)
            try:
                finding = self.policy.check_allocation(self._backend.memory_kind(buf), self.device)
                self._enforce([finding] if finding else [])
            except BaseException:
                self._free(buf)
                raise
            allocated.append(buf)
            self._emit(
                events.VramAllocated(
                    worker_id=self.worker_id,
                    shard_id=shard_id,
                    device=self.device,
                    nbytes=nbytes,
                    backend=self._backend.name,
                )
            )
            self._capacity_attributes(op)
            return buf

        result: DeviceBuffer = self._narrate(
            "allocate", allocate, **self._base_attributes(shard_id, nbytes)
        )
        return result

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
        # A backend's message may carry a newline or an escape; the event must still be written.
        reason = scrub_text(reason)
        try:
            with contextlib.suppress(AuditError):  # the original error matters more
                self._emit_alloc_failed(shard_id, nbytes, reason)
        finally:
            if buf is not None:
                self._free(buf)
        if buf is not None:
            with contextlib.suppress(AuditError):
                self._emit(
                    events.VramDeallocated(
                        worker_id=self.worker_id,
                        shard_id=shard_id,
                        device=self.device,
                        nbytes=nbytes,
                    )
                )

    def _emit_alloc_failed(self, shard_id: str, nbytes: int, reason: str) -> None:
        self._emit(
            events.VramAllocationFailed(
                worker_id=self.worker_id,
                shard_id=shard_id,
                device=self.device,
                nbytes=nbytes,
                backend=self._backend.name,
                reason=reason,
            )
        )

    def _digest(self, shard_id: str, buf: DeviceBuffer) -> list[bytes]:
        expected_leaves = leaf_count(buf.nbytes, self.leaf_size)

        def digest(op: Operation) -> list[bytes]:
            offered = self._hook.vramcore_device_digest(
                backend=self._backend, buffer=buf, leaf_size=self.leaf_size, leaf_range=None
            )
            leaves: list[bytes]
            if offered is not None:
                op.attributes["source"] = "device"
                packed = bytes(offered.leaves)
                leaves = [packed[i : i + 32] for i in range(0, len(packed), 32)]
                if len(leaves) != expected_leaves or any(len(h) != 32 for h in leaves):
                    raise VramError(
                        "the device digest plugin returned a malformed leaf list "
                        f"({len(leaves)} leaves, expected {expected_leaves})"
                    )
            else:
                op.attributes["source"] = "host"
                with self._staging.borrow(2) as staging:
                    leaves = read_and_hash(
                        buf.nbytes,
                        lambda offset, out: self._backend.read_into(buf, offset, out),
                        self.leaf_size,
                        self._chunk_bytes,
                        staging,
                    )
            op.attributes["leaf_count"] = len(leaves)
            return leaves

        result: list[bytes] = self._narrate(
            "digest",
            digest,
            shard_id=shard_id,
            device=self.device,
            nbytes=buf.nbytes,
            backend=self._backend.name,
            leaf_size=self.leaf_size,
        )
        return result

    def _sign(
        self,
        shard_id: str,
        buf: DeviceBuffer,
        leaves: list[bytes],
        tensors: tuple[TensorRange, ...],
        file_sha: str | Callable[[], str | None] | None,
    ) -> SealedShard:
        unsigned = SealedShard(
            shard_id=shard_id,
            gpu_device=self.device,
            vram_bytes=buf.nbytes,
            digest=merkle_root(leaves).hex(),
            digest_alg=DIGEST_ALG,
            leaf_size=self.leaf_size,
            sealed_at=datetime.now(UTC),
            signature=b"\x00" * 32,
            tensors=tensors,
            file_sha256=file_sha() if callable(file_sha) else file_sha,
        )
        return attrs.evolve(unsigned, signature=self._require_key().mac(unsigned.signed_message()))

    def _require_key(self) -> SecretKey:
        if self._key is None or self._key.wiped:
            raise VramError("this VramManager is closed; create a new one")
        return self._key

    # -- verification ---------------------------------------------------------------

    def verify_sealed(self, shard: SealedShard) -> None:
        """Check ``shard``'s signature and recompute its digest from VRAM.

        :raises SealVerificationFailed: bad signature (``reason="signature"``), another
            device (``"device"``), a seal that is not the resident one (``"stale"``), or bytes
            that changed (``"digest"``, with ``corrupted_ranges`` and ``tensors``). Audited as
            a critical event first.
        :raises NotSealed: no shard with this id is resident here.
        """
        self._check_open()
        resident = self._resident_for(shard)
        self._verify(shard, resident)

    @contextlib.contextmanager
    def verified(self, shard: SealedShard) -> Iterator[DeviceBuffer]:
        """Verify ``shard``, then yield its device buffer for inference.

        The buffer stays allocated until the block exits, even if another thread asks to
        deallocate the shard meanwhile. Use ``buffer.native`` for the backend's own object.
        """
        self._check_open()
        shard_id = shard.shard_id if isinstance(shard, SealedShard) else ""
        with self._residency.reading(shard_id) as resident:
            if resident is None:
                resident = self._resident_for(shard)  # raises with the right error
            self._verify(shard, resident)
            yield resident.buffer

    def _resident_for(self, shard: SealedShard) -> Resident:
        if not isinstance(shard, SealedShard):
            raise InvalidInput(f"expected a SealedShard, got {type(shard).__name__}")
        resident = self._residency.get(shard.shard_id)
        if resident is None:
            # A forged, tampered or foreign seal is a verification failure (audited), not
            # merely "not resident": check the signature and device before saying NotSealed.
            problem = seal_problem(shard, self._require_key(), self.device, None)
            if problem is not None:
                self._fail(shard, problem)
            raise NotSealed(
                f"shard {shard.shard_id} is not resident on this manager (never sealed here, "
                "or deallocated); seal it again"
            )
        return resident

    def _verify(self, shard: SealedShard, resident: Resident) -> None:
        def verify(op: Operation) -> None:
            problem = seal_problem(shard, self._require_key(), self.device, resident.shard)
            if problem is None:
                leaves = self._digest(shard.shard_id, resident.buffer)
                problem = digest_problem(shard, resident.leaves, leaves)
            if problem is not None:
                op.attributes["outcome"] = "mismatch"
                op.attributes["reason"] = problem.reason
                self._fail(shard, problem)
            self._emit(
                events.SealVerified(
                    worker_id=self.worker_id,
                    shard_id=shard.shard_id,
                    device=self.device,
                    nbytes=shard.vram_bytes,
                    digest=shard.digest,
                )
            )

        self._narrate(
            "verify",
            verify,
            **self._base_attributes(shard.shard_id, shard.vram_bytes),
            digest_alg=shard.digest_alg,
            leaf_size=shard.leaf_size,
        )

    def _fail(self, shard: SealedShard, problem: Problem) -> NoReturn:
        self._emit(
            events.SealVerificationFailed(
                worker_id=self.worker_id,
                shard_id=shard.shard_id,
                device=self.device,
                reason=problem.reason,
                detail=problem.detail,
                byte_ranges=problem.ranges,
                tensors=problem.tensors,
            )
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
        resident = self._residency.take(shard_id)
        self._release_buffer(shard_id, resident.buffer)

    def _release_buffer(self, shard_id: str, buf: DeviceBuffer) -> None:
        def deallocate(op: Operation) -> None:
            self._free(buf)
            self._capacity_attributes(op)
            self._emit(
                events.VramDeallocated(
                    worker_id=self.worker_id,
                    shard_id=shard_id,
                    device=self.device,
                    nbytes=buf.nbytes,
                )
            )

        self._narrate("deallocate", deallocate, **self._base_attributes(shard_id, buf.nbytes))

    def shards(self) -> list[SealedShard]:
        """The seals of every shard resident on this manager."""
        return self._residency.seals()

    # -- lifecycle --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise VramError("this VramManager is closed; create a new one")

    def close(self) -> None:
        """Free every resident shard, flush and close the sinks, wipe the key and token.

        Idempotent. Raises :class:`AuditError` after cleaning up if a sink failed to close
        (events may not be durable).
        """
        # Shards in use by other threads are freed once their verified() blocks exit.
        residents = self._residency.take_all()
        if residents is None:
            return
        errors: list[BaseException] = []
        for resident in residents:
            try:
                self._release_buffer(resident.shard.shard_id, resident.buffer)
            except BaseException as exc:
                errors.append(exc)
        errors.extend(self._teardown())
        if errors:
            raise AuditError(
                f"closing the manager hit {len(errors)} error(s); the first: "
                f"{type(errors[0]).__name__}: {errors[0]}"
            ) from errors[0]

    def _teardown(self) -> list[BaseException]:
        self._closed = True
        errors = self._audit.close()
        if self._owns_backend and getattr(self, "_backend", None) is not None:
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
        return (
            f"<VramManager {self._backend.name} GPU{getattr(self, 'device', '?')} "
            f"worker={self.worker_id} token={self._token.fingerprint} {state}>"
        )
