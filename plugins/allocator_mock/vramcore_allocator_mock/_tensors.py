"""Tensor views of a mock allocation: NumPy arrays over the mock's (host) memory.

The mock's "VRAM" is host memory, so its views are host views: ``__dlpack_device__`` is
``(kDLCPU, 0)`` whatever device index the mock simulates, and ``torch.from_dlpack`` gives a CPU
tensor sharing the sealed bytes. A flipped bit in the mock's memory
(:meth:`MockBackend.flip_bit`) shows in every view at once, as on a GPU.

Lifetime: the first view pins the allocation (a NumPy array over it), so the mock never hands
its memory to another allocation while a view or a tensor made from one may still read it;
after the shard is deallocated every view refuses access.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

from vramcore.backend import KDL_CPU, DeviceBuffer
from vramcore.errors import InvalidInput, NotSealed

__all__ = ["MockTensorSource"]


class _Allocation(Protocol):
    """What a view needs of the mock's allocation record: its memory."""

    @property
    def view(self) -> memoryview: ...


class MockTensorSource:
    """The mock's :class:`vramcore.backend.TensorSource` for one allocation."""

    __slots__ = ("_alloc", "_base", "_buf", "_lock")

    def __init__(self, buf: DeviceBuffer, alloc: _Allocation) -> None:
        self._buf = buf
        self._alloc = alloc
        self._base: Any = None  # a uint8 NumPy array over the allocation, made on first use
        self._lock = threading.Lock()

    def _pinned(self) -> Any:
        if self._buf.freed:
            raise NotSealed("this shard was deallocated; its tensors can no longer be viewed")
        with self._lock:
            if self._base is None:
                import numpy as np

                self._base = np.frombuffer(self._alloc.view, dtype=np.uint8)
            return self._base

    def dlpack_device(self) -> tuple[int, int]:
        """``(kDLCPU, 0)``: the mock's memory is host memory."""
        return (KDL_CPU, 0)

    def address(self) -> int:
        """The allocation's host address (for DLPack; never shown)."""
        return int(self._pinned().ctypes.data)

    def array(self, offset: int, dtype: str, shape: tuple[int, ...]) -> Any:
        """A NumPy view of ``shape`` and ``dtype`` at byte ``offset``, no copy."""
        import numpy as np

        base = self._pinned()
        dt = np.dtype(dtype)
        count = 1
        for n in shape:
            count *= n
        if offset < 0 or offset + count * dt.itemsize > base.nbytes:
            raise InvalidInput("the view would reach past the end of the allocation")
        return np.ndarray(shape, dtype=dt, buffer=base, offset=offset)
