"""A DLPack export of a shard, which PyCUDA itself does not offer.

``torch.from_dlpack``, ``cupy.from_dlpack``, ``jax.dlpack.from_dlpack`` and NumPy (for host
memory) take any object with ``__dlpack__`` and ``__dlpack_device__``. :func:`export` builds
the legacy ``"dltensor"`` capsule (DLPack 0.x ABI, which every consumer accepts, also when it
asks for a newer ``max_version``): a 1-D ``uint8`` tensor over the shard's bytes, no copy.

Lifetime: the capsule keeps ``owner`` (the shard object) alive until the consumer calls the
deleter, or until the capsule is collected unconsumed. Like every view of a shard, the tensor
is valid only until the shard is deallocated.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

__all__ = ["KDL_CPU", "KDL_CUDA", "export", "live_exports"]

#: DLDeviceType values.
KDL_CPU = 1
KDL_CUDA = 2
_KDL_UINT = 1
_NAME = b"dltensor"


class _DLDevice(ctypes.Structure):
    _fields_ = (("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32))


class _DLDataType(ctypes.Structure):
    _fields_ = (("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16))


class _DLTensor(ctypes.Structure):
    _fields_ = (
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    )


class _DLManagedTensor(ctypes.Structure):
    pass


_Deleter = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))
_DLManagedTensor._fields_ = (
    ("dl_tensor", _DLTensor),
    ("manager_ctx", ctypes.c_void_p),
    ("deleter", _Deleter),
)

# Exports alive, by the address of their DLManagedTensor: the struct, its shape array and the
# owner stay referenced here until the deleter runs.
_LIVE: dict[int, tuple[Any, ...]] = {}
_LOCK = threading.Lock()


def _release(managed: Any) -> None:
    with _LOCK:
        _LIVE.pop(ctypes.addressof(managed.contents), None)


_deleter: Any = _Deleter(_release)

_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)
# The destructor gets a capsule whose reference count is already zero: it must see a raw
# pointer, never a Python object (taking a reference there would free the capsule twice).
_capsule_is_valid: Any = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p)(
    ("PyCapsule_IsValid", ctypes.pythonapi)
)
_capsule_get: Any = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi)
)


def _destroy_capsule(capsule: int | None) -> None:
    # A consumer renames the capsule ("used_dltensor") and owns the deleter from then on;
    # an unconsumed capsule still named "dltensor" releases its export here.
    if capsule and _capsule_is_valid(capsule, _NAME):
        managed = ctypes.cast(_capsule_get(capsule, _NAME), ctypes.POINTER(_DLManagedTensor))
        managed.contents.deleter(managed)


_capsule_destructor: Any = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(_destroy_capsule)


def export(address: int, nbytes: int, device_type: int, device_id: int, owner: object) -> Any:
    """A ``"dltensor"`` capsule over ``nbytes`` bytes at ``address`` (1-D ``uint8``)."""
    shape = (ctypes.c_int64 * 1)(nbytes)
    managed = _DLManagedTensor()
    managed.dl_tensor.data = address
    managed.dl_tensor.device = _DLDevice(device_type, device_id)
    managed.dl_tensor.ndim = 1
    managed.dl_tensor.dtype = _DLDataType(_KDL_UINT, 8, 1)
    managed.dl_tensor.shape = shape
    managed.dl_tensor.strides = None  # compact row-major
    managed.dl_tensor.byte_offset = 0
    managed.manager_ctx = None
    managed.deleter = _deleter
    key = ctypes.addressof(managed)
    with _LOCK:
        _LIVE[key] = (managed, shape, owner)
    destructor = ctypes.cast(_capsule_destructor, ctypes.c_void_p).value
    return _capsule_new(key, _NAME, destructor)


def live_exports() -> int:
    """How many exports have not been released yet (tests read it)."""
    with _LOCK:
        return len(_LIVE)
