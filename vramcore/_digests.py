"""Where a digest comes from: the one place that decides device or host, and checks the device.

:class:`DigestSource` answers three questions about a device buffer, always in one shape
(:class:`Digest`: root + packed leaf hashes, and where they came from): the whole shard
(:meth:`~DigestSource.whole`), some leaves (:meth:`~DigestSource.leaves`, one call for a
sampled check) and a leaf range (:meth:`~DigestSource.leaf_range`, a scrub slice). It asks the
device first when a plugin implements :func:`~vramcore.hookspecs.vramcore_device_digest`, and
hashes on the host otherwise:

* the plugin returns ``None``: it cannot digest this backend's buffers; the host hashes;
* it raises :class:`~vramcore.errors.DeviceDigestUnavailable`: it can, but not this time; the
  host hashes, and :attr:`Digest.fallback` says why, for the caller to audit as a warning;
* it raises anything else (``SystemExit`` included) or answers with the wrong shape: a typed
  :class:`~vramcore.errors.DigestFailed` (or :class:`~vramcore.errors.ConfigError`), never a
  bare error and never a silent pass. A vramcore error it raises passes through as it is.

**Sealing** (:meth:`~DigestSource.sealing`) adds the cross-check. While the source's bytes are
staged for the copy, :class:`StagedLeaves` hashes leaves of them on the host: every leaf when
no device digest is installed (that *is* the digest), when the device declined the last seal,
or with ``cross_check="full"``; otherwise a CSPRNG sample (see :class:`StagedLeaves`). The
digest the seal signs, from the device or read back from VRAM, must agree with those host
hashes of the bytes as they were staged, or the seal is refused
(:class:`~vramcore.errors.IntegrityViolation`, reason ``cross_check``): a copy that lost or
left stale a chunk, or a device digest that lies, never gets signed. When the host hashed
every staged leaf and no device answered, the staged hashes are the digest, and a CSPRNG
sample of leaves from every copy chunk is read back from VRAM and compared with them before
anything is signed (:meth:`~DigestSource._spot_check`). This holds on every seal, whatever the
device did before.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from vramcore._hookutil import BUILTIN_PLUGIN, implementers
from vramcore.backend import AllocatorBackend, DeviceBuffer, DeviceDigest
from vramcore.digest import (
    HASH_SIZE,
    LeafHasher,
    corrupted_ranges,
    hash_leaves_at,
    hash_leaves_packed,
    host_leaves,
    leaf_byte_ranges,
    leaf_count,
    merkle_root,
)
from vramcore.errors import (
    ConfigError,
    DeviceDigestUnavailable,
    DigestFailed,
    IntegrityViolation,
    VramError,
)
from vramcore.validation import scrub_text

__all__ = [
    "STRATA_PER_CHUNK",
    "Digest",
    "DigestSource",
    "StagedLeaves",
    "differing_ranges",
]

#: Leaves drawn from each copy chunk for the cross-check of a seal (see :class:`StagedLeaves`).
STRATA_PER_CHUNK = 4


@attrs.frozen(eq=False)
class Digest:
    """One answer: the root (``None`` for part of a shard), packed leaves, their origin.

    :attr root: the RFC 6962 root over the whole shard, or ``None``.
    :attr leaves: packed leaf hashes, 32 bytes each, in the order asked for.
    :attr source: ``"device"`` or ``"host"``.
    :attr fallback: why the device declined (:class:`DeviceDigestUnavailable`), else ``""``.
    """

    root: bytes | None
    leaves: bytes
    source: str
    fallback: str = ""


class StagedLeaves:
    """Host hashes of leaves of a seal's bytes, taken as the bytes are staged for the copy.

    Fed each copy chunk (leaf-aligned, before it is handed to the device). With
    ``every_leaf`` it hashes all leaves (on the worker threads); otherwise, from every chunk,
    it draws :data:`STRATA_PER_CHUNK` leaves by a CSPRNG, one from each equal part of the
    chunk (all of a chunk's leaves when it has fewer).

    Why that many: a copy that is lost, or leaves a chunk stale, leaves *every* leaf of that
    chunk different from the staged bytes. A uniform sample of ``k`` of ``n`` leaves misses
    one lost chunk of ``c`` leaves with probability ``C(n-c, k) / C(n, k) <= (1 - c/n)**k``,
    so ``P(miss) <= 1e-9`` needs ``k >= ln(1e9) / -ln(1 - c/n) ~= 20.7 n/c`` leaves: 2 653 of
    the 16 384 leaves of a 1 GiB shard with 8 MiB chunks. Drawing leaves *from every chunk*
    does better with fewer: each chunk has at least one sampled leaf, so a lost or stale
    chunk is caught with probability 1 (>= 1 - 1e-9) by 4 leaves per chunk (512 for that
    shard, 3 % of its bytes hashed on the host). The four parts also catch, with certainty, a
    loss of any quarter of a chunk (a backend that splits a copy into up to four transfers),
    and a smaller loss of a fraction ``f`` of a chunk with probability at least ``f``.
    Leaves whose stale bytes happen to equal the staged ones are no loss: VRAM holds the
    right bytes there.
    """

    def __init__(self, nbytes: int, leaf_size: int, workers: int, *, every_leaf: bool) -> None:
        self.leaf_size = leaf_size
        self.every_leaf = every_leaf
        self._all = LeafHasher(nbytes, leaf_size, workers) if every_leaf else None
        self._sampled: dict[int, bytes] = {}
        self._chunks: list[tuple[int, int]] = []  # (first leaf, leaves) of each chunk fed
        self._draw = secrets.SystemRandom()

    def feed(self, offset: int, chunk: memoryview) -> Callable[[], None]:
        """Hash the leaves taken from ``chunk`` (the bytes at ``offset``, leaf-aligned).

        :return: a waiter; ``chunk`` must stay unchanged until it returned.
        """
        self._chunks.append((offset // self.leaf_size, leaf_count(len(chunk), self.leaf_size)))
        if self._all is not None:
            return self._all.feed(offset, chunk)
        self._sample(offset, chunk)
        return _done

    def hash_here(self, offset: int, chunk: memoryview) -> None:
        """What :meth:`feed` hashes of ``chunk``, on the calling thread (a file load's reader
        threads hash the chunk each has just read, while its bytes are in cache)."""
        self._chunks.append((offset // self.leaf_size, leaf_count(len(chunk), self.leaf_size)))
        if self._all is not None:
            self._all.hash_here(offset, chunk)
        else:
            self._sample(offset, chunk)

    def _strata(self, count: int) -> list[int]:
        """One leaf drawn by the CSPRNG from each of the equal parts of a chunk of ``count``
        leaves (indices within the chunk)."""
        parts = min(STRATA_PER_CHUNK, count)
        bounds = [part * count // parts for part in range(parts + 1)]
        return [lo + self._draw.randrange(hi - lo) for lo, hi in itertools.pairwise(bounds)]

    def _sample(self, offset: int, chunk: memoryview) -> None:
        size = self.leaf_size
        first = offset // size
        for leaf in self._strata(leaf_count(len(chunk), size)):
            self._sampled[first + leaf] = hash_leaves_packed(
                chunk[leaf * size : (leaf + 1) * size], size, 1
            )

    def spot_checks(self) -> tuple[int, ...]:
        """Leaves to read back from VRAM after a seal hashed on the host: drawn from every
        copy chunk as a sampled cross-check draws them (the same odds against a lost or stale
        chunk), fresh from the CSPRNG after the copies are done."""
        return tuple(
            sorted({first + leaf for first, count in self._chunks for leaf in self._strata(count)})
        )

    def root(self) -> bytes:
        """The RFC 6962 root of every leaf (``every_leaf`` only)."""
        if self._all is None:
            raise ValueError("a sampled cross-check hashes no root")
        return self._all.root()

    def hashes(self) -> tuple[tuple[int, ...] | None, bytes]:
        """``(indices, packed hashes)``: ``indices`` is ``None`` when every leaf was hashed."""
        if self._all is not None:
            return None, self._all.packed()
        indices = tuple(sorted(self._sampled))
        return indices, b"".join(self._sampled[i] for i in indices)


def _done() -> None:
    return None


class DigestSource:
    """Digests of one backend's buffers, from the device when it answers, else the host.

    :param hook: the plugin manager's hook relay.
    :param backend: the backend whose buffers are digested.
    :param leaf_size: the Merkle leaf size.
    :param staging: lends two staging buffers for a host read-back (a context manager).
    :param workers: host hashing threads.
    """

    def __init__(
        self,
        hook: Any,
        backend: AllocatorBackend,
        leaf_size: int,
        *,
        staging: Callable[[], Any],
        workers: int,
    ) -> None:
        self._hook = hook
        self._backend = backend
        self.leaf_size = leaf_size
        self._staging = staging
        self._workers = workers
        impls = hook.vramcore_device_digest.get_hookimpls()
        self.has_device = any(i.plugin_name != BUILTIN_PLUGIN for i in impls)
        # A hint only: which staged hashing the next seal does. Every leaf until the device
        # answered a seal (so a device that declines costs no read-back, and the first device
        # digest is compared leaf by leaf and root), a sample after. The device is always
        # asked, and always cross-checked.
        self._declined_last = True

    # -- sealing ------------------------------------------------------------------------

    def staged_leaves(self, nbytes: int, cross_check: str) -> StagedLeaves:
        """What a new seal hashes from its bytes as they are staged."""
        every = cross_check == "full" or not self.has_device or self._declined_last
        return StagedLeaves(nbytes, self.leaf_size, self._workers, every_leaf=every)

    def sealing(self, buf: DeviceBuffer, staged: StagedLeaves) -> Digest:
        """The digest a new seal signs, cross-checked against ``staged``.

        :raises IntegrityViolation: the digest disagrees with the staged bytes (reason
            ``cross_check``): the bytes in VRAM are not the bytes handed to the device, or the
            device digest is wrong. Nothing is signed.
        :raises DigestFailed: the device digest or the read-back failed unexpectedly.
        """
        indices, hashes = staged.hashes()
        answer, fallback = self._device(buf)
        self._declined_last = answer is None
        if answer is None:
            if indices is None:  # every staged leaf is hashed: that is the digest itself,
                digest = Digest(staged.root(), hashes, "host", fallback)
                self._spot_check(buf, digest, staged.spot_checks())  # if VRAM holds them
                return digest
            answer = self._host(buf, None, fallback)
        if indices is None:
            same = answer.leaves == hashes and answer.root == staged.root()
            ranges = corrupted_ranges(hashes, answer.leaves, self.leaf_size, buf.nbytes)
        else:
            ranges = differing_ranges(
                hashes, _pick(answer.leaves, indices), indices, self.leaf_size, buf.nbytes
            )
            # The sample vouches for the leaves; the root the seal signs must also be the tree
            # over those leaves (node hashes only: about one SHA-256 of 65 bytes per leaf).
            same = not ranges and answer.root == merkle_root(answer.leaves)
        if not same:
            raise _cross_check_failed(answer, ranges)
        return answer

    def _spot_check(self, buf: DeviceBuffer, staged: Digest, indices: Sequence[int]) -> None:
        """Read leaves ``indices`` back from VRAM, hash them on the host and compare them with
        the staged hashes: a seal hashed from the staged bytes alone would sign bytes that a
        lost or stale copy never put in VRAM.

        :raises IntegrityViolation: VRAM differs from the staged bytes (reason ``cross_check``).
        """
        back = self._host_leaves_at(buf, indices, staged.fallback)
        ranges = differing_ranges(
            _pick(staged.leaves, indices), back.leaves, indices, self.leaf_size, buf.nbytes
        )
        if ranges:
            raise _cross_check_failed(back, ranges)

    # -- verification -------------------------------------------------------------------

    def whole(self, buf: DeviceBuffer) -> Digest:
        """Root and every leaf of ``buf``."""
        answer, fallback = self._device(buf)
        return answer if answer is not None else self._host(buf, None, fallback)

    def leaf_range(self, buf: DeviceBuffer, first: int, stop: int) -> Digest:
        """The packed hashes of leaves ``first`` to ``stop - 1`` (``root`` is ``None``)."""
        answer, fallback = self._device(buf, leaf_range=(first, stop))
        return answer if answer is not None else self._host(buf, (first, stop), fallback)

    def leaves(self, buf: DeviceBuffer, indices: Sequence[int]) -> Digest:
        """The packed hashes of the sorted, distinct leaves ``indices``, in that order.

        One device call with ``leaf_indices``; a plugin that ignores the argument answers for
        the whole buffer and the core picks the leaves from that. On the host, each run of
        consecutive indices is read and hashed.
        """
        answer, fallback = self._device(buf, leaf_indices=tuple(indices))
        if answer is not None:
            return answer
        return self._host_leaves_at(buf, indices, fallback)

    def _host_leaves_at(self, buf: DeviceBuffer, indices: Sequence[int], fallback: str) -> Digest:
        """The packed hashes of the sorted leaves ``indices``, hashed on the host: straight
        from the backend's host view when it offers one, else each run read back."""
        try:
            view = self._backend.host_view(buf)
            if view is not None:
                packed = hash_leaves_at(view[: buf.nbytes], indices, self.leaf_size, self._workers)
                return Digest(None, packed, "host", fallback)
        except VramError:
            raise
        except (Exception, SystemExit) as exc:
            raise self._read_back_failed(exc) from exc
        packed = b"".join(self._host(buf, run, "").leaves for run in _runs(indices))
        return Digest(None, packed, "host", fallback)

    # -- the two origins ----------------------------------------------------------------

    def _device(
        self,
        buf: DeviceBuffer,
        *,
        leaf_range: tuple[int, int] | None = None,
        leaf_indices: tuple[int, ...] | None = None,
    ) -> tuple[Digest | None, str]:
        """The device's answer, shape-checked, or ``None`` and why the device declined
        (``""`` when no plugin answers for this backend)."""
        if not self.has_device:
            return None, ""
        try:
            offered = self._hook.vramcore_device_digest(
                backend=self._backend,
                buffer=buf,
                leaf_size=self.leaf_size,
                leaf_range=leaf_range,
                leaf_indices=leaf_indices,
            )
        except DeviceDigestUnavailable as exc:
            return None, scrub_text(str(exc)) or type(exc).__name__
        except VramError:
            raise
        except (Exception, SystemExit) as exc:
            raise DigestFailed(
                f"the device digest plugin ({self._plugins()}) failed: {type(exc).__name__}"
            ) from exc
        if offered is None:
            return None, ""
        return self._checked(offered, buf, leaf_range, leaf_indices), ""

    def _host(self, buf: DeviceBuffer, leaf_range: tuple[int, int] | None, fallback: str) -> Digest:
        try:
            leaves = host_leaves(
                self._backend,
                buf,
                self.leaf_size,
                staging=self._staging,
                workers=self._workers,
                leaf_range=leaf_range,
            )
        except VramError:
            raise
        except (Exception, SystemExit) as exc:
            raise self._read_back_failed(exc) from exc
        root = merkle_root(leaves) if leaf_range is None else None
        return Digest(root, leaves, "host", fallback)

    def _read_back_failed(self, exc: BaseException) -> DigestFailed:
        return DigestFailed(
            f"reading the buffer back from backend {self._backend.name} failed: "
            f"{type(exc).__name__}"
        )

    def _plugins(self) -> str:
        return implementers(self._hook.vramcore_device_digest)

    def _checked(
        self,
        offered: object,
        buf: DeviceBuffer,
        leaf_range: tuple[int, int] | None,
        leaf_indices: tuple[int, ...] | None,
    ) -> Digest:
        total = leaf_count(buf.nbytes, self.leaf_size)
        if not isinstance(offered, DeviceDigest):
            raise self._bad(f"a {type(offered).__name__}, not a DeviceDigest")
        try:
            leaves = bytes(offered.leaves)
        except TypeError:
            raise self._bad("leaf hashes that are not bytes") from None
        root = offered.root
        whole = (
            offered.leaf_indices is None
            and offered.first_leaf == 0
            and len(leaves) == total * HASH_SIZE
            and isinstance(root, bytes)
            and len(root) == HASH_SIZE
        )
        if leaf_indices is not None:
            if offered.leaf_indices == leaf_indices and len(leaves) == len(leaf_indices) * 32:
                return Digest(None, leaves, "device")
            if whole:  # a plugin that ignores leaf_indices answered for the whole buffer
                return Digest(None, _pick(leaves, leaf_indices), "device")
            raise self._bad(f"no answer for the {len(leaf_indices)} leaves asked for")
        first, stop = leaf_range if leaf_range is not None else (0, total)
        if (
            offered.leaf_indices is not None
            or offered.first_leaf != first
            or len(leaves) != (stop - first) * HASH_SIZE
        ):
            raise self._bad(
                f"a malformed leaf list ({len(leaves) / HASH_SIZE:g} leaves from "
                f"{offered.first_leaf!r:.20}, expected {stop - first} from {first})"
            )
        if leaf_range is None and not whole:
            raise self._bad("no 32-byte root for a whole-shard digest")
        return Digest(root if leaf_range is None else None, leaves, "device")

    def _bad(self, what: str) -> ConfigError:
        return ConfigError(
            f"the device digest plugin ({self._plugins()}) returned {what}; the digest was refused"
        )


def _cross_check_failed(answer: Digest, ranges: Sequence[tuple[int, int]]) -> IntegrityViolation:
    where = f"bytes {ranges[0][0]}-{ranges[0][1] - 1}" if ranges else "the root"
    declined = f" (the device declined: {answer.fallback})" if answer.fallback else ""
    return IntegrityViolation(
        f"cross-check failed: the {answer.source} digest of the bytes in VRAM{declined} "
        f"disagrees with the host hashes of the bytes staged for the copy ({where}); a copy "
        "was lost or left stale, or the device digest is wrong; the shard was not sealed",
        reason="cross_check",
    )


def _pick(packed: bytes, indices: Sequence[int]) -> bytes:
    """The hashes of leaves ``indices`` out of every leaf's packed hashes."""
    return b"".join(packed[i * HASH_SIZE : (i + 1) * HASH_SIZE] for i in indices)


def _runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive runs ``(first, stop)`` of sorted distinct ``indices``."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def differing_ranges(
    expected: bytes, actual: bytes, indices: Sequence[int], leaf_size: int, nbytes: int
) -> list[tuple[int, int]]:
    """Byte ranges ``(start, end)`` of the leaves ``indices`` whose packed hashes differ
    between ``expected`` and ``actual`` (one hash per index, in order); adjacent ones merged."""
    differing = [
        leaf
        for n, leaf in enumerate(indices)
        if expected[n * HASH_SIZE : (n + 1) * HASH_SIZE]
        != actual[n * HASH_SIZE : (n + 1) * HASH_SIZE]
    ]
    return leaf_byte_ranges(differing, leaf_size, nbytes)
