"""Hostile input never escapes as anything but vramcore's own typed errors.

Property-based: safetensors headers, attestations and event dictionaries built by hypothesis
either parse into something valid or raise the documented error, never a KeyError,
TypeError, OverflowError or the like.
"""

from __future__ import annotations

import io
import json
import struct
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vramcore.errors import IntegrityViolation, InvalidInput
from vramcore.events import EVENT_TYPES, event_from_dict
from vramcore.safetensors import read_tensor_map
from vramcore.shard import SealedShard

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


def _safetensors(header: Any, data_len: int) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + b"\0" * data_len


@pytest.mark.slow
@settings(max_examples=300)
@given(header=json_values, data_len=st.integers(0, 256))
def test_any_json_header_parses_or_raises_integrity_violation(header: Any, data_len: int) -> None:
    raw = _safetensors(header, data_len)
    try:
        tensors = read_tensor_map(io.BytesIO(raw), len(raw))
    except IntegrityViolation:
        return
    for t in tensors:
        assert 0 <= t.start <= t.end <= len(raw)


@settings(max_examples=300)
@given(
    names=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=4, unique=True),
    offsets=st.lists(st.tuples(st.integers(-5, 300), st.integers(-5, 300)), min_size=4, max_size=4),
    data_len=st.integers(0, 256),
)
def test_tensor_offsets_are_checked_against_the_file(
    names: list[str], offsets: list[tuple[int, int]], data_len: int
) -> None:
    header = {
        name: {"dtype": "U8", "shape": [1], "data_offsets": list(offsets[i])}
        for i, name in enumerate(names)
    }
    raw = _safetensors(header, data_len)
    try:
        tensors = read_tensor_map(io.BytesIO(raw), len(raw))
    except IntegrityViolation:
        return
    base = len(raw) - data_len
    for t in tensors:
        assert base <= t.start <= t.end <= len(raw)


def _json_object(blob: bytes) -> bool:
    try:
        return isinstance(json.loads(blob), dict)
    except ValueError:  # not UTF-8, not JSON
        return False


@settings(max_examples=200)
@given(raw=st.binary(max_size=64), lie=st.integers(1, 2**64 - 1 - 64))
def test_header_lengths_past_the_end_are_refused(raw: bytes, lie: int) -> None:
    blob = struct.pack("<Q", len(raw) + lie) + raw
    with pytest.raises(IntegrityViolation):
        read_tensor_map(io.BytesIO(blob), len(blob))


@settings(max_examples=200)
@given(raw=st.binary(max_size=64), data_len=st.integers(0, 16))
def test_garbage_headers_are_refused(raw: bytes, data_len: int) -> None:
    assume(not _json_object(raw))
    blob = struct.pack("<Q", len(raw)) + raw + bytes(data_len)
    with pytest.raises(IntegrityViolation):
        read_tensor_map(io.BytesIO(blob), len(blob))


@pytest.mark.slow
@settings(max_examples=300)
@given(doc=json_values)
def test_any_json_attestation_parses_canonically_or_raises_invalid_input(doc: Any) -> None:
    text = json.dumps(doc)
    try:
        shard = SealedShard.from_json(text)
    except InvalidInput:
        return
    assert SealedShard.from_json(shard.to_json()) == shard
    assert json.loads(shard.to_json()) == doc  # accepted only as it would be written


@pytest.mark.slow
@settings(max_examples=300)
@given(
    overrides=st.dictionaries(
        st.sampled_from(
            [
                "shard_id",
                "gpu_device",
                "vram_bytes",
                "digest",
                "leaf_size",
                "sealed_at",
                "signature",
                "tensors",
                "file_sha256",
                "digest_alg",
                "attestation_version",
            ]
        ),
        json_values,
        max_size=3,
    )
)
def test_attestation_with_mangled_fields_is_kept_exactly_or_raises_invalid_input(
    overrides: dict[str, Any],
) -> None:
    good = {
        "attestation_version": 1,
        "shard_id": "s",
        "gpu_device": 0,
        "vram_bytes": 10,
        "digest": "ab" * 32,
        "digest_alg": "rfc6962-sha256",
        "leaf_size": 65536,
        "sealed_at": "2026-01-01T00:00:00.000000Z",
        "tensors": [],
        "file_sha256": None,
        "signature": "cd" * 32,
    }
    try:
        shard = SealedShard.from_json(json.dumps({**good, **overrides}))
    except InvalidInput:
        return
    assert SealedShard.from_json(shard.to_json()) == shard
    written = json.loads(shard.to_json())
    for field, value in overrides.items():  # an accepted value is kept as given, not coerced
        assert written[field] == value, field


@pytest.mark.slow
@settings(max_examples=300)
@given(
    event_type=st.sampled_from(sorted(EVENT_TYPES)),
    fields=st.dictionaries(
        st.sampled_from(
            [
                "worker_id",
                "timestamp",
                "severity",
                "correlation_id",
                "shard_id",
                "device",
                "nbytes",
                "backend",
                "reason",
                "detail",
                "digest",
                "digest_alg",
                "leaf_size",
                "rule",
                "byte_ranges",
                "tensors",
                "file_sha256",
                "bogus",
            ]
        ),
        json_values,
        max_size=6,
    ),
)
def test_any_event_dict_builds_or_raises_invalid_input(
    event_type: str, fields: dict[str, Any]
) -> None:
    try:
        event = event_from_dict({"event_type": event_type, **fields})
    except InvalidInput:
        return
    assert event_from_dict(event.to_dict()) == event


_DTYPES = st.sampled_from(["U8", "F16", "F32", "I64", "BOOL", "BF16"])
_SIZES = {"U8": 1, "BOOL": 1, "F16": 2, "BF16": 2, "F32": 4, "I64": 8}


@settings(max_examples=200)
@given(
    tensors=st.lists(
        st.tuples(
            st.text(alphabet="abcxyz._0129é", min_size=1, max_size=8),
            _DTYPES,
            st.lists(st.integers(0, 5), max_size=3),
        ),
        max_size=6,
        unique_by=lambda t: t[0],
    ),
    spaced=st.booleans(),
    shuffle=st.randoms(use_true_random=False),
    extra=st.integers(-2, 2),
)
def test_valid_layouts_parse_exactly_on_both_paths(
    tensors: list[tuple[str, str, list[int]]], spaced: bool, shuffle: Any, extra: int
) -> None:
    """The fast path (the reference writer's compact layout) and the general JSON path agree:
    a layout that tiles the data parses to the same map, one byte more or less is refused."""
    header: dict[str, Any] = {}
    offset = 0
    for name, dtype, shape in tensors:
        n = _SIZES[dtype]
        for dim in shape:
            n *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    items = list(header.items())
    shuffle.shuffle(items)
    if spaced:
        blob = json.dumps(dict(items), indent=1, ensure_ascii=False).encode()
    else:
        blob = json.dumps(dict(items), separators=(",", ":"), ensure_ascii=False).encode()
    data_len = offset + extra
    assume(data_len >= 0)
    raw = struct.pack("<Q", len(blob)) + blob + b"\0" * data_len
    if extra != 0:
        with pytest.raises(IntegrityViolation):  # the layout does not cover the data exactly
            read_tensor_map(io.BytesIO(raw), len(raw))
        return
    parsed = read_tensor_map(io.BytesIO(raw), len(raw))
    base = 8 + len(blob)
    expected = sorted(
        (spec["data_offsets"][0] + base, spec["data_offsets"][1] + base, name)
        for name, spec in header.items()
    )
    assert [(t.start, t.end, t.name) for t in parsed] == expected
