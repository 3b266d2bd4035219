"""Reading a safetensors header to map tensor names to byte ranges of the file.

The format: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON mapping each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
byte after the header) and an optional ``"__metadata__"`` entry, then the data. vramcore seals
the file's bytes exactly as they are, header included, so tensor ranges are shifted by
``8 + N`` to become offsets in the shard.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import BinaryIO

from vramcore.errors import IntegrityViolation, InvalidInput
from vramcore.shard import TensorRange
from vramcore.validation import clean_text, safe_repr

__all__ = ["MAX_HEADER_BYTES", "parse_tensor_map", "read_tensor_map", "write_safetensors"]

#: Larger headers are refused (the reference implementation caps them at 100 MB too).
MAX_HEADER_BYTES = 100_000_000


def read_tensor_map(fh: BinaryIO, file_size: int) -> tuple[TensorRange, ...]:
    """Parse the header at the start of ``fh`` and return each tensor's byte range.

    :raises IntegrityViolation: the header is malformed or a range falls outside the file.
    """
    return parse_tensor_map(fh.read, file_size)


def parse_tensor_map(read: Callable[[int], bytes], file_size: int) -> tuple[TensorRange, ...]:
    """Like :func:`read_tensor_map`, reading the header through ``read(n) -> bytes``.

    ``read`` is called twice: for the 8-byte length, then for the header itself.
    """
    raw = read(8)
    if len(raw) != 8:
        raise IntegrityViolation("not a safetensors file: shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", raw)
    if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
        raise IntegrityViolation(
            f"not a valid safetensors file: header length {header_len} exceeds the file "
            f"({file_size} bytes) or the {MAX_HEADER_BYTES}-byte limit"
        )
    try:
        header = json.loads(read(header_len))
    except (ValueError, UnicodeDecodeError) as exc:
        raise IntegrityViolation(f"safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise IntegrityViolation("safetensors header must be a JSON object")
    base = 8 + header_len
    tensors = []
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:  # names reach error messages and audit events: no escapes or bidi controls
            clean_text(name, field="tensor name")
        except InvalidInput:
            raise IntegrityViolation(
                f"safetensors tensor name {safe_repr(name)} contains a control or invisible "
                "character"
            ) from None
        offsets = spec.get("data_offsets") if isinstance(spec, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in offsets)
            or not 0 <= offsets[0] <= offsets[1]
            or base + offsets[1] > file_size
        ):
            raise IntegrityViolation(
                f"safetensors tensor {name[:64]!r} has bad data_offsets {str(offsets)[:64]}"
            )
        tensors.append(TensorRange(name, base + offsets[0], base + offsets[1]))
    tensors.sort(key=lambda t: (t.start, t.end, t.name))
    return tuple(tensors)


def write_safetensors(fh: BinaryIO, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    """Write a minimal safetensors file: ``name -> (dtype, shape, raw bytes)``.

    Used by ``vramcore demo`` and the tests to make models without extra dependencies.
    """
    header: dict[str, object] = {}
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
