"""Tensor views of a PyCUDA-backend shard (what ``DeviceBuffer.tensors()`` builds on).

The core's :class:`vramcore.TensorView` takes the dtype and shape from the sealed tensor map
and exports DLPack itself (PyCUDA has no DLPack export; BF16 and the 8-bit floats keep their
own DLPack codes); this source tells it where the shard is and makes the ``GPUArray`` views
(``view.array``). Every access after the shard was deallocated raises ``NotSealed``.
"""

from __future__ import annotations

from typing import Any

from vramcore.backend import KDL_CUDA
from vramcore.errors import InvalidInput, NotSealed

from ._native import PyCudaShard

__all__ = ["PyCudaTensorSource"]


class PyCudaTensorSource:
    """The PyCUDA backend's :class:`vramcore.backend.TensorSource` for one shard."""

    __slots__ = ("_shard",)

    def __init__(self, shard: PyCudaShard) -> None:
        self._shard = shard

    def dlpack_device(self) -> tuple[int, int]:
        """``(kDLCUDA, device)``."""
        return (KDL_CUDA, self._shard.device)

    def address(self) -> int:
        """The shard's device address (for DLPack; never shown)."""
        try:
            return int(self._shard.allocation)
        except InvalidInput:
            raise NotSealed(
                "this shard was deallocated; its tensors can no longer be viewed"
            ) from None

    def array(self, offset: int, dtype: str, shape: tuple[int, ...]) -> Any:
        """A ``pycuda.gpuarray.GPUArray`` of ``dtype`` and ``shape`` at byte ``offset``."""
        self.address()
        return self._shard.gpuarray(dtype, shape=shape, offset=offset)
