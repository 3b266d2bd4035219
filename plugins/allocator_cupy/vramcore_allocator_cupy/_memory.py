"""Zero-copy views of a shard's device memory: CuPy arrays, per-tensor views and DLPack.

``DeviceBuffer.native`` of the cupy backend is a :class:`DeviceMemory`. Inside
``VramManager.verified(shard)`` (after the digest was recomputed from VRAM) inference code
takes the verified bytes where they are:

* :meth:`DeviceMemory.array` -- a ``cupy.ndarray`` over the whole shard (``uint8``);
* :meth:`DeviceMemory.tensors` -- for a shard sealed from a safetensors file, one array per
  tensor with its dtype and shape, read from the (verified) header in VRAM;
* DLPack: ``torch.from_dlpack(buffer.native)`` or ``jax.dlpack.from_dlpack`` on any array
  above; the object also has ``__cuda_array_interface__`` for Numba and CuPy.

Views are valid while the shard is allocated: keep them inside the ``verified()`` block. A
view made after the shard was freed is refused.
"""

from __future__ import annotations

import json
import math
import struct
from typing import TYPE_CHECKING, Any, Protocol

from vramcore.errors import IntegrityViolation, InvalidInput, NotSealed
from vramcore.safetensors import MAX_HEADER_BYTES

if TYPE_CHECKING:
    from vramcore.shard import SealedShard

__all__ = ["SAFETENSORS_DTYPES", "AllocationRecord", "ByteReader", "DeviceMemory"]

#: safetensors dtype -> NumPy/CuPy dtype. Types NumPy lacks (BF16, the 8-bit floats) are
#: exposed as unsigned integers of the same width: reinterpret them in the consumer
#: (``torch.from_dlpack(a).view(torch.bfloat16)``).
SAFETENSORS_DTYPES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "F16": "float16",
    "BF16": "uint16",
    "U32": "uint32",
    "I32": "int32",
    "F32": "float32",
    "U64": "uint64",
    "I64": "int64",
    "F64": "float64",
    "C64": "complex64",
    "F8_E4M3": "uint8",
    "F8_E5M2": "uint8",
    "F8_E8M0": "uint8",
}

_DLPACK_CUDA = 2  # kDLCUDA


class AllocationRecord(Protocol):
    """What a view needs of the backend's record of one allocation."""

    device: int
    nbytes: int
    ptr: int
    freed: bool


class ByteReader(Protocol):
    """What a view needs of the backend: a synchronous read of an allocation's bytes.

    (A protocol rather than the backend class: ``_backend`` imports this module.)
    """

    def _read_bytes(self, rec: Any, offset: int, n: int) -> bytes: ...


class DeviceMemory:
    """One cupy-backend allocation as inference code sees it (``DeviceBuffer.native``)."""

    __slots__ = ("_backend", "_rec")

    def __init__(self, backend: ByteReader, rec: AllocationRecord) -> None:
        self._backend = backend
        self._rec = rec

    @property
    def device(self) -> int:
        """The GPU index."""
        return self._rec.device

    @property
    def nbytes(self) -> int:
        """The allocation's size in bytes."""
        return self._rec.nbytes

    def _ptr(self) -> int:
        if self._rec.freed:
            raise NotSealed("this shard's device memory was freed; views are no longer valid")
        return self._rec.ptr

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        """The CUDA Array Interface (v3) of the whole allocation as ``uint8``."""
        return {
            "shape": (self._rec.nbytes,),
            "typestr": "|u1",
            "data": (self._ptr(), False),
            "strides": None,
            "version": 3,
            "stream": None,  # the digest that verified the bytes synchronised the stream
        }

    def array(self, dtype: Any = "uint8", offset: int = 0, shape: Any = None) -> Any:
        """A ``cupy.ndarray`` over the allocation (no copy), of ``dtype`` from byte ``offset``.

        ``shape`` defaults to as many elements as fit; the array keeps this object alive.
        """
        import cupy  # type: ignore[import-untyped]
        import numpy

        dt = numpy.dtype(dtype)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidInput("offset must be a non-negative integer")
        if shape is None:
            shape = ((self._rec.nbytes - offset) // dt.itemsize,)
        shape = tuple(int(d) for d in (shape if isinstance(shape, (tuple, list)) else (shape,)))
        if offset + math.prod(shape) * dt.itemsize > self._rec.nbytes:
            raise InvalidInput("the view would reach past the end of the allocation")
        if offset % dt.itemsize:
            raise InvalidInput(f"offset {offset} is not aligned to {dt.name}")
        mem = cupy.cuda.UnownedMemory(self._ptr(), self._rec.nbytes, self, self._rec.device)
        return cupy.ndarray(shape, dtype=dt, memptr=cupy.cuda.MemoryPointer(mem, offset))

    def header(self) -> dict[str, Any]:
        """The safetensors header at the start of the allocation, parsed."""
        raw = self._backend._read_bytes(self._rec, 0, min(8, self._rec.nbytes))
        if len(raw) < 8:
            raise IntegrityViolation("the shard is too short to hold a safetensors header")
        (size,) = struct.unpack("<Q", raw)
        if size > MAX_HEADER_BYTES or 8 + size > self._rec.nbytes:
            raise IntegrityViolation("the shard does not start with a safetensors header")
        text = self._backend._read_bytes(self._rec, 8, size)
        try:
            header = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IntegrityViolation(f"the safetensors header is not JSON: {exc}") from None
        if not isinstance(header, dict):
            raise IntegrityViolation("the safetensors header is not a JSON object")
        return header

    def tensors(self, shard: SealedShard) -> dict[str, Any]:
        """Per-tensor ``cupy.ndarray`` views (dtype and shape from the header), by name.

        ``shard`` must be the sealed safetensors shard this memory holds; each tensor's byte
        range is taken from its tensor map and must match the header.
        """
        if not shard.tensors:
            raise InvalidInput(f"shard {shard.shard_id} has no tensor map (not a safetensors file)")
        header = self.header()
        base = 8 + struct.unpack("<Q", self._backend._read_bytes(self._rec, 0, 8))[0]
        out = {}
        for t in shard.tensors:
            spec = header.get(t.name)
            if not isinstance(spec, dict) or spec.get("dtype") not in SAFETENSORS_DTYPES:
                raise IntegrityViolation(f"tensor {t.name!r}: no usable dtype in the header")
            begin, end = spec["data_offsets"]
            if (base + begin, base + end) != (t.start, t.end):
                raise IntegrityViolation(f"tensor {t.name!r}: header and tensor map disagree")
            out[t.name] = self.array(
                SAFETENSORS_DTYPES[spec["dtype"]], offset=t.start, shape=tuple(spec["shape"])
            )
        return out

    def __dlpack__(self, **kwargs: Any) -> Any:
        """DLPack capsule of the whole allocation as ``uint8`` (delegates to CuPy)."""
        return self.array().__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        """``(kDLCUDA, device)``."""
        return _DLPACK_CUDA, self._rec.device

    def __repr__(self) -> str:
        state = " freed" if self._rec.freed else ""
        return f"<cupy DeviceMemory GPU{self._rec.device} {self._rec.nbytes} bytes{state}>"
