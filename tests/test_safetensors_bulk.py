"""The bulk header path gives exactly what the entry-by-entry walk gives (issue 21 item 2).

Headers laid out as the reference writer lays them out (compact JSON) are checked in runs of
thousands of entries; anything unusual in a run sends that run through the single-entry walk.
Differential, property-based: generated compact headers, broken in the ways real files break
and with names built to confuse a bulk scan (``},"`` inside a name, ``__metadata__`` as a
substring, non-ASCII, escapes), parse to the same result, or fail with the same message, in
bulk (with runs cut small, so that runs split, fail and resume) and singly; whatever is
accepted, the reference parser accepts identically. The checks the bulk path adds (a run's
entries must tile its text, separators counted) have tests of their own.
"""

from __future__ import annotations

import io
import json
import struct
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vramcore.safetensors as sf
from vramcore.errors import IntegrityViolation
from vramcore.safetensors import (
    DTYPE_BITS,
    SafetensorsHeader,
    dtype_itemsize,
    read_safetensors_header,
)
from vramcore.shard import TensorRange

_NAMES = st.sampled_from(
    ["a", "b", "w.0", 'x},"y', "m__metadata__", "__metadata__", "é", "a}", "t\u202e", "n\\q"]
) | st.from_regex(r"t[0-9]{1,3}", fullmatch=True)
_DTYPES = st.sampled_from([*DTYPE_BITS, "Q8", "f32"])


def _bytes_for(dtype: str, shape: list[int]) -> int:
    bits = DTYPE_BITS.get(dtype, 8)
    for dim in shape:
        bits *= dim
    return bits // 8


@st.composite
def _compact_files(draw: st.DrawFn) -> bytes:
    entries: list[tuple[str, Any]] = []
    offset = 0
    for _ in range(draw(st.integers(0, 12))):
        dtype = draw(_DTYPES)
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        size = _bytes_for(dtype, shape)
        spec: dict[str, Any] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + size],
        }
        offset += size
        mutation = draw(
            st.sampled_from(["none"] * 10 + ["begin", "end", "shape", "huge", "extra", "swap"])
        )
        if mutation == "begin":
            spec["data_offsets"][0] += draw(st.sampled_from([-1, 1]))
        elif mutation == "end":
            spec["data_offsets"][1] += draw(st.sampled_from([-1, 1]))
        elif mutation == "shape":
            spec["shape"] = [*shape, 2]
        elif mutation == "huge":
            spec["data_offsets"][1] = 2**64 + 5
        elif mutation == "extra":
            spec["extra"] = 1
        entries.append((draw(_NAMES), spec))
        if mutation == "swap" and len(entries) > 1:  # out of offset order: sorted by the parser
            entries[-1], entries[-2] = entries[-2], entries[-1]
    if draw(st.booleans()):
        meta = draw(st.sampled_from([{"format": "pt"}, {"k": 1}, {}]))
        entries.insert(draw(st.integers(0, len(entries))), ("__metadata__", meta))
    parts = [
        json.dumps(name, ensure_ascii=draw(st.booleans()))
        + ":"
        + json.dumps(spec, separators=(",", ":"))
        for name, spec in entries
    ]
    joins = [draw(st.sampled_from([","] * 8 + [", ", "}", ",,"])) for _ in parts[1:]]
    body = "".join(p + j for p, j in zip(parts, [*joins, ""], strict=False))
    close = draw(st.sampled_from(["}"] * 6 + ["", "}}", "},"]))
    header = ("{" + body + close + " " * draw(st.integers(0, 9))).encode()
    data_len = max(0, offset + draw(st.sampled_from([0, 0, 0, -1, 1])))
    return struct.pack("<Q", len(header)) + header + b"\x5a" * data_len


def _outcome(raw: bytes, *, bulk: bool) -> tuple[str, Any]:
    try:
        header = sf._parse_header(io.BytesIO(raw).read, len(raw), bulk=bulk)
    except IntegrityViolation as exc:
        return "refused", str(exc)
    return "parsed", (list(header.tensors), header.metadata, header.raw, header.tensors)


@pytest.mark.slow
@settings(max_examples=500, deadline=None)
@given(raw=_compact_files(), run_chars=st.sampled_from([1, 40, 90, 200, 2_000_000]))
def test_bulk_and_single_walks_agree_on_every_header(raw: bytes, run_chars: int) -> None:
    with mock.patch.object(sf, "_RUN_CHARS", run_chars):
        bulk = _outcome(raw, bulk=True)
    assert bulk == _outcome(raw, bulk=False)


reference = pytest.importorskip(
    "safetensors._safetensors_rust", reason="the reference parser is a dev dependency"
)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(raw=_compact_files())
def test_whatever_the_bulk_path_accepts_the_reference_accepts_identically(raw: bytes) -> None:
    kind, result = _outcome(raw, bulk=True)
    if kind == "parsed":
        ref = {
            name: (info["dtype"], list(info["shape"])) for name, info in reference.deserialize(raw)
        }
        ours = {t.name: (t.dtype, list(t.shape)) for t in result[0]}
        assert ours == ref


def _file(body: str, data_len: int) -> bytes:
    blob = body.encode()
    return struct.pack("<Q", len(blob)) + blob + bytes(data_len)


def _entry(name: str, begin: int, end: int) -> str:
    return f'"{name}":{{"dtype":"U8","shape":[{end - begin}],"data_offsets":[{begin},{end}]}}'


def _many(n: int) -> str:
    return ",".join(_entry(f"t{i}", i, i + 1) for i in range(n))


def test_a_large_compact_header_is_parsed_in_several_runs() -> None:
    raw = _file("{" + _many(3000) + "}", 3000)
    with mock.patch.object(sf, "_RUN_CHARS", 10_000):
        walk = sf._HeaderWalk(raw[8:-3000].decode(), 3000)
        runs = mock.patch.object(walk, "_entry", side_effect=AssertionError("walked singly"))
        with runs:
            walk.run()
    assert len(walk.names) == 3000 and walk.names[-1] == "t2999"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        # An object closed early, then more entries: the '}'s counted show it.
        ("{" + _entry("a", 0, 1) + "}" + _entry("b", 1, 2) + "}", "bytes follow"),
        # The last entry followed by ',' and nothing.
        ("{" + _entry("a", 0, 1) + "," + _entry("b", 1, 2) + ",", "expected a tensor name"),
        # A name twice, far apart (in different runs).
        ("{" + _many(400) + "," + _entry("t7", 400, 401) + "}", "twice"),
    ],
)
def test_headers_the_bulk_path_must_refuse_are_refused(body: str, message: str) -> None:
    raw = _file(body, 402)
    with mock.patch.object(sf, "_RUN_CHARS", 500):
        with pytest.raises(IntegrityViolation, match=message):
            read_safetensors_header(io.BytesIO(raw), len(raw))
        assert _outcome(raw, bulk=True) == _outcome(raw, bulk=False)


def test_a_name_holding_the_text_runs_are_cut_at_is_parsed_the_same() -> None:
    for k in range(30):  # wherever it lies, one cut of a run lands inside it
        entries = [_entry("x}," if i == k else f"t{i}", i, i + 1) for i in range(30)]
        raw = _file("{" + ",".join(entries) + "}", 30)
        with mock.patch.object(sf, "_RUN_CHARS", 100):
            kind, result = _outcome(raw, bulk=True)
        assert kind == "parsed" and result[0][k].name == "x},"
        assert (kind, result) == _outcome(raw, bulk=False)


def test_each_tensor_comes_with_its_dtype_and_shape() -> None:
    body = {
        "__metadata__": {"format": "pt"},
        "w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [4, 16]},
        "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        "q": {"dtype": "F4", "shape": [2, 2], "data_offsets": [16, 18]},
    }
    raw = _file(json.dumps(body, separators=(",", ":")), 18)
    header = read_safetensors_header(io.BytesIO(raw), len(raw))
    base = len(raw) - 18
    assert isinstance(header, SafetensorsHeader) and header.tensors.has_layout
    assert list(header.tensors) == [
        TensorRange("b", base, base + 4, "F32", (1,)),
        TensorRange("w", base + 4, base + 16, "BF16", (2, 3)),
        TensorRange("q", base + 16, base + 18, "F4", (2, 2)),
    ]
    assert header.metadata == {"format": "pt"}
    assert header.raw == raw[:base]
    assert "w" not in repr(header)


def test_shapes_and_dtypes_are_shared_between_tensors_alike() -> None:
    raw = _file("{" + _many(100) + "}", 100)
    tensors = read_safetensors_header(io.BytesIO(raw), len(raw)).tensors
    assert len({id(t.shape) for t in tensors}) == 1
    assert len({id(t.dtype) for t in tensors}) == 1


def test_the_dtype_table_gives_item_sizes() -> None:
    assert dtype_itemsize("BF16") == 2 and dtype_itemsize("C64") == 8
    assert dtype_itemsize("F4") is None and dtype_itemsize("F6_E2M3") is None
    with pytest.raises(KeyError):
        dtype_itemsize("Q8")
