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

How it stays fast on a header of a million tensors: runs of entries laid out as the reference
writer lays them out (compact JSON, plain names) are matched in bulk, tens of thousands at a
time, by one regular-expression scan, and checked column by column in C (names joined and
tested once, offsets converted by ``map``, sizes looked up per distinct dtype and shape).
A run is accepted only if its entries tile its text exactly and every check passes; otherwise
that run is walked entry by entry (anything else is decoded by the C JSON scanner), with the
same checks and the precise error. Both paths give the same result on every input; the tests
compare them, and the reference, on generated headers. Shapes and dtypes are shared objects
(one tuple per distinct shape), so a million tensors cost the memory of their names and a few
arrays, never a dict per tensor.
"""

from __future__ import annotations

import json
import re
import struct
from array import array
from collections.abc import Callable, Mapping, Sequence
from json.decoder import scanstring  # type: ignore[attr-defined]
from operator import itemgetter
from typing import Any, BinaryIO

import attrs

from vramcore.errors import IntegrityViolation, InvalidInput
from vramcore.shard import MAX_SHAPE_DIMS, MAX_TENSOR_NAME_CHARS, TensorMap, check_tensor_name
from vramcore.validation import safe_repr

__all__ = [
    "DTYPE_BITS",
    "MAX_HEADER_BYTES",
    "MAX_SHAPE_DIMS",
    "SafetensorsHeader",
    "dtype_itemsize",
    "parse_header",
    "parse_tensor_map",
    "read_header",
    "read_safetensors_header",
    "read_tensor_map",
    "write_safetensors",
]

#: Larger headers are refused (the reference implementation's cap).
MAX_HEADER_BYTES = 100_000_000
#: The dtype table: every dtype the reference implementation knows, name -> item size in bits
#: (bits, because ``F4`` and the ``F6`` types pack several elements into a byte). The one
#: definition: byte sizes come from :func:`dtype_itemsize`, and the allocator plugins map these
#: names to their array libraries' types.
DTYPE_BITS: Mapping[str, int] = {
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
# One str object per dtype, shared by every tensor of that dtype.
_DTYPE_NAMES: dict[str, str] = {name: name for name in DTYPE_BITS}
_TENSOR_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_WS = re.compile(r"[ \t\n\r]*")
_COUNT = r"(?:0|[1-9][0-9]{0,18})"
_DIMS = rf"(?:{_COUNT}(?:,{_COUNT}){{0,{MAX_SHAPE_DIMS - 1}}})?"
# One entry exactly as the reference writer lays it out (no escapes in the name, integers of
# at most 19 digits), with the separator after it. Anything else takes the general path; all
# paths apply the same checks.
_FAST_ENTRY = re.compile(
    r'"([^"\\\x00-\x1f]{0,1024})":\{"dtype":"([A-Z0-9_]{1,16})",'
    rf'"shape":\[({_DIMS})\],'
    rf'"data_offsets":\[({_COUNT}),({_COUNT})\]\}}[ \t\n\r]*([,}}])[ \t\n\r]*'
)
# The same without whitespace, for runs matched in bulk, with dtype and shape in one group (one
# string per entry: distinct ones are few, and are parsed once).
# Kept simple for speed: name lengths, dtype and shape (per distinct text, with _KIND) and the
# offsets' form (no leading zero, at most 2**63 - 1) are checked after the scan.
_BULK_ENTRY = re.compile(
    r'"([^"\\\x00-\x1f]*)":\{"dtype":"([A-Z0-9_]+","shape":\[[0-9,]*)\],'
    r'"data_offsets":\[([0-9]+),([0-9]+)\]\}[,}]'
)
_KIND = re.compile(rf'([A-Z0-9_]{{1,16}})","shape":\[({_DIMS})')
_DTYPE, _SHAPE, _NBYTES = itemgetter(0), itemgetter(1), itemgetter(2)
#: Characters of header text matched per bulk run (about 40,000 typical entries): bounds the
#: memory of one run's intermediate strings to a few tens of MB.
_RUN_CHARS = 2_000_000
#: Distinct (dtype, shape) sizes remembered between runs (a header of all-different shapes
#: pays for parsing each, never unbounded memory).
_MAX_CACHED_SHAPES = 1 << 16


def dtype_itemsize(dtype: str) -> int | None:
    """Bytes per element of ``dtype``, or ``None`` for a sub-byte type (``F4``, ``F6_*``).

    :raises KeyError: ``dtype`` is not in :data:`DTYPE_BITS`.
    """
    bits = DTYPE_BITS[dtype]
    return bits // 8 if bits % 8 == 0 else None


@attrs.frozen(repr=False)
class SafetensorsHeader:
    """A checked safetensors header.

    :attr tensors: the tensor map: each tensor's name, byte range in the file (header
        included), dtype and shape, sorted by offset.
    :attr metadata: the ``__metadata__`` strings, or ``None`` when the header has none.
    :attr raw: the header's bytes as read (the 8-byte length and the JSON), so a loader can
        check with one comparison that the header it finds in VRAM is the one checked here.
    """

    tensors: TensorMap
    metadata: Mapping[str, str] | None = None
    raw: bytes = b""

    def __repr__(self) -> str:
        return f"SafetensorsHeader({len(self.tensors)} tensors, {len(self.raw)} header bytes)"


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


def read_safetensors_header(fh: BinaryIO, file_size: int) -> SafetensorsHeader:
    """Read and check the header at the start of ``fh``: tensors (with dtype and shape),
    metadata and raw bytes.

    :raises IntegrityViolation: as :func:`parse_header`.
    """
    return parse_header(fh.read, file_size)


def read_header(fh: BinaryIO, file_size: int) -> tuple[bytes, TensorMap]:
    """Read and check the header at the start of ``fh``: its raw bytes and its tensor map.

    :raises IntegrityViolation: as :func:`parse_header`.
    """
    header = parse_header(fh.read, file_size)
    return header.raw, header.tensors


def read_tensor_map(fh: BinaryIO, file_size: int) -> TensorMap:
    """Parse the header at the start of ``fh`` and return its tensor map (checked, sorted).

    :raises IntegrityViolation: the header is malformed or does not describe the file exactly.
    """
    return parse_header(fh.read, file_size).tensors


def parse_tensor_map(read: Callable[[int], bytes], file_size: int) -> TensorMap:
    """Like :func:`read_tensor_map`, reading the header through ``read(n) -> bytes``."""
    return parse_header(read, file_size).tensors


def parse_header(read: Callable[[int], bytes], file_size: int) -> SafetensorsHeader:
    """Check the header read through ``read(n) -> bytes`` against a file of ``file_size``.

    ``read`` is called twice: for the 8-byte length, then for the header itself; no byte of
    the data is read.

    :raises IntegrityViolation: the header is malformed or does not describe the file exactly.
    """
    return _parse_header(read, file_size)


def _parse_header(
    read: Callable[[int], bytes], file_size: int, *, bulk: bool = True
) -> SafetensorsHeader:
    """:func:`parse_header`; ``bulk=False`` walks every entry singly (the tests compare)."""
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
    raw += blob
    del blob  # a header can be 100 MB: keep its bytes (for the loader) and its text, no more
    base = 8 + header_len
    walk = _HeaderWalk(text, file_size - base, bulk=bulk)
    try:
        walk.run()
    except RecursionError:
        raise _bad("the header is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer with too many digits
        raise _bad(f"the header is not valid JSON ({exc})") from None
    del text
    return walk.layout(base, file_size, raw)


class _HeaderWalk:
    """One pass over a header's top-level object, collecting checked columns.

    :meth:`run` alternates between bulk runs (:meth:`_bulk_run`) and single entries
    (:meth:`_entry`); :meth:`layout` then sorts by offset and checks the tiling.
    """

    def __init__(self, text: str, data_len: int, *, bulk: bool = True) -> None:
        self.text = text
        self.data_len = data_len  # bytes after the header: no tensor may end past them
        self.bulk = bulk
        self.names: list[str] = []
        self.dtypes: list[str] = []
        self.shapes: list[tuple[int, ...]] = []
        self.begins = array("q")
        self.ends = array("q")
        self.metadata: dict[str, str] | None = None
        self._seen: set[str] = set()
        self._kind_of: dict[str, tuple[str, tuple[int, ...], int | None]] = {}
        # The object's closing brace: the text after it may only be whitespace.
        self._close = _content_end(text)

    def run(self) -> None:
        """Walk every entry of the top-level object; raise on the first problem."""
        text = self.text
        if not text.startswith("{"):
            raise _bad("the header does not start with '{'")
        pos = _WS.match(text, 1).end()  # type: ignore[union-attr]
        if text.startswith("}", pos):
            pos += 1
        else:
            done = False
            while not done:
                if self.bulk and _BULK_ENTRY.match(self.text, pos):
                    end = self._run_end(pos)
                    if self._bulk_run(pos, end):
                        pos, done = end, end == self._close
                        continue
                    while pos < end and not done:  # this run, entry by entry
                        pos, done = self._entry(pos)
                else:
                    pos, done = self._entry(pos)
        if text[pos:].strip(" \t\n\r"):
            raise _bad("bytes follow the header's JSON object")
        # The columns hold all the layout needs: free the text and the set of names now.
        self.text, self._seen, self._kind_of = "", set(), {}

    def _run_end(self, pos: int) -> int:
        """Where the run starting at ``pos`` ends: after an entry's ``},`` or at the close."""
        cut = self.text.find('},"', pos + _RUN_CHARS, self._close)
        return self._close if cut < 0 else cut + 2

    def _bulk_run(self, pos: int, end: int) -> bool:
        """Match ``text[pos:end]`` as compact entries and check them in bulk.

        Returns False, having recorded nothing, unless the entries tile the run exactly and
        every one passes every check; the caller then walks the run entry by entry, which
        finds the same first problem the single walk would.
        """
        text = self.text
        # split() gives flat strings (no tuple per entry for the garbage collector to chase):
        # the text before, between and after the matches, then each match's four groups.
        pieces = _BULK_ENTRY.split(text[pos:end])
        if len(pieces) < 5 or any(pieces[::5]):  # no match, or text between matches
            return False
        names, kinds = pieces[1::5], pieces[2::5]
        begin_texts, end_texts = pieces[3::5], pieces[4::5]
        del pieces
        joined = "".join(names)
        # Each entry holds one '}' of its own and is followed by ',', except the last of the
        # object, by '}': counted with the names' own, the '}'s show which.
        closes = end == self._close
        if text[end - 1] != ("}" if closes else ","):
            return False
        if text.count("}", pos, end) != len(names) + joined.count("}") + closes:
            return False
        if not (joined.isascii() and joined.isprintable()) or "__metadata__" in joined:
            return False
        if max(map(len, names)) > MAX_TENSOR_NAME_CHARS:
            return False
        offsets = _parse_offsets(begin_texts, end_texts)
        if offsets is None:
            return False
        begins, ends = offsets
        if max(ends) > self.data_len:
            return False
        infos = self._kinds(kinds)
        # Sizes equal (never None) also show that no tensor ends before it begins.
        if infos is None or list(map(_NBYTES, infos)) != list(map(int.__sub__, ends, begins)):
            return False
        seen, known = self._seen, len(self._seen)
        seen.update(names)
        if len(seen) != known + len(names):  # a name twice: the single walk says which
            seen.difference_update(names)
            seen.update(self.names)
            return False
        self.names += names
        self.dtypes += map(_DTYPE, infos)
        self.shapes += map(_SHAPE, infos)
        self.begins += begins
        self.ends += ends
        return True

    def _kinds(self, kinds: list[str]) -> list[tuple[str, tuple[int, ...], int | None]] | None:
        """``(dtype, shape, bytes)`` for each matched ``DTYPE","shape":[DIMS`` text, or None
        if one is not a known dtype and a shape of at most 64 counts. Each distinct text is
        parsed once; bytes are None for a size that is not a whole number of bytes."""
        kind_of = self._kind_of
        if len(kind_of) > _MAX_CACHED_SHAPES:
            kind_of.clear()
        for kind in set(kinds).difference(kind_of):
            match = _KIND.fullmatch(kind)
            if match is None or match[1] not in DTYPE_BITS:
                return None
            dtype, dims = match.groups()
            shape = tuple(map(int, dims.split(","))) if dims else ()
            kind_of[kind] = (_DTYPE_NAMES[dtype], shape, _nbytes(DTYPE_BITS[dtype], shape))
        return list(map(kind_of.__getitem__, kinds))

    def _entry(self, pos: int) -> tuple[int, bool]:
        """Check the one entry at ``pos``; return where the next starts and whether it closed."""
        text = self.text
        fast = _FAST_ENTRY.match(text, pos)
        if fast is not None:
            key, dtype, shape, begin_text, end_text, separator = fast.groups()
            if key in self._seen or key == "__metadata__":
                raise _bad(f"the header names {safe_repr(key)} twice or misuses __metadata__")
            self._seen.add(key)
            dims = [int(d) for d in shape.split(",")] if shape else []
            begin, end = _check_layout(
                key, dtype, dims, int(begin_text), int(end_text), self.data_len
            )
            self._add(key, dtype, dims, begin, end)
            return fast.end(), separator == "}"
        if not text.startswith('"', pos):
            raise _bad(f"expected a tensor name at header byte {pos}")
        key, pos = scanstring(text, pos + 1, True)
        pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
        if not text.startswith(":", pos):
            raise _bad(f"expected ':' at header byte {pos}")
        pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
        value, pos = _DECODER.raw_decode(text, pos)
        if key in self._seen:
            raise _bad(f"the header names {safe_repr(key)} twice")
        self._seen.add(key)
        if key == "__metadata__":
            self.metadata = _check_metadata(value)
        else:
            dtype, dims, begin, end = _check_tensor(key, value, self.data_len)
            self._add(key, dtype, dims, begin, end)
        pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
        if text.startswith(",", pos):
            return _WS.match(text, pos + 1).end(), False  # type: ignore[union-attr]
        if text.startswith("}", pos):
            return pos + 1, True
        raise _bad(f"expected ',' or '}}' at header byte {pos}")

    def _add(self, name: str, dtype: str, dims: list[int], begin: int, end: int) -> None:
        self.names.append(name)
        self.dtypes.append(_DTYPE_NAMES[dtype])
        self.shapes.append(tuple(dims))
        self.begins.append(begin)
        self.ends.append(end)

    def layout(self, base: int, file_size: int, raw: bytes) -> SafetensorsHeader:
        """Sort by offset, check the tensors tile the data exactly, shift to file offsets."""
        names, dtypes, shapes = self.names, self.dtypes, self.shapes
        begins, ends = self.begins, self.ends
        if not all(map(int.__lt__, begins, begins[1:])):  # not in order by offset
            order = _offset_order(names, begins, ends)
            names = list(map(names.__getitem__, order))
            dtypes = list(map(dtypes.__getitem__, order))
            shapes = list(map(shapes.__getitem__, order))
            begins = array("q", map(begins.__getitem__, order))
            ends = array("q", map(ends.__getitem__, order))
        if (begins and begins[0] != 0) or begins[1:] != ends[:-1]:
            raise _tiling_error(names, begins, ends)
        covered = ends[-1] if ends else 0
        if base + covered != file_size:
            raise _bad(
                f"the tensors cover {covered} data bytes but the file holds {file_size - base} "
                "after its header"
            )
        tensors = TensorMap(
            names,
            array("q", map(base.__add__, begins)),
            array("q", map(base.__add__, ends)),
            dtypes,
            shapes,
        )
        return SafetensorsHeader(tensors, self.metadata, raw)


def _offset_order(names: list[str], begins: array[int], ends: array[int]) -> list[int]:
    """Indices sorted by ``(begin, end, name)``, by C-keyed stable sorts."""
    order = sorted(range(len(names)), key=begins.__getitem__)
    ordered = array("q", map(begins.__getitem__, order))
    if not all(map(int.__lt__, ordered, ordered[1:])):  # ties: zero-sized tensors, overlaps
        order = sorted(range(len(names)), key=names.__getitem__)
        order.sort(key=ends.__getitem__)
        order.sort(key=begins.__getitem__)
    return order


def _tiling_error(names: Sequence[str], begins: array[int], ends: array[int]) -> IntegrityViolation:
    """The error for the first tensor (in offset order) that overlaps or leaves a gap."""
    expected = 0
    for name, begin, end in zip(names, begins, ends, strict=True):
        if begin != expected:
            problem = "overlaps the tensor before it" if begin < expected else "leaves a gap"
            return _bad(f"tensor {safe_repr(name)} {problem} (data_offsets begin {begin})")
        expected = end
    raise AssertionError("the tensors tile the data: no tiling error to give")


def _check_metadata(value: object) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _bad("__metadata__ must be an object of strings")
    return value


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_tensor(name: str, spec: object, data_len: int) -> tuple[str, list[int], int, int]:
    """Check one tensor entry decoded by the general path; return dtype, shape, offsets."""
    shown = safe_repr(name)
    if not isinstance(spec, dict) or spec.keys() != _TENSOR_KEYS:
        raise _bad(f"tensor {shown} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _bad(f"tensor {shown} shape must be a list of counts")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets)):
        raise _bad(f"tensor {shown} data_offsets must be [begin, end]")
    begin, end = _check_layout(name, dtype, shape, offsets[0], offsets[1], data_len)
    return dtype, shape, begin, end


def _check_layout(
    name: str, dtype: object, shape: list[int], begin: int, end: int, data_len: int
) -> tuple[int, int]:
    """The checks every path applies: name, dtype, rank, and bytes = prod(shape) x size."""
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


def _content_end(text: str) -> int:
    """``len(text.rstrip())`` for JSON whitespace, without copying a 100 MB text."""
    end = len(text)
    while end:
        tail = text[max(0, end - 4096) : end]
        kept = len(tail.rstrip(" \t\n\r"))
        if kept:
            return end - len(tail) + kept
        end -= len(tail)
    return 0


def _nbytes(bits: int, shape: tuple[int, ...]) -> int | None:
    """``prod(shape) * bits / 8``, or None when that is not a whole number of bytes."""
    nbits = bits
    for dim in shape:
        nbits *= dim
    return None if nbits % 8 else nbits // 8


def _parse_offsets(
    begin_texts: list[str], end_texts: list[str]
) -> tuple[array[int], array[int]] | None:
    """The offsets of a bulk run as integers, or None if one is not a JSON count of at most
    2**63 - 1 (then the single walk names it). Where each tensor begins where the one
    before it in the text ends (the reference writer's order), only the ends are converted."""
    joined = "," + ",".join(begin_texts) + "," + ",".join(end_texts) + ","
    if joined.count(",0") != joined.count(",0,"):
        return None  # a leading zero, which JSON does not allow
    try:
        ends = array("q", map(int, end_texts))
        if begin_texts[1:] == end_texts[:-1]:
            begins = array("q", [int(begin_texts[0])])
            begins += ends[:-1]
        else:
            begins = array("q", map(int, begin_texts))
    except OverflowError:
        return None
    return begins, ends


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
