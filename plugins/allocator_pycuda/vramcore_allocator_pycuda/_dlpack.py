"""A DLPack export of a whole shard, which PyCUDA itself does not offer.

``torch.from_dlpack``, ``cupy.from_dlpack``, ``jax.dlpack.from_dlpack`` and NumPy (for host
memory) take any object with ``__dlpack__`` and ``__dlpack_device__``. :func:`export` builds
the legacy ``"dltensor"`` capsule through the core's one definition of the DLPack structures
(:func:`vramcore.backend.dlpack_export`): a 1-D ``uint8`` tensor over the shard's bytes, no
copy. Per-tensor views with their own dtypes are ``DeviceBuffer.tensors()``.

Lifetime: the capsule keeps ``owner`` (the shard object) alive until the consumer calls the
deleter, or until the capsule is collected unconsumed. Like every view of a shard, the tensor
is valid only until the shard is deallocated.
"""

from __future__ import annotations

from typing import Any

from vramcore.backend import KDL_CPU, KDL_CUDA, DLDataType, dlpack_export
from vramcore.backend import dlpack_live_exports as live_exports

__all__ = ["KDL_CPU", "KDL_CUDA", "export", "live_exports"]

_UINT8 = DLDataType(code=1, bits=8)  # kDLUInt


def export(address: int, nbytes: int, device_type: int, device_id: int, owner: object) -> Any:
    """A ``"dltensor"`` capsule over ``nbytes`` bytes at ``address`` (1-D ``uint8``)."""
    return dlpack_export(address, (nbytes,), _UINT8, device_type, device_id, owner)
