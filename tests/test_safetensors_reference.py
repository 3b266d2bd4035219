"""vramcore's safetensors parser is at least as strict as the reference one (``safetensors``).

Differential, property-based: headers are built from valid layouts and then broken in the
ways real files break (offsets moved, sizes off by one, unknown dtypes, extra keys, duplicate
names, bytes added or missing, metadata of the wrong type). Whatever vramcore accepts, the
reference implementation accepts too, with the same tensors at the same bytes.
"""

from __future__ import annotations

import io
import json
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vramcore.errors import IntegrityViolation
from vramcore.safetensors import DTYPE_BITS, read_tensor_map

reference = pytest.importorskip(
    "safetensors._safetensors_rust", reason="the reference parser is a dev dependency"
)

_KNOWN = {"BOOL": 1, "U8": 1, "I8": 1, "F16": 2, "BF16": 2, "I32": 4, "F32": 4, "F64": 8}
_DTYPES = st.sampled_from([*_KNOWN, "Q8", "f32", "", "F8_E4M3", "U64"])


@st.composite
def _files(draw: st.DrawFn) -> bytes:
    entries: list[tuple[str, dict[str, Any]]] = []
    offset = 0
    for index in range(draw(st.integers(0, 4))):
        dtype = draw(_DTYPES)
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = DTYPE_BITS.get(dtype, 8) // 8 or 1
        for dim in shape:
            size *= dim
        spec: dict[str, Any] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + size],
        }
        offset += size
        mutation = draw(st.sampled_from(["none"] * 6 + ["begin", "end", "shape", "extra", "types"]))
        if mutation == "begin":
            spec["data_offsets"][0] += draw(st.sampled_from([-1, 1]))
        elif mutation == "end":
            spec["data_offsets"][1] += draw(st.sampled_from([-1, 1]))
        elif mutation == "shape":
            spec["shape"] = [*shape, 2]
        elif mutation == "extra":
            spec["extra"] = 1
        elif mutation == "types":
            spec["data_offsets"] = [str(x) for x in spec["data_offsets"]]
        entries.append((draw(st.sampled_from(["a", "b", "c", f"t{index}"])), spec))
    if draw(st.booleans()):
        entries.append(("__metadata__", draw(st.sampled_from([{"k": "v"}, {"k": 1}, []]))))
    order = draw(st.permutations(entries))
    body = ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in order)  # duplicates kept
    header = ("{" + body + "}").encode()
    data_len = max(0, offset + draw(st.sampled_from([0, 0, 0, -1, 1])))
    return struct.pack("<Q", len(header)) + header + b"\x5a" * data_len


def _reference(raw: bytes) -> dict[str, bytes] | None:
    try:
        return {name: bytes(info["data"]) for name, info in reference.deserialize(raw)}
    except Exception:  # the reference's SafetensorError, or a Rust panic surfaced as another
        return None


def _ours(raw: bytes) -> dict[str, bytes] | None:
    try:
        tensors = read_tensor_map(io.BytesIO(raw), len(raw))
    except IntegrityViolation:
        return None
    return {t.name: raw[t.start : t.end] for t in tensors}


@pytest.mark.slow
@settings(max_examples=400)
@given(raw=_files())
def test_whatever_vramcore_accepts_the_reference_accepts_identically(raw: bytes) -> None:
    ours = _ours(raw)
    if ours is not None:
        assert _reference(raw) == ours


def test_the_reference_agrees_on_a_plain_valid_file() -> None:
    header = json.dumps({"w": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}).encode()
    raw = struct.pack("<Q", len(header)) + header + b"abcd"
    assert _ours(raw) == _reference(raw) == {"w": b"abcd"}
