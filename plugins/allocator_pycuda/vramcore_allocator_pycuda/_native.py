"""What inference code gets from ``VramManager.verified(shard)`` on the PyCUDA backend."""

from __future__ import annotations

from typing import Any

from vramcore.errors import InvalidInput

from ._dlpack import KDL_CUDA, export

__all__ = ["PyCudaShard"]


class PyCudaShard:
    """A sealed shard's device memory, as PyCUDA code uses it.

    * :attr:`allocation` -- the ``pycuda.driver.DeviceAllocation`` (pass it to kernels);
    * :meth:`gpuarray` -- a ``pycuda.gpuarray.GPUArray`` view of a byte range, any dtype;
    * ``__cuda_array_interface__`` -- the bytes as a ``uint8`` vector, which CuPy, PyTorch
      (``torch.as_tensor(shard, device="cuda")``) and Numba take without a copy;
    * ``__dlpack__`` / ``__dlpack_device__`` -- the same vector for ``torch.from_dlpack``,
      ``cupy.from_dlpack`` or JAX (PyCUDA has no DLPack export of its own; this one is built
      here, with no copy).

    The views share the allocation: they are valid until the shard is deallocated, after
    which every accessor raises. Its repr shows the device and size, never the address.
    """

    __slots__ = ("_allocation", "_gpuarray", "_released", "device", "nbytes")

    def __init__(self, allocation: Any, nbytes: int, device: int, gpuarray: Any = None) -> None:
        self._allocation = allocation
        self._gpuarray = gpuarray
        self._released = False
        self.nbytes = nbytes
        self.device = device

    def _live(self) -> Any:
        if self._released:
            raise InvalidInput("this shard's device memory was deallocated")
        return self._allocation

    @property
    def allocation(self) -> Any:
        """The ``DeviceAllocation`` holding the shard (raises once deallocated)."""
        return self._live()

    def gpuarray(
        self, dtype: Any = "uint8", shape: tuple[int, ...] | None = None, offset: int = 0
    ) -> Any:
        """A ``GPUArray`` view of the bytes from ``offset``; the shape defaults to all of them.

        :raises InvalidInput: the view would reach past the shard, or it was deallocated.
        """
        alloc = self._live()
        if self._gpuarray is None:
            raise InvalidInput("pycuda.gpuarray is not available in this PyCUDA installation")
        import numpy as np

        dt = np.dtype(dtype)
        if shape is None:
            shape = ((self.nbytes - offset) // dt.itemsize,)
        count = 1
        for n in shape:
            count *= n
        if offset < 0 or any(n < 0 for n in shape) or offset + count * dt.itemsize > self.nbytes:
            raise InvalidInput(
                f"a {dt} view of shape {shape} at offset {offset} does not fit in "
                f"the {self.nbytes}-byte shard"
            )
        return self._gpuarray.GPUArray(shape, dt, gpudata=int(alloc) + offset, base=alloc)

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        """The shard as a read-write ``uint8`` vector (CUDA Array Interface, version 3)."""
        alloc = self._live()
        return {
            "shape": (self.nbytes,),
            "typestr": "|u1",
            "data": (int(alloc), False),
            "version": 3,
            "strides": None,
            "stream": None,
        }

    def __dlpack__(
        self,
        *,
        stream: Any = None,
        max_version: Any = None,
        dl_device: Any = None,
        copy: bool | None = None,
    ) -> Any:
        """A DLPack capsule of the shard's bytes (``uint8``, 1-D), never a copy.

        ``stream`` needs no ordering: the shard was verified, no work on it is pending.
        :raises BufferError: a copy or another device was asked for.
        """
        if copy:
            raise BufferError("a shard is exported in place, never copied")
        if dl_device is not None and tuple(dl_device) != self.__dlpack_device__():
            raise BufferError(f"the shard lives on CUDA device {self.device}")
        return export(int(self._live()), self.nbytes, KDL_CUDA, self.device, self)

    def __dlpack_device__(self) -> tuple[int, int]:
        """``(kDLCUDA, device ordinal)``."""
        return (KDL_CUDA, self.device)

    def release(self) -> None:
        """Forget the allocation (the backend calls it when it frees the memory)."""
        self._released = True
        self._allocation = None

    def __repr__(self) -> str:
        state = " deallocated" if self._released else ""
        return f"<PyCudaShard GPU{self.device} {self.nbytes} bytes{state}>"
