"""Tensor views of a cupy-backend allocation (what ``DeviceBuffer.tensors()`` builds on).

The core's :class:`vramcore.TensorView` takes the dtype and shape from the sealed tensor map
and exports DLPack itself (with BF16's and the 8-bit floats' own codes, which CuPy cannot
export); this source tells it where the allocation is and makes the CuPy arrays
(``view.array``). Every access after the shard was freed raises ``NotSealed``.
"""

from __future__ import annotations

from typing import Any

from vramcore.backend import KDL_CUDA
from vramcore.errors import NotSealed
from vramcore_allocator_cupy._memory import AllocationRecord, ByteReader, DeviceMemory

__all__ = ["CupyTensorSource"]


class CupyTensorSource:
    """The cupy backend's :class:`vramcore.backend.TensorSource` for one allocation."""

    __slots__ = ("_memory", "_rec")

    def __init__(self, backend: ByteReader, rec: AllocationRecord) -> None:
        self._rec = rec
        self._memory = DeviceMemory(backend, rec)

    def dlpack_device(self) -> tuple[int, int]:
        """``(kDLCUDA, device)``."""
        return (KDL_CUDA, self._rec.device)

    def address(self) -> int:
        """The allocation's device address (for DLPack; never shown)."""
        if self._rec.freed:
            raise NotSealed("this shard was deallocated; its tensors can no longer be viewed")
        return self._rec.ptr

    def array(self, offset: int, dtype: str, shape: tuple[int, ...]) -> Any:
        """A ``cupy.ndarray`` of ``dtype`` and ``shape`` at byte ``offset``, no copy."""
        self.address()
        return self._memory.array(dtype, offset=offset, shape=shape)
