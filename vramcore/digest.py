"""The shard digest: an RFC 6962 (RFC 9162) Merkle Tree Hash over fixed-size leaves.

``digest_alg = "rfc6962-sha256"``. The shard's bytes are cut into ``leaf_size`` leaves (the
last may be shorter); leaf hash = SHA-256(0x00 ‖ leaf), node hash = SHA-256(0x01 ‖ left ‖
right), the tree split at the largest power of two smaller than the leaf count. Keeping the
leaf hashes lets a failed verification name the corrupted byte ranges and lets a sampled check
compare a few leaves against the sealed ones.

Leaf hashes are kept *packed*: one ``bytes`` of 32 x n, never a list of n objects (an 80 GiB
shard has 1.3 million leaves). :class:`ShardDigest` pairs the root with them.

This module hashes on the host: leaves on a pool of worker threads (``hashlib`` releases the
GIL while it hashes a leaf, each worker taking one contiguous span so the per-task overhead
stays negligible), and a device buffer (:func:`host_leaves`) from a zero-copy view when the
backend's memory is host-addressable (:meth:`~vramcore.backend.AllocatorBackend.host_view`,
the mock), else read back through two staging buffers, one hashed while the next is read.
Whether a digest comes from the device or the host is decided in one place, the core's
private digest source (``vramcore._digests``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import attrs

from vramcore.backend import AllocatorBackend, DeviceBuffer
from vramcore.errors import ConfigError, InvalidInput
from vramcore.validation import check_leaf_size

__all__ = [
    "DEFAULT_LEAF_SIZE",
    "DIGEST_ALG",
    "HASH_SIZE",
    "LeafHasher",
    "ShardDigest",
    "corrupted_ranges",
    "default_workers",
    "hash_leaves",
    "hash_leaves_at",
    "hash_leaves_packed",
    "host_leaves",
    "leaf_byte_ranges",
    "leaf_count",
    "merkle_root",
]

DIGEST_ALG = "rfc6962-sha256"
DEFAULT_LEAF_SIZE = 65536
#: Bytes of one leaf or node hash.
HASH_SIZE = 32
#: Below this many bytes a span is hashed on the calling thread: handing it to a worker costs
#: more than it saves (and keeps the fixed cost of verifying a small shard low).
_INLINE_BYTES = 256 << 10
_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"


def default_workers() -> int:
    """Hashing threads when none are configured: ``VRAMCORE_HASH_WORKERS`` or the core count."""
    text = os.environ.get("VRAMCORE_HASH_WORKERS", "").strip()
    if text:
        if not text.isdigit() or not 1 <= int(text) <= 1024:
            raise ConfigError(
                f"VRAMCORE_HASH_WORKERS={text[:20]!r} must be a whole number from 1 to 1024"
            )
        return int(text)
    return os.cpu_count() or 2


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    """Hashing threads shared by every manager with this worker count (idle ones cost nothing)."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vramcore-hash")


def leaf_count(nbytes: int, leaf_size: int) -> int:
    """Number of leaves of an ``nbytes`` shard (at least one)."""
    return max(1, -(-nbytes // leaf_size))


def _hash_span(view: memoryview, leaf_size: int, out: memoryview) -> None:
    """Hash the leaves of ``view`` (leaf-aligned start) into ``out`` (32 bytes each)."""
    sha256 = hashlib.sha256
    pos = 0
    for off in range(0, len(view), leaf_size):
        h = sha256(_LEAF_PREFIX)
        h.update(view[off : off + leaf_size])
        out[pos : pos + HASH_SIZE] = h.digest()
        pos += HASH_SIZE


class LeafHasher:
    """Hashes a shard's leaves chunk by chunk into one packed buffer, on worker threads.

    :param nbytes: bytes covered, starting at leaf ``first_leaf`` of the shard.
    :param leaf_size: leaf size.
    :param workers: hashing threads (1: hash on the calling thread).
    :param first_leaf: index of the first leaf hashed (for leaf ranges).

    :meth:`feed` takes a leaf-aligned chunk and returns a waiter; the chunk's memory must stay
    unchanged until that waiter returned. :meth:`packed` waits for everything.
    """

    def __init__(self, nbytes: int, leaf_size: int, workers: int, first_leaf: int = 0) -> None:
        self.leaf_size = leaf_size
        self.first_leaf = first_leaf
        self._workers = max(1, workers)
        self._out = bytearray(-(-nbytes // leaf_size) * HASH_SIZE)
        self._futures: list[Future[None]] = []
        # Roots of the subtrees :meth:`hash_here` covered, by (first leaf, leaves): the tree
        # above them is all that is left to hash at the end (see :meth:`root`).
        self._subtrees: dict[int, tuple[int, bytes]] = {}

    def feed(self, offset: int, chunk: memoryview, *, join: bool = False) -> Callable[[], None]:
        """Hash ``chunk``, which holds the covered bytes from ``offset`` on (leaf-aligned).

        :param join: the caller hashes a share itself and returns when all of the chunk is
            hashed (for a caller with nothing else to do; saves one thread hand-off).
        """
        if offset % self.leaf_size:
            raise InvalidInput(f"chunk offset {offset} is not on a leaf boundary")
        out = memoryview(self._out)
        base = offset // self.leaf_size * HASH_SIZE
        n = len(chunk)
        size = self.leaf_size

        def target(start: int, stop: int) -> memoryview:
            dst = base + start // size * HASH_SIZE
            return out[dst : dst + leaf_count(stop - start, size) * HASH_SIZE]

        if self._workers == 1 or n <= _INLINE_BYTES:
            _hash_span(chunk, size, target(0, n))
            return _done
        span = -(-leaf_count(n, size) // self._workers) * size
        starts = list(range(0, n, span))
        pool = _pool(self._workers)
        handed = starts[1:] if join else starts  # with join, the first span is ours
        futures = [
            pool.submit(_hash_span, chunk[s : s + span], size, target(s, min(n, s + span)))
            for s in handed
        ]
        if join:
            _hash_span(chunk[:span], size, target(0, min(n, span)))
            _wait_all(futures)
            return _done
        self._futures.extend(futures)
        return functools.partial(_wait_all, futures)

    def hash_here(self, offset: int, chunk: memoryview) -> None:
        """Hash ``chunk`` (the covered bytes from ``offset`` on, leaf-aligned) on the calling
        thread, for a caller that is itself one of several threads sharing the work."""
        if offset % self.leaf_size:
            raise InvalidInput(f"chunk offset {offset} is not on a leaf boundary")
        size = self.leaf_size
        first, count = offset // size, leaf_count(len(chunk), size)
        hashes = memoryview(self._out)[first * HASH_SIZE : (first + count) * HASH_SIZE]
        _hash_span(chunk, size, hashes)
        self._subtrees[first] = (count, merkle_root(hashes))

    def root(self) -> bytes:
        """The RFC 6962 root over every leaf, once every chunk fed so far is hashed.

        When the chunks given to :meth:`hash_here` tile the leaves in equal runs of a power
        of two (the last may be shorter), RFC 6962's splits all fall between runs, so the
        root is the tree over the runs' roots, hashed by the threads that hashed each run;
        otherwise the whole tree is hashed here.
        """
        _wait_all(self._futures)
        total = len(self._out) // HASH_SIZE
        runs = [self._subtrees[k] for k in sorted(self._subtrees)]
        run = runs[0][0] if runs else 0
        tiled = (
            run > 0
            and run & (run - 1) == 0
            and sorted(self._subtrees) == list(range(0, total, run))
            and all(count == run for count, _ in runs[:-1])
            and runs[-1][0] == total - (len(runs) - 1) * run
        )
        if not tiled:
            return merkle_root(self._out)
        return merkle_root(b"".join(node for _, node in runs))

    def packed(self) -> bytes:
        """The packed leaf hashes, once every chunk fed so far is hashed."""
        _wait_all(self._futures)
        return bytes(self._out)


def _done() -> None:
    return None


def _wait_all(futures: Sequence[Future[None]]) -> None:
    for fut in futures:
        fut.result()


def hash_leaves_packed(
    data: bytes | bytearray | memoryview, leaf_size: int = DEFAULT_LEAF_SIZE, workers: int = 0
) -> bytes:
    """The packed leaf hashes of ``data`` (``b""`` for empty input), on ``workers`` threads.

    ``workers=0`` uses :func:`default_workers`.
    """
    check_leaf_size(leaf_size)
    view = memoryview(data).cast("B")
    if not len(view):
        return b""
    hasher = LeafHasher(len(view), leaf_size, workers or default_workers())
    hasher.feed(0, view)
    return hasher.packed()


def hash_leaves_at(view: memoryview, indices: Sequence[int], leaf_size: int, workers: int) -> bytes:
    """The packed hashes of leaves ``indices`` of ``view`` (a whole shard), in that order,
    split over ``workers`` threads."""
    picked = [view[i * leaf_size : (i + 1) * leaf_size] for i in indices]
    out = bytearray(len(picked) * HASH_SIZE)
    share = -(-len(picked) // max(1, workers)) if picked else 1
    futures = [
        _pool(max(1, workers)).submit(_hash_picked, picked[s : s + share], leaf_size, out, s)
        for s in range(0, len(picked), share)
    ]
    _wait_all(futures)
    return bytes(out)


def _hash_picked(leaves: list[memoryview], leaf_size: int, out: bytearray, first: int) -> None:
    target = memoryview(out)
    for n, leaf in enumerate(leaves, first):
        _hash_span(leaf, leaf_size, target[n * HASH_SIZE : (n + 1) * HASH_SIZE])


def hash_leaves(
    data: bytes | bytearray | memoryview, leaf_size: int = DEFAULT_LEAF_SIZE
) -> list[bytes]:
    """The leaf hashes of ``data`` as a list (one per leaf; an empty input has none)."""
    return list(_split(hash_leaves_packed(data, leaf_size)))


def _split(packed: bytes | bytearray | memoryview) -> Iterator[bytes]:
    view = memoryview(packed)
    for i in range(0, len(view), HASH_SIZE):
        yield bytes(view[i : i + HASH_SIZE])


def merkle_root(leaves: Sequence[bytes] | bytes | bytearray | memoryview) -> bytes:
    """The RFC 6962 tree head over leaf hashes, given as a list or packed (32 bytes each).

    ``SHA-256()`` of nothing for no leaves. Built bottom-up: adjacent pairs are hashed and an
    odd last node moves up unchanged, which gives the same tree as RFC 6962's split at the
    largest power of two below ``n``.
    """
    level = list(_split(leaves)) if isinstance(leaves, bytes | bytearray | memoryview) else leaves
    if not level:
        return hashlib.sha256(b"").digest()
    sha256 = hashlib.sha256
    nodes = list(level)
    while len(nodes) > 1:
        nxt = [
            sha256(_NODE_PREFIX + nodes[i] + nodes[i + 1]).digest()
            for i in range(0, len(nodes) - 1, 2)
        ]
        if len(nodes) % 2:
            nxt.append(nodes[-1])
        nodes = nxt
    return nodes[0]


def corrupted_ranges(
    expected: Sequence[bytes] | bytes | bytearray | memoryview,
    actual: Sequence[bytes] | bytes | bytearray | memoryview,
    leaf_size: int,
    nbytes: int,
    first_leaf: int = 0,
) -> list[tuple[int, int]]:
    """Byte ranges ``(start, end)`` (end exclusive) of the leaves whose hashes differ.

    Both sides are lists of hashes or packed hashes, starting at leaf ``first_leaf``. Adjacent
    corrupted leaves are merged into one range.
    """
    exp = _packed(expected)
    act = _packed(actual)
    if len(exp) != len(act):
        return [(first_leaf * leaf_size, nbytes)]
    differing: list[int] = []
    # Compare big blocks first: a clean shard of a million leaves costs a few memcmp calls.
    block = 4096 * HASH_SIZE
    for b in range(0, len(exp), block):
        if exp[b : b + block] == act[b : b + block]:
            continue
        differing += [
            first_leaf + i // HASH_SIZE
            for i in range(b, min(b + block, len(exp)), HASH_SIZE)
            if exp[i : i + HASH_SIZE] != act[i : i + HASH_SIZE]
        ]
    return leaf_byte_ranges(differing, leaf_size, nbytes)


def leaf_byte_ranges(leaves: Iterable[int], leaf_size: int, nbytes: int) -> list[tuple[int, int]]:
    """The byte ranges ``(start, end)`` (end exclusive) of sorted ``leaves``, adjacent ones
    merged; the last leaf ends at ``nbytes``."""
    ranges: list[tuple[int, int]] = []
    for leaf in leaves:
        start, end = leaf * leaf_size, min((leaf + 1) * leaf_size, nbytes)
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((start, end))
    return ranges


def _packed(leaves: Sequence[bytes] | bytes | bytearray | memoryview) -> bytes:
    if isinstance(leaves, bytes):
        return leaves
    if isinstance(leaves, bytearray | memoryview):
        return bytes(leaves)
    return b"".join(leaves)


@attrs.frozen(eq=False)
class ShardDigest:
    """A shard's Merkle root and its packed leaf hashes.

    :attr root: the RFC 6962 root (32 bytes).
    :attr leaves: packed leaf hashes, 32 bytes each, in leaf order.
    :attr source: ``"device"`` or ``"host"``: where it was computed.
    """

    root: bytes
    leaves: bytes
    source: str = "host"

    @property
    def leaf_count(self) -> int:
        """Number of leaves."""
        return len(self.leaves) // HASH_SIZE

    def leaf(self, index: int) -> bytes:
        """The hash of leaf ``index``."""
        return self.leaves[index * HASH_SIZE : (index + 1) * HASH_SIZE]

    def leaf_range(self, first: int, stop: int) -> bytes:
        """The packed hashes of leaves ``first`` to ``stop - 1``."""
        return self.leaves[first * HASH_SIZE : stop * HASH_SIZE]


# -- computing a buffer's digest -------------------------------------------------------------

ReadInto = Callable[[int, memoryview], None]


def host_leaves(
    backend: AllocatorBackend,
    buf: DeviceBuffer,
    leaf_size: int,
    *,
    staging: Callable[[], contextlib.AbstractContextManager[Sequence[memoryview]]],
    workers: int,
    leaf_range: tuple[int, int] | None = None,
) -> bytes:
    """Packed leaf hashes of ``buf`` (or of leaves ``leaf_range``) computed on the host.

    Hashes straight from :meth:`~vramcore.backend.AllocatorBackend.host_view` when the backend
    offers one; else reads the bytes back through the two buffers ``staging()`` lends
    (leaf-aligned, equal sizes; entered only then), hashing one while the next is read.
    """
    first, stop = leaf_range if leaf_range is not None else (0, leaf_count(buf.nbytes, leaf_size))
    start, end = first * leaf_size, min(stop * leaf_size, buf.nbytes)
    hasher = LeafHasher(end - start, leaf_size, workers, first)
    view = backend.host_view(buf)
    if view is not None:
        hasher.feed(0, view[start:end], join=True)
        return hasher.packed()
    with staging() as buffers:
        chunk = len(buffers[0]) // leaf_size * leaf_size
        if chunk <= 0 or len(buffers) < 2 or len(buffers[1]) < chunk:
            raise InvalidInput(
                f"host_leaves needs two staging buffers of at least {leaf_size} bytes"
            )
        waiters: list[Callable[[], None]] = []
        for i, offset in enumerate(range(start, end, chunk)):
            if len(waiters) == 2:  # the batch that used this staging buffer must be done
                waiters.pop(0)()
            out = buffers[i % 2][: min(chunk, end - offset)]
            backend.read_into(buf, offset, out)
            waiters.append(hasher.feed(offset - start, out))
        return hasher.packed()
