"""Zero-copy tensor views of a sealed shard, the same on every backend.

:meth:`vramcore.backend.DeviceBuffer.tensors` returns one :class:`TensorView` per tensor of a
shard sealed from a safetensors file. The dtype and shape come from the sealed (signed) tensor
map, never from bytes re-read from VRAM; the backend only says where its memory is (its
:class:`~vramcore.backend.TensorSource`, in each allocator plugin's ``_tensors.py``).

A view exports DLPack itself (:mod:`vramcore._dlpack`), so every dtype that safetensors and
PyTorch share crosses over with its own DLPack code, BF16 and the 8-bit floats included, which
NumPy and CuPy cannot represent: their arrays (``view.array``) hold those as unsigned integers
of the same width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs

from vramcore._dlpack import KDL_CPU, DLDataType, export
from vramcore.backend import AllocatorBackend, DeviceBuffer, TensorSource
from vramcore.errors import BackendUnavailable, IntegrityViolation, InvalidInput, NotSealed
from vramcore.safetensors import DTYPE_BITS
from vramcore.shard import TensorMap
from vramcore.validation import safe_repr

__all__ = [
    "DLPACK_DTYPES",
    "STORAGE_DTYPES",
    "ShardTensorViews",
    "TensorView",
    "attach_tensor_views",
]

# DLPack type codes (dlpack.h, DLDataTypeCode).
_INT, _UINT, _FLOAT, _BFLOAT, _COMPLEX, _BOOL = 0, 1, 2, 4, 5, 6
_F8_E4M3FN, _F8_E5M2, _F8_E8M0FNU = 10, 12, 14

#: safetensors dtype -> DLPack dtype: every dtype safetensors and PyTorch share. The sub-byte
#: floats (F4, F6_*) have no byte-addressable view and are refused.
DLPACK_DTYPES: dict[str, DLDataType] = {
    "BOOL": DLDataType(_BOOL, 8),
    "U8": DLDataType(_UINT, 8),
    "I8": DLDataType(_INT, 8),
    "F8_E5M2": DLDataType(_F8_E5M2, 8),
    "F8_E4M3": DLDataType(_F8_E4M3FN, 8),
    "F8_E8M0": DLDataType(_F8_E8M0FNU, 8),
    "I16": DLDataType(_INT, 16),
    "U16": DLDataType(_UINT, 16),
    "F16": DLDataType(_FLOAT, 16),
    "BF16": DLDataType(_BFLOAT, 16),
    "I32": DLDataType(_INT, 32),
    "U32": DLDataType(_UINT, 32),
    "F32": DLDataType(_FLOAT, 32),
    "I64": DLDataType(_INT, 64),
    "U64": DLDataType(_UINT, 64),
    "F64": DLDataType(_FLOAT, 64),
    "C64": DLDataType(_COMPLEX, 64),
}

#: safetensors dtype -> the NumPy dtype of the backend's own array (``TensorView.array``).
#: Types NumPy lacks are held as unsigned integers of the same width (their bits unchanged).
STORAGE_DTYPES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E5M2": "uint8",
    "F8_E4M3": "uint8",
    "F8_E8M0": "uint8",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "I64": "int64",
    "U64": "uint64",
    "F64": "float64",
    "C64": "complex64",
}
_NATIVE_IN_NUMPY = frozenset(k for k in STORAGE_DTYPES if k not in {"BF16"} and "F8" not in k)


class TensorView:
    """One tensor of a sealed shard, in place: dtype, shape and a DLPack export, no copy.

    :attr name: the tensor's name in the safetensors header.
    :attr dtype: its safetensors dtype (``"BF16"``, ``"F32"``...).
    :attr shape: its shape.
    :attr nbytes: its size in bytes.

    ``torch.from_dlpack(view)`` (or CuPy's, JAX's, NumPy's for host memory) shares the bytes.
    :attr:`array` is the backend's own array. Valid until the shard is deallocated; every
    access after that raises :class:`~vramcore.errors.NotSealed`. The repr shows no address.
    """

    __slots__ = ("_buffer", "_offset", "_source", "dtype", "name", "nbytes", "shape")

    def __init__(
        self,
        *,
        buffer: DeviceBuffer,
        source: TensorSource,
        name: str,
        offset: int,
        dtype: str,
        shape: tuple[int, ...],
        nbytes: int,
    ) -> None:
        self._buffer = buffer
        self._source = source
        self._offset = offset
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.nbytes = nbytes

    def _live(self) -> None:
        if self._buffer.freed:
            raise NotSealed(
                f"tensor {safe_repr(self.name)}: its shard was deallocated; views are refused"
            )

    @property
    def array(self) -> Any:
        """The backend's own zero-copy array of this tensor (NumPy on the mock, CuPy on CuPy,
        a PyCUDA ``GPUArray``): of dtype :data:`STORAGE_DTYPES` ``[dtype]``, so BF16 and the
        8-bit floats appear as ``uint16``/``uint8`` holding their bits."""
        self._live()
        return self._source.array(self._offset, STORAGE_DTYPES[self.dtype], self.shape)

    def __dlpack__(
        self,
        *,
        stream: Any = None,
        max_version: Any = None,
        dl_device: Any = None,
        copy: bool | None = None,
    ) -> Any:
        """A DLPack capsule of the tensor with its own dtype code, never a copy.

        ``stream`` needs no ordering: the shard was verified, no work on it is pending.
        :raises BufferError: a copy or another device was asked for.
        :raises NotSealed: the shard was deallocated.
        """
        del stream, max_version  # the legacy capsule is accepted by every consumer
        if copy:
            raise BufferError("a sealed tensor is exported in place, never copied")
        device = self.__dlpack_device__()
        if dl_device is not None and tuple(dl_device) != device:
            raise BufferError(f"tensor {self.name!r} lives on DLPack device {device}")
        self._live()
        address = self._source.address() + self._offset
        return export(address, self.shape, DLPACK_DTYPES[self.dtype], *device, self)

    def __dlpack_device__(self) -> tuple[int, int]:
        """``(DLPack device type, ordinal)``: ``(1, 0)`` on the host (mock), ``(2, n)`` on
        CUDA device ``n``."""
        return self._source.dlpack_device()

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> Any:
        """The host array (mock backend only) for the dtypes NumPy has, without a copy."""
        if self.__dlpack_device__()[0] != KDL_CPU:
            raise TypeError(f"tensor {self.name!r} is in device memory: use .array or DLPack")
        if self.dtype not in _NATIVE_IN_NUMPY:
            raise TypeError(
                f"NumPy has no {self.dtype}: use torch.from_dlpack(view), or view.array for "
                "its bits as unsigned integers"
            )
        if copy:
            raise ValueError("a sealed tensor is viewed in place, never copied")
        arr = self.array
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def __repr__(self) -> str:
        state = " deallocated" if self._buffer.freed else ""
        return f"<TensorView {self.name!r} {self.dtype}{list(self.shape)}{state}>"


@attrs.frozen
class ShardTensorViews:
    """The tensors of one sealed shard's buffer (what :meth:`DeviceBuffer.tensors` asks)."""

    buffer: DeviceBuffer
    tensors: TensorMap
    source: TensorSource | None
    backend: str

    def views(self, names: Sequence[str] | None) -> dict[str, Any]:
        """Name -> :class:`TensorView` for ``names`` (default: every tensor, shard order)."""
        if not self.tensors.has_layout:
            raise InvalidInput(
                "this shard's tensor map records no dtypes and shapes (not sealed from a "
                "safetensors file, or sealed before vramcore recorded them): reseal it"
            )
        if self.source is None:
            raise BackendUnavailable(f"backend {self.backend} offers no tensor views")
        wanted = None if names is None else set(_names(names))
        out: dict[str, Any] = {}
        for t in self.tensors:
            if wanted is not None and t.name not in wanted:
                continue
            out[t.name] = self._view(t.name, t.start, t.end, t.dtype, t.shape)
        if wanted is not None and len(out) != len(wanted):
            missing = sorted(wanted - out.keys())
            raise InvalidInput(f"no tensor named {safe_repr(missing[0])} in this shard")
        return out

    def _view(
        self, name: str, start: int, end: int, dtype: str | None, shape: tuple[int, ...] | None
    ) -> TensorView:
        assert dtype is not None
        assert shape is not None
        assert self.source is not None
        if dtype not in DLPACK_DTYPES:
            raise InvalidInput(
                f"tensor {safe_repr(name)} is {dtype}: a sub-byte or unknown dtype has no view"
            )
        bits = DTYPE_BITS[dtype]
        if math.prod(shape) * bits != (end - start) * 8 or end > self.buffer.nbytes:
            # The map is signed and was checked against the header at seal time: reaching
            # here means the record itself is inconsistent, never a user mistake.
            raise IntegrityViolation(
                f"tensor {safe_repr(name)}: {dtype}{list(shape)} does not fill its byte range",
            )
        return TensorView(
            buffer=self.buffer,
            source=self.source,
            name=name,
            offset=start,
            dtype=dtype,
            shape=shape,
            nbytes=end - start,
        )


def _names(names: Sequence[str]) -> list[str]:
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise InvalidInput("names must be a sequence of tensor names")
    return list(names)


def attach_tensor_views(
    buffer: DeviceBuffer, tensors: TensorMap, backend: AllocatorBackend
) -> None:
    """Let ``buffer.tensors()`` answer for the shard just sealed in it (the manager calls it)."""
    if not tensors:
        return
    buffer.attach_tensor_views(
        ShardTensorViews(buffer, tensors, backend.tensor_source(buffer), backend.name)
    )
