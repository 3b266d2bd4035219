"""One seal, as an object: its source, buffer, digest and events, its steps as methods.

:meth:`Sealing.run` narrates the whole seal as the ``seal`` operation and, inside it:

1. **allocate** (an ``allocate`` operation): check the room, allocate, check the allocation
   against the VRAM-only policy, audit ``vram.allocated``;
2. **copy** (a ``copy`` operation): the source streams its bytes into the buffer while the
   leaves the digest source asked for are hashed from the very bytes staged for the copy;
3. **digest** (a ``digest`` operation): the digest source's digest of the buffer, cross-checked
   against those staged hashes (:meth:`vramcore._digests.DigestSource.sealing`);
4. **sign**: the HMAC over the seal's canonical fields; the buffer's tensor views are attached
   from the signed tensor map; audit ``vram.sealed`` (critical);
5. **commit**: the shard becomes resident.

When any step fails, :meth:`Sealing._abandon` undoes what was done (the reservation, the
buffer: memory is back where it was), audits why (``vram.seal_refused`` when the bytes failed a
check, ``vram.allocation_failed`` otherwise, then ``vram.deallocated``) and lets the error go on.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs

from vramcore._core import Core
from vramcore._digests import Digest, StagedLeaves
from vramcore._loading import FileSource, Progress, Source, StagingFactory
from vramcore._residency import Resident
from vramcore._tensors import attach_tensor_views
from vramcore.backend import DeviceBuffer
from vramcore.digest import DIGEST_ALG, ShardDigest
from vramcore.errors import (
    ConfigError,
    InsufficientVram,
    IntegrityViolation,
    ManagerClosed,
    VramError,
)
from vramcore.narration import Operation
from vramcore.shard import SealedShard

__all__ = ["CROSS_CHECKS", "Sealing", "open_file"]

#: The ``cross_check`` values a seal accepts: a CSPRNG sample of leaves, or every leaf.
CROSS_CHECKS = ("sample", "full")


def open_file(
    core: Core,
    shard_id: str,
    path: Path,
    chunk_bytes: int,
    expected_sha256: str | None,
    *,
    want_sha256: bool,
    progress: Progress | None,
    readers: int,
) -> FileSource:
    """The source of :meth:`~vramcore.VramManager.seal_file`; a file it refuses before
    anything is allocated (a malformed safetensors header) is audited as ``vram.seal_refused``.
    """
    try:
        return FileSource(
            path,
            chunk_bytes,
            expected_sha256=expected_sha256,
            want_sha256=want_sha256,
            progress=progress,
            readers=readers,
        )
    except IntegrityViolation as exc:
        with contextlib.suppress(VramError):
            core.emitter.seal_refused(shard_id, 0, exc.reason, str(exc))
        raise


class Sealing:
    """Seal ``source`` as shard ``shard_id`` on ``core``'s device.

    :param core: the manager's working parts.
    :param shard_id: the checked shard id.
    :param source: the bytes to seal.
    :param staging: lends the staging buffers of the copy.
    :param cross_check: ``"sample"`` or ``"full"`` (see :class:`~vramcore._digests.StagedLeaves`).
    """

    def __init__(
        self,
        core: Core,
        shard_id: str,
        source: Source,
        *,
        staging: StagingFactory,
        cross_check: str,
    ) -> None:
        self._core = core
        self.shard_id = shard_id
        self.source = source
        self._staging = staging
        self.cross_check = cross_check
        self.buffer: DeviceBuffer | None = None
        self.staged: StagedLeaves | None = None
        self.digest: Digest | None = None
        self.file_sha256: str | None = None
        self.shard: SealedShard | None = None
        self.committed = False

    def run(self) -> SealedShard:
        """Seal, as the narrated ``seal`` operation; on any failure nothing stays allocated."""
        core = self._core
        attributes = core.facts(
            self.shard_id,
            self.source.nbytes,
            digest_alg=DIGEST_ALG,
            leaf_size=core.leaf_size,
            cross_check=self.cross_check,
        )
        with core.residency.operation():
            try:
                shard: SealedShard = core.perform("seal", self._seal, **attributes)
            except BaseException:
                if self.committed:
                    # A wrapper failed around a seal that succeeded: the caller never gets
                    # the seal, so the shard must not stay resident.
                    with contextlib.suppress(VramError):
                        resident = core.residency.take(self.shard_id)
                        core.release_buffer(self.shard_id, resident.buffer)
                raise
        return shard

    def _seal(self, op: Operation) -> SealedShard:
        core = self._core
        core.residency.reserve(self.shard_id)
        try:
            core.perform(
                "allocate", self._allocate, **core.facts(self.shard_id, self.source.nbytes)
            )
            core.perform(
                "copy",
                self._copy,
                **core.facts(self.shard_id, self.source.nbytes, source=self.source.kind),
            )
            core.residency.check_running()
            core.perform(
                "digest",
                self._digest,
                **core.facts(self.shard_id, self.source.nbytes, leaf_size=core.leaf_size),
            )
            shard = self._sign()
            op.attributes["leaf_count"] = len(self._digest_of().leaves) // 32
            attach_tensor_views(self._buffer(), shard.tensors, core.backend)
            core.emitter.sealed(shard)
        except BaseException as exc:
            self._abandon(exc)
            with contextlib.suppress(Exception):  # capacity as it is after the clean-up
                core.capacity(op)
            raise
        self._commit(shard)
        return shard

    def _allocate(self, op: Operation) -> None:
        core, nbytes = self._core, self.source.nbytes
        free = core.backend.mem_info(core.device)[0]
        if nbytes > free:
            raise InsufficientVram(nbytes, free, device=core.device)
        buf = core.backend.allocate(core.device, nbytes)
        core.residency.add_bytes(nbytes)
        try:
            if not isinstance(buf, DeviceBuffer) or buf.nbytes != nbytes:
                raise ConfigError(f"backend {core.backend.name} returned a malformed allocation")
            finding = core.policy.check_allocation(core.backend.memory_kind(buf), core.device)
            core.enforce([finding] if finding else [])
            core.emitter.allocated(self.shard_id, nbytes)
        except BaseException:
            core.free(buf)
            raise
        self.buffer = buf
        core.capacity(op)

    def _copy(self, op: Operation) -> None:
        core = self._core
        self.staged = core.digests.staged_leaves(self.source.nbytes, self.cross_check)
        self.file_sha256 = self.source.load(
            core.backend, self._buffer(), staging=self._staging, staged=self.staged
        )
        if isinstance(self.source, FileSource) and self.source.timeline is not None:
            op.attributes.update(self.source.timeline.attributes(self.source.readers))

    def _digest(self, op: Operation) -> None:
        assert self.staged is not None
        digest = self._core.digests.sealing(self._buffer(), self.staged)
        self.digest = digest
        op.attributes["source"] = digest.source
        op.attributes["leaf_count"] = len(digest.leaves) // 32
        if digest.fallback:
            self._core.emitter.digest_fallback(self.shard_id, "seal", digest.fallback)

    def _sign(self) -> SealedShard:
        digest, buf = self._digest_of(), self._buffer()
        assert digest.root is not None
        unsigned = SealedShard(
            shard_id=self.shard_id,
            gpu_device=self._core.device,
            vram_bytes=buf.nbytes,
            digest=digest.root.hex(),
            digest_alg=DIGEST_ALG,
            leaf_size=self._core.leaf_size,
            sealed_at=datetime.now(UTC),
            signature=b"\x00" * 32,
            tensors=self.source.tensors,
            file_sha256=self.file_sha256,
        )
        signature = self._core.key().mac(unsigned.signed_message())
        self.shard = attrs.evolve(unsigned, signature=signature)
        return self.shard

    def _commit(self, shard: SealedShard) -> None:
        digest = self._digest_of()
        assert digest.root is not None
        sealed = ShardDigest(digest.root, digest.leaves, digest.source)
        # Leaves hashed on the host were hashed from the bytes; a device's are trusted only
        # once they are shown to give the signed root (before the first sampled check).
        resident = Resident(shard, self._buffer(), sealed, leaves_checked=digest.source == "host")
        if not self._core.residency.commit(resident):
            # close() ran meanwhile: this shard must not outlive the manager.
            self._core.release_buffer(self.shard_id, self._buffer())
            raise ManagerClosed("the manager was closed while the shard was being sealed")
        self.committed = True

    def _abandon(self, exc: BaseException) -> None:
        """Undo a failed seal: free what was allocated and audit it, then let ``exc`` go on."""
        core, nbytes, buf = self._core, self.source.nbytes, self.buffer
        core.residency.cancel(self.shard_id)
        try:
            with contextlib.suppress(VramError):  # the original error matters more
                if isinstance(exc, IntegrityViolation):  # the bytes, not the device, failed
                    core.emitter.seal_refused(self.shard_id, nbytes, exc.reason, str(exc))
                else:
                    core.emitter.allocation_failed(self.shard_id, nbytes, _reason(exc))
        finally:
            if buf is not None:
                self.buffer = None
                core.free(buf)
        if buf is not None:
            with contextlib.suppress(VramError):
                core.emitter.deallocated(self.shard_id, nbytes)

    def _buffer(self) -> DeviceBuffer:
        assert self.buffer is not None
        return self.buffer

    def _digest_of(self) -> Digest:
        assert self.digest is not None
        return self.digest


def _reason(exc: BaseException) -> Any:
    return f"{type(exc).__name__}: {exc}" if isinstance(exc, VramError) else type(exc).__name__
