"""The RFC 6962 Merkle digest, against an independent implementation written here."""

from __future__ import annotations

import contextlib
import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vramcore.backend import DeviceBuffer
from vramcore.digest import (
    DEFAULT_LEAF_SIZE,
    DIGEST_ALG,
    LeafHasher,
    corrupted_ranges,
    hash_leaves,
    hash_leaves_at,
    hash_leaves_packed,
    host_leaves,
    leaf_count,
    merkle_root,
)
from vramcore.errors import InvalidInput


def rfc6962_mth(leaves: list[bytes]) -> bytes:
    """RFC 6962 section 2.1 Merkle Tree Hash, recursively, over raw leaf *data*."""
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < n:  # the largest power of two smaller than n
        k *= 2
    return hashlib.sha256(b"\x01" + rfc6962_mth(leaves[:k]) + rfc6962_mth(leaves[k:])).digest()


def reference_digest(data: bytes, leaf_size: int) -> bytes:
    leaves = [data[i : i + leaf_size] for i in range(0, len(data), leaf_size)]
    return rfc6962_mth(leaves)


def test_reference_matches_the_rfc_6962_test_vector() -> None:
    # Certificate Transparency's reference tree (8 leaves) from the RFC 6962 test data.
    vector = [
        b"",
        b"\x00",
        b"\x10",
        b"\x20\x21",
        b"\x30\x31",
        b"\x40\x41\x42\x43",
        b"\x50\x51\x52\x53\x54\x55\x56\x57",
        b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
    ]
    assert rfc6962_mth(vector).hex() == (
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"
    )
    leaf_hashes = [hashlib.sha256(b"\x00" + leaf).digest() for leaf in vector]
    assert merkle_root(leaf_hashes) == rfc6962_mth(vector)
    for n in range(1, 9):
        assert merkle_root(leaf_hashes[:n]) == rfc6962_mth(vector[:n]), n


def test_constants() -> None:
    assert DIGEST_ALG == "rfc6962-sha256"
    assert DEFAULT_LEAF_SIZE == 65536


@settings(max_examples=60, deadline=None)
@given(
    nbytes=st.integers(min_value=1, max_value=40 * 4096 + 5),
    leaf_pages=st.sampled_from([1, 2, 3, 16]),
    seed=st.binary(min_size=1, max_size=8),
)
def test_digest_equals_the_reference_for_random_sizes(
    nbytes: int, leaf_pages: int, seed: bytes
) -> None:
    leaf_size = 4096 * leaf_pages
    data = (hashlib.sha256(seed).digest() * (nbytes // 32 + 1))[:nbytes]
    leaves = hash_leaves(data, leaf_size)
    assert len(leaves) == leaf_count(nbytes, leaf_size)
    assert merkle_root(leaves) == reference_digest(data, leaf_size)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=70))
def test_merkle_root_equals_the_recursive_split_for_any_leaf_count(hashes: list[bytes]) -> None:
    def mth(h: list[bytes]) -> bytes:
        if len(h) == 1:
            return h[0]
        k = 1
        while k * 2 < len(h):
            k *= 2
        return hashlib.sha256(b"\x01" + mth(h[:k]) + mth(h[k:])).digest()

    assert merkle_root(hashes) == mth(hashes)


@pytest.mark.parametrize(
    "nbytes",
    [1, 4095, 65535, 65536, 65537, 2 * 65536, 3 * 65536 + 1, 5 * (1 << 20) + 3],
    ids=lambda n: f"{n}B",
)
def test_edge_sizes(nbytes: int) -> None:
    data = os.urandom(nbytes)
    leaves = hash_leaves(data)
    assert len(leaves) == -(-nbytes // 65536)
    assert merkle_root(leaves) == reference_digest(data, 65536)


def test_empty_and_single_leaf() -> None:
    assert hash_leaves(b"") == []
    assert merkle_root([]) == hashlib.sha256(b"").digest()
    assert leaf_count(0, 65536) == 1
    one = hash_leaves(b"abc")
    assert one == [hashlib.sha256(b"\x00abc").digest()]
    assert merkle_root(one) == one[0]


def test_leaf_and_node_hashes_are_domain_separated() -> None:
    # A two-leaf tree's root is not the leaf hash of the concatenated leaf hashes.
    a, b = hash_leaves(b"a" * 4096 + b"b" * 4096, 4096)
    assert merkle_root([a, b]) == hashlib.sha256(b"\x01" + a + b).digest()
    assert merkle_root([a, b]) != hashlib.sha256(b"\x00" + a + b).digest()


@pytest.mark.parametrize("leaf_size", [0, -4096, 1000, 4097, True, 4096.0, "65536"])
def test_bad_leaf_size(leaf_size: object) -> None:
    with pytest.raises(InvalidInput):
        hash_leaves(b"x", leaf_size)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        hash_leaves_packed(b"x", leaf_size)  # type: ignore[arg-type]


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
@pytest.mark.parametrize("nbytes", [1, 4096, 4097, 3 * (1 << 20) + 5], ids=lambda n: f"{n}B")
def test_packed_leaves_are_the_same_on_any_worker_count(workers: int, nbytes: int) -> None:
    data = os.urandom(nbytes)
    packed = hash_leaves_packed(data, 4096, workers)
    assert packed == b"".join(hash_leaves(data, 4096))
    assert merkle_root(packed) == reference_digest(data, 4096)


def test_leaf_hasher_takes_chunks_in_any_order_and_refuses_unaligned_ones() -> None:
    data = os.urandom(10 * 4096 + 3)
    hasher = LeafHasher(len(data), 4096, workers=2)
    for offset in (8 * 4096, 0, 4 * 4096):  # chunks land where their offset says
        stop = {0: 4 * 4096, 4 * 4096: 8 * 4096, 8 * 4096: len(data)}[offset]
        hasher.feed(offset, memoryview(data)[offset:stop])()
    assert hasher.packed() == hash_leaves_packed(data, 4096)
    with pytest.raises(InvalidInput, match="leaf boundary"):
        hasher.feed(100, memoryview(data)[100:200])


@settings(max_examples=60, deadline=None)
@given(
    leaves=st.integers(min_value=1, max_value=70),
    chunk_leaves=st.integers(min_value=1, max_value=17),
    tail=st.integers(min_value=0, max_value=4095),
    order=st.randoms(use_true_random=False),
)
def test_the_root_from_chunk_subtrees_is_the_rfc_6962_root(
    leaves: int, chunk_leaves: int, tail: int, order: object
) -> None:
    # Chunks hashed on the threads that read them leave their subtree roots behind; the root
    # built from those (power-of-two chunks) or from every leaf (any other size) must be the
    # RFC 6962 root, whatever order the chunks were hashed in.
    size = 4096
    data = os.urandom((leaves - 1) * size + tail + 1)
    hasher = LeafHasher(len(data), size, workers=1)
    offsets = list(range(0, len(data), chunk_leaves * size))
    order.shuffle(offsets)  # type: ignore[attr-defined]
    for offset in offsets:
        hasher.hash_here(offset, memoryview(data)[offset : offset + chunk_leaves * size])
    assert hasher.packed() == hash_leaves_packed(data, size)
    assert hasher.root() == reference_digest(data, size)


def test_a_root_from_chunks_that_do_not_tile_the_leaves_is_hashed_whole() -> None:
    # Chunks of unequal sizes (or one missing) never yield a root from their subtrees.
    size = 4096
    data = os.urandom(12 * size)
    view = memoryview(data)
    hasher = LeafHasher(len(data), size, workers=1)
    hasher.hash_here(0, view[: 4 * size])
    hasher.hash_here(4 * size, view[4 * size : 6 * size])
    hasher.hash_here(6 * size, view[6 * size :])
    assert hasher.root() == reference_digest(data, size)
    with pytest.raises(InvalidInput, match="leaf boundary"):
        hasher.hash_here(100, view[100:200])


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_hash_leaves_at_picks_the_same_hashes_as_hashing_every_leaf(workers: int) -> None:
    data = os.urandom(9 * 4096 + 5)
    packed = hash_leaves_packed(data, 4096)
    for indices in ([], [0], [9], [0, 3, 4, 9], list(range(10))):
        want = b"".join(packed[i * 32 : (i + 1) * 32] for i in indices)
        assert hash_leaves_at(memoryview(data), indices, 4096, workers) == want


class ReadBackOnly:
    """A backend stand-in offering only read_into (no host view), recording reads."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reads: list[tuple[int, int]] = []
        self.buffers: set[int] = set()

    def host_view(self, buf: object) -> None:
        return None

    def read_into(self, buf: object, offset: int, out: memoryview) -> None:
        self.reads.append((offset, len(out)))
        self.buffers.add(id(out.obj))
        out[:] = self.data[offset : offset + len(out)]


@settings(max_examples=40, deadline=None)
@given(
    nbytes=st.integers(min_value=1, max_value=24 * 4096 + 7),
    chunk_leaves=st.integers(min_value=1, max_value=5),
    workers=st.integers(min_value=1, max_value=3),
)
def test_host_read_back_equals_hash_leaves_through_two_staging_buffers(
    nbytes: int, chunk_leaves: int, workers: int
) -> None:
    data = os.urandom(nbytes)
    backend = ReadBackOnly(data)
    buf = DeviceBuffer(device=0, nbytes=nbytes, backend="fake", native=None)
    chunk = chunk_leaves * 4096
    staging = [memoryview(bytearray(chunk + 100)) for _ in range(2)]  # rounded to leaves
    packed = host_leaves(
        backend, buf, 4096, staging=lambda: contextlib.nullcontext(staging), workers=workers
    )  # type: ignore[arg-type]
    assert packed == hash_leaves_packed(data, 4096)
    assert backend.reads == [(o, min(chunk, nbytes - o)) for o in range(0, nbytes, chunk)]
    assert len(backend.buffers) <= 2


def test_host_read_back_of_a_leaf_range_reads_only_those_leaves() -> None:
    data = os.urandom(10 * 4096 + 3)
    backend = ReadBackOnly(data)
    buf = DeviceBuffer(device=0, nbytes=len(data), backend="fake", native=None)
    staging = [memoryview(bytearray(4096)) for _ in range(2)]
    packed = host_leaves(
        backend,
        buf,
        4096,
        staging=lambda: contextlib.nullcontext(staging),
        workers=1,
        leaf_range=(9, 11),
    )  # type: ignore[arg-type]
    assert packed == hash_leaves_packed(data, 4096)[9 * 32 :]
    assert backend.reads == [(9 * 4096, 4096), (10 * 4096, 3)]


def _leaves(n: int) -> list[bytes]:
    return [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(n)]


def test_corrupted_ranges_names_and_merges_adjacent_leaves() -> None:
    good = _leaves(8)
    bad = list(good)
    for i in (1, 2, 3, 6):
        bad[i] = b"\xff" * 32
    nbytes = 7 * 4096 + 10
    assert corrupted_ranges(good, bad, 4096, nbytes) == [(4096, 4 * 4096), (6 * 4096, 7 * 4096)]
    bad[7] = b"\xee" * 32  # the short last leaf ends at nbytes, merged with leaf 6
    assert corrupted_ranges(good, bad, 4096, nbytes)[-1] == (6 * 4096, nbytes)
    assert corrupted_ranges(good, good, 4096, nbytes) == []
    assert corrupted_ranges(good, good[:-1], 4096, nbytes) == [(0, nbytes)]


def test_corrupted_ranges_of_packed_leaves_and_leaf_ranges() -> None:
    good = b"".join(_leaves(10_000))
    bad = bytearray(good)
    bad[9_000 * 32] ^= 1
    assert corrupted_ranges(good, bytes(bad), 4096, 10_000 * 4096) == [(9_000 * 4096, 9_001 * 4096)]
    # A range starting at leaf 500: indices are shifted by first_leaf.
    assert corrupted_ranges(good[:64], bytes(bad[32:96]), 4096, 10**9, first_leaf=500) == [
        (500 * 4096, 502 * 4096)
    ]


def test_a_host_digest_asks_for_the_host_view_once() -> None:
    # A mock's host_view counts as a read (fault injection, pending copies drained): once.
    from vramcore._digests import DigestSource

    data = os.urandom(3 * 4096)

    class HostViewOnly:
        name = "fake"
        calls = 0

        def host_view(self, buf: object) -> memoryview:
            HostViewOnly.calls += 1
            return memoryview(data)

    class NoDevice:
        class vramcore_device_digest:  # noqa: N801 - stands in for a hook caller
            @staticmethod
            def get_hookimpls() -> list[object]:
                return []

    buf = DeviceBuffer(device=0, nbytes=len(data), backend="fake", native=None)
    source = DigestSource(
        NoDevice(),
        HostViewOnly(),  # type: ignore[arg-type]
        4096,
        staging=contextlib.nullcontext,
        workers=1,
    )
    digest = source.whole(buf)
    assert (digest.root, digest.leaves, digest.source) == (
        reference_digest(data, 4096),
        hash_leaves_packed(data, 4096),
        "host",
    )
    assert HostViewOnly.calls == 1
