"""Reading a safetensors header, strictly, to map tensor names to byte ranges of the file.

The format: an 8-byte little-endian header length ``N``, ``N`` bytes of UTF-8 JSON mapping
each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to
the byte after the header) and an optional ``"__metadata__"`` object of strings, then the data.
vramcore seals the file's bytes exactly as they are, header included, so tensor ranges are
shifted by ``8 + N`` to become offsets in the shard.

The parser is at least as strict as the reference implementation (``huggingface/safetensors``)
and bounded in time and memory, because it runs on files nobody has checked yet (before the
file is hashed):

* the header is at most :data:`MAX_HEADER_BYTES`, valid UTF-8, a JSON object starting with
  ``{``; no duplicate key at any level; no ``NaN``/``Infinity``; nesting deeper than the format
  needs is refused;
* every tensor has exactly ``dtype`` (a known one), ``shape`` (non-negative integers) and
  ``data_offsets``; its byte count is exactly ``prod(shape) * size(dtype)``;
* sorted by offset, the tensors are contiguous and non-overlapping, start at 0 and end exactly
  at the end of the file (no byte is left out of every tensor);
* ``__metadata__`` maps strings to strings.

A header is parsed entry by entry (the top-level object is walked here; each entry is decoded
by the C JSON scanner and dropped), so a header of a million tensors costs seconds and the
memory of its names, never a dict per tensor.
"""

from __future__ import annotations

import json
import re
import struct
from array import array
from collections.abc import Callable
from json.decoder import scanstring  # type: ignore[attr-defined]
from typing import Any, BinaryIO

from vramcore.errors import IntegrityViolation, InvalidInput
from vramcore.shard import MAX_SHAPE_DIMS, MAX_TENSOR_NAME_CHARS, TensorMap, check_tensor_name
from vramcore.validation import safe_repr

__all__ = [
    "DTYPE_BITS",
    "MAX_HEADER_BYTES",
    "MAX_SHAPE_DIMS",
    "parse_tensor_map",
    "read_header",
    "read_tensor_map",
    "write_safetensors",
]

#: Larger headers are refused (the reference implementation's cap).
MAX_HEADER_BYTES = 100_000_000
#: Element size in bits of every dtype the reference implementation knows.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
}
_TENSOR_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_WS = re.compile(r"[ \t\n\r]*")
# The entry exactly as the reference writer lays it out (no escapes in the name, integers of
# at most 19 digits), with the separator after it. Anything else takes the general path; both
# apply the same checks.
_COUNT = r"(?:0|[1-9][0-9]{0,18})"
_FAST_ENTRY = re.compile(
    r'"([^"\\\x00-\x1f]{0,1024})":\{"dtype":"([A-Z0-9_]{1,16})",'
    rf'"shape":\[((?:{_COUNT}(?:,{_COUNT}){{0,63}})?)\],'
    rf'"data_offsets":\[({_COUNT}),({_COUNT})\]\}}[ \t\n\r]*([,}}])[ \t\n\r]*'
)


def _bad(message: str) -> IntegrityViolation:
    return IntegrityViolation(f"not a valid safetensors file: {message}", reason="malformed_file")


def _refuse_constant(name: str) -> Any:
    raise _bad(f"the header holds {name}, which JSON does not allow")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _bad("an object in the header has a duplicate key")
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_object, parse_constant=_refuse_constant)


def read_header(fh: BinaryIO, file_size: int) -> tuple[bytes, TensorMap]:
    """Read and check the header at the start of ``fh``: its raw bytes and its tensor map.

    The raw bytes (``8 + N``) let a loader check that the header it finds in VRAM is the one it
    checked here with one comparison, instead of parsing it a second time.

    :raises IntegrityViolation: as :func:`parse_tensor_map`.
    """
    seen: list[bytes] = []

    def read(n: int) -> bytes:
        seen.append(fh.read(n))
        return seen[-1]

    tensors = parse_tensor_map(read, file_size)
    return b"".join(seen), tensors


def read_tensor_map(fh: BinaryIO, file_size: int) -> TensorMap:
    """Parse the header at the start of ``fh`` and return its tensor map (checked, sorted).

    :raises IntegrityViolation: the header is malformed or does not describe the file exactly.
    """
    return parse_tensor_map(fh.read, file_size)


def parse_tensor_map(read: Callable[[int], bytes], file_size: int) -> TensorMap:
    """Like :func:`read_tensor_map`, reading the header through ``read(n) -> bytes``.

    ``read`` is called twice: for the 8-byte length, then for the header itself.
    """
    raw = read(8)
    if len(raw) != 8:
        raise _bad("shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", raw)
    if header_len > MAX_HEADER_BYTES:
        raise _bad(f"header length {header_len} is over the {MAX_HEADER_BYTES}-byte limit")
    if 8 + header_len > file_size:
        raise _bad(f"header length {header_len} runs past the end of the file ({file_size} bytes)")
    blob = read(header_len)
    if len(blob) != header_len:
        raise _bad("the file ends inside its header")
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("the header is not UTF-8") from None
    del blob  # a header can be 100 MB: keep one copy of it, not two
    base = 8 + header_len
    try:
        entries = _parse_header(text, file_size - base)
    except RecursionError:
        raise _bad("the header is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer with too many digits
        raise _bad(f"the header is not valid JSON ({exc})") from None
    return _layout(entries, base, file_size)


_Entries = tuple[list[str], "array[int]", "array[int]", list[str], list[tuple[int, ...]]]


def _parse_header(text: str, data_len: int) -> _Entries:
    """Walk the top-level object; check each entry; return names, begins, ends, dtypes, shapes.

    ``data_len`` is the number of bytes after the header: no tensor may end past it.
    """
    names: list[str] = []
    begins = array("q")
    ends = array("q")
    dtypes: list[str] = []
    shapes: list[tuple[int, ...]] = []
    seen: set[str] = set()
    if not text.startswith("{"):
        raise _bad("the header does not start with '{'")
    pos = _WS.match(text, 1).end()  # type: ignore[union-attr]
    if text.startswith("}", pos):
        pos += 1
    else:
        while True:
            fast = _FAST_ENTRY.match(text, pos)
            if fast is not None:
                key, dtype, shape, begin_text, end_text, separator = fast.groups()
                if key in seen or key == "__metadata__":
                    raise _bad(f"the header names {safe_repr(key)} twice or misuses __metadata__")
                seen.add(key)
                dims = [int(d) for d in shape.split(",")] if shape else []
                begin, end = _check_layout(
                    key, dtype, dims, int(begin_text), int(end_text), data_len
                )
                names.append(key)
                begins.append(begin)
                ends.append(end)
                dtypes.append(dtype)
                shapes.append(tuple(dims))
                pos = fast.end()
                if separator == "}":
                    break
                continue
            if not text.startswith('"', pos):
                raise _bad(f"expected a tensor name at header byte {pos}")
            key, pos = scanstring(text, pos + 1, True)
            pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
            if not text.startswith(":", pos):
                raise _bad(f"expected ':' at header byte {pos}")
            pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
            value, pos = _DECODER.raw_decode(text, pos)
            if key in seen:
                raise _bad(f"the header names {safe_repr(key)} twice")
            seen.add(key)
            if key == "__metadata__":
                _check_metadata(value)
            else:
                begin, end = _check_tensor(key, value, data_len)
                names.append(key)
                begins.append(begin)
                ends.append(end)
                dtypes.append(value["dtype"])
                shapes.append(tuple(value["shape"]))
            pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
            if text.startswith(",", pos):
                pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
                continue
            if text.startswith("}", pos):
                pos += 1
                break
            raise _bad(f"expected ',' or '}}' at header byte {pos}")
    if text[pos:].strip(" \t\n\r"):
        raise _bad("bytes follow the header's JSON object")
    return names, begins, ends, dtypes, shapes


def _check_metadata(value: object) -> None:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _bad("__metadata__ must be an object of strings")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_tensor(name: str, spec: object, data_len: int) -> tuple[int, int]:
    """Check one tensor entry decoded by the general path; return its ``data_offsets``."""
    shown = safe_repr(name)
    if not isinstance(spec, dict) or spec.keys() != _TENSOR_KEYS:
        raise _bad(f"tensor {shown} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _bad(f"tensor {shown} shape must be a list of counts")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets)):
        raise _bad(f"tensor {shown} data_offsets must be [begin, end]")
    return _check_layout(name, dtype, shape, offsets[0], offsets[1], data_len)


def _check_layout(
    name: str, dtype: object, shape: list[int], begin: int, end: int, data_len: int
) -> tuple[int, int]:
    """The checks both paths share: name, dtype, rank, and bytes = prod(shape) x dtype size."""
    if not (name.isascii() and name.isprintable()) or len(name) > MAX_TENSOR_NAME_CHARS:
        try:
            check_tensor_name(name)
        except InvalidInput as exc:
            raise _bad(f"tensor name refused: {exc}") from None
    bits = DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
    if bits is None:
        raise _bad(f"tensor {safe_repr(name)} has unknown dtype {safe_repr(dtype)}")
    if len(shape) > MAX_SHAPE_DIMS:
        raise _bad(f"tensor {safe_repr(name)} has more than {MAX_SHAPE_DIMS} dimensions")
    if end < begin:
        raise _bad(f"tensor {safe_repr(name)} ends before it begins")
    if end > data_len:
        raise _bad(
            f"tensor {safe_repr(name)} ends at data byte {end}, past the end of the file "
            f"({data_len} data bytes)"
        )
    nbits = 0 if 0 in shape else bits
    for dim in shape if nbits else ():
        nbits *= dim
        if nbits > (end - begin) * 8:  # dims are >= 1 here: stop a shape of huge ones early
            break
    if nbits % 8 or nbits // 8 != end - begin:
        raise _bad(
            f"tensor {safe_repr(name)} is {end - begin} bytes but {dtype} of shape "
            f"{safe_repr(shape)} needs {nbits / 8:g}"
        )
    return begin, end


def _layout(entries: _Entries, base: int, file_size: int) -> TensorMap:
    """Sort by offset and check the tensors tile the data exactly; shift to file offsets."""
    names, begins, ends, dtypes, shapes = entries
    if not _in_order(names, begins, ends):
        order = sorted(range(len(names)), key=lambda i: (begins[i], ends[i], names[i]))
        names = [names[i] for i in order]
        begins = array("q", [begins[i] for i in order])
        ends = array("q", [ends[i] for i in order])
        dtypes = [dtypes[i] for i in order]
        shapes = [shapes[i] for i in order]
    expected = 0
    for name, begin, end in zip(names, begins, ends, strict=True):
        if begin != expected:
            problem = "overlaps the tensor before it" if begin < expected else "leaves a gap"
            raise _bad(f"tensor {safe_repr(name)} {problem} (data_offsets begin {begin})")
        expected = end
    if base + expected != file_size:
        raise _bad(
            f"the tensors cover {expected} data bytes but the file holds {file_size - base} "
            "after its header"
        )
    shift = base.__add__
    return TensorMap(
        names, array("q", map(shift, begins)), array("q", map(shift, ends)), dtypes, shapes
    )


def _in_order(names: list[str], begins: array[int], ends: array[int]) -> bool:
    previous: tuple[int, int, str] = (-1, -1, "")
    for key in zip(begins, ends, names, strict=True):
        if key < previous:
            return False
        previous = key
    return True


def write_safetensors(
    fh: BinaryIO,
    tensors: dict[str, tuple[str, list[int], bytes]],
    *,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a minimal safetensors file: ``name -> (dtype, shape, raw bytes)``.

    Used by ``vramcore demo`` and the tests to make models without extra dependencies. The
    caller keeps ``len(raw) == prod(shape) * size(dtype)``; nothing is checked here, so tests
    can write broken files on purpose.
    """
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8-byte alignment
    fh.write(struct.pack("<Q", len(blob)))
    fh.write(blob)
    for _dtype, _shape, data in tensors.values():
        fh.write(data)
