"""The shard digest: an RFC 6962 (RFC 9162) Merkle Tree Hash over fixed-size leaves.

``digest_alg = "rfc6962-sha256"``. The shard's bytes are cut into ``leaf_size`` leaves (the
last may be shorter); leaf hash = SHA-256(0x00 ‖ leaf), node hash = SHA-256(0x01 ‖ left ‖
right), the tree split at the largest power of two smaller than the leaf count. Keeping the
leaf hashes lets a failed verification name the corrupted byte ranges.

Leaves are hashed on all host cores with threads (``hashlib`` releases the GIL while it
hashes); :class:`LeafHasher` takes the buffer in chunks so a device buffer can be read back
through a bounded staging area while earlier chunks hash.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from vramcore.errors import InvalidInput

__all__ = [
    "DEFAULT_LEAF_SIZE",
    "DIGEST_ALG",
    "StagingPool",
    "corrupted_ranges",
    "hash_leaves",
    "leaf_count",
    "merkle_root",
    "read_and_hash",
]

DIGEST_ALG = "rfc6962-sha256"
DEFAULT_LEAF_SIZE = 65536
#: Leaves one worker task hashes in a row (2 MiB at the default size): few enough tasks to
#: keep executor overhead negligible, enough to keep every core busy.
_LEAVES_PER_TASK = 32
_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"


@functools.cache
def _pool() -> ThreadPoolExecutor:
    """Hashing threads shared by every manager of the process (idle threads cost nothing)."""
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="vramcore-hash")


def leaf_count(nbytes: int, leaf_size: int) -> int:
    """Number of leaves of an ``nbytes`` shard (at least one)."""
    return max(1, -(-nbytes // leaf_size))


def _check_leaf_size(leaf_size: int) -> None:
    if isinstance(leaf_size, bool) or not isinstance(leaf_size, int) or leaf_size <= 0:
        raise InvalidInput("leaf_size must be a positive integer")
    if leaf_size % 4096:
        raise InvalidInput(f"leaf_size must be a multiple of 4096 bytes, got {leaf_size}")


def _hash_range(view: memoryview, start: int, stop: int, leaf_size: int) -> list[bytes]:
    out = []
    sha256 = hashlib.sha256
    for off in range(start, stop, leaf_size):
        h = sha256(_LEAF_PREFIX)
        h.update(view[off : min(off + leaf_size, stop)])
        out.append(h.digest())
    return out


def _submit(view: memoryview, leaf_size: int) -> list[Future[list[bytes]]]:
    span = leaf_size * _LEAVES_PER_TASK
    n = len(view)
    return [
        _pool().submit(_hash_range, view, start, min(start + span, n), leaf_size)
        for start in range(0, n, span)
    ]


def hash_leaves(
    data: bytes | bytearray | memoryview, leaf_size: int = DEFAULT_LEAF_SIZE
) -> list[bytes]:
    """The leaf hashes of ``data`` (one per leaf; an empty input has none), on all cores."""
    _check_leaf_size(leaf_size)
    view = memoryview(data).cast("B")
    out: list[bytes] = []
    for fut in _submit(view, leaf_size):
        out.extend(fut.result())
    return out


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """The RFC 6962 tree head over leaf hashes (``SHA-256()`` of nothing for no leaves).

    Built bottom-up: adjacent pairs are hashed and an odd last node moves up unchanged, which
    gives the same tree as RFC 6962's split at the largest power of two below ``n``.
    """
    if not leaves:
        return hashlib.sha256(b"").digest()
    level = list(leaves)
    sha256 = hashlib.sha256
    while len(level) > 1:
        nxt = [
            sha256(_NODE_PREFIX + level[i] + level[i + 1]).digest()
            for i in range(0, len(level) - 1, 2)
        ]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def corrupted_ranges(
    expected: Sequence[bytes], actual: Sequence[bytes], leaf_size: int, nbytes: int
) -> list[tuple[int, int]]:
    """Byte ranges ``(start, end)`` (end exclusive) of the leaves whose hashes differ.

    Adjacent corrupted leaves are merged into one range.
    """
    if len(expected) != len(actual):
        return [(0, nbytes)]
    ranges: list[tuple[int, int]] = []
    for i, (a, b) in enumerate(zip(expected, actual, strict=True)):
        if a != b:
            start, end = i * leaf_size, min((i + 1) * leaf_size, nbytes)
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((start, end))
    return ranges


class StagingPool:
    """Reusable host staging buffers of one size.

    Fresh host memory is expensive to touch the first time (a page fault per 4 KiB page, which
    costs more than the copy itself on many VMs), so staging buffers are kept and reused
    rather than allocated per call. At most ``keep`` idle buffers are retained.
    """

    def __init__(self, chunk_bytes: int, keep: int = 8) -> None:
        self.chunk_bytes = chunk_bytes
        self._keep = keep
        self._idle: list[bytearray] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def borrow(self, count: int) -> Iterator[list[bytearray]]:
        """Lend ``count`` buffers of :attr:`chunk_bytes` for the duration of the block."""
        with self._lock:
            taken = [self._idle.pop() for _ in range(min(count, len(self._idle)))]
        taken += [bytearray(self.chunk_bytes) for _ in range(count - len(taken))]
        try:
            yield taken
        finally:
            with self._lock:
                self._idle.extend(taken[: max(0, self._keep - len(self._idle))])

    def clear(self) -> None:
        """Drop the idle buffers."""
        with self._lock:
            self._idle.clear()


def read_and_hash(
    nbytes: int,
    read_into: Callable[[int, memoryview], None],
    leaf_size: int = DEFAULT_LEAF_SIZE,
    chunk_bytes: int = 32 << 20,
    staging: Sequence[bytearray] | None = None,
) -> list[bytes]:
    """Leaf hashes of an ``nbytes`` buffer read through ``read_into(offset, out)``.

    Two staging buffers of ``chunk_bytes`` (rounded down to whole leaves) alternate: one is
    hashed on the pool while the next chunk is read into the other, so host memory stays
    bounded by ``2 * chunk_bytes`` whatever the buffer size. ``staging`` lends two buffers of
    at least that size (see :class:`StagingPool`); without it they are allocated here.
    """
    _check_leaf_size(leaf_size)
    chunk = max(leaf_size, chunk_bytes // leaf_size * leaf_size)
    if staging is None:
        staging = [bytearray(min(chunk, nbytes)), bytearray(min(chunk, max(0, nbytes - chunk)))]
    elif len(staging) < 2 or min(len(b) for b in staging[:2]) < min(chunk, nbytes):
        raise InvalidInput(f"read_and_hash needs two staging buffers of {chunk} bytes")
    leaves: list[bytes] = []
    in_flight: list[list[Future[list[bytes]]]] = []
    for i, offset in enumerate(range(0, nbytes, chunk)):
        if len(in_flight) == 2:  # the batch that used this staging buffer must be done
            for fut in in_flight.pop(0):
                leaves.extend(fut.result())
        view = memoryview(staging[i % 2])[: min(chunk, nbytes - offset)]
        read_into(offset, view)
        in_flight.append(_submit(view, leaf_size))
    for batch in in_flight:
        for fut in batch:
            leaves.extend(fut.result())
    return leaves
