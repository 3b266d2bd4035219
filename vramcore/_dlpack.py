"""DLPack export through ctypes: the one definition of the DLPack structures in vramcore.

``torch.from_dlpack``, ``cupy.from_dlpack``, ``jax.dlpack.from_dlpack`` and NumPy (for host
memory) take any object with ``__dlpack__`` and ``__dlpack_device__``. :func:`export` builds
the legacy ``"dltensor"`` capsule (the DLPack 0.x ABI, which every consumer accepts, also when
it asks for a newer ``max_version``) over memory someone else owns, with any DLPack dtype:
NumPy and CuPy cannot export BF16 or the 8-bit floats themselves, this can.

Lifetime: the capsule keeps ``owner`` alive until the consumer calls the deleter, or until the
capsule is collected unconsumed. The memory stays valid only as long as its allocation does
(for a shard: until it is deallocated).
"""

from __future__ import annotations

import atexit
import ctypes
import threading
from collections.abc import Sequence
from typing import Any

import attrs

__all__ = [
    "KDL_CPU",
    "KDL_CUDA",
    "DLDataType",
    "capsule_tensor",
    "export",
    "live_exports",
]

#: DLDeviceType values.
KDL_CPU = 1
KDL_CUDA = 2

_NAME = b"dltensor"


@attrs.frozen
class DLDataType:
    """A DLPack dtype: type code (``kDLFloat`` = 2, ``kDLBfloat`` = 4...), bits, lanes."""

    code: int
    bits: int
    lanes: int = 1


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
    try:
        with _LOCK:
            _LIVE.pop(ctypes.addressof(managed.contents), None)
    except Exception:  # noqa: S110 - late in interpreter shutdown: nothing left to release
        pass


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
    try:
        if capsule and _capsule_is_valid(capsule, _NAME):
            managed = ctypes.cast(_capsule_get(capsule, _NAME), ctypes.POINTER(_DLManagedTensor))
            if managed.contents.deleter:  # NULL once the interpreter shuts down
                managed.contents.deleter(managed)
    except Exception:  # noqa: S110 - late in interpreter shutdown: nothing left to release
        pass


_capsule_destructor: Any = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(_destroy_capsule)

# The two C entry points above are called by consumers (a torch tensor, a capsule) that may
# outlive this module's globals at interpreter shutdown: they are never freed.
for _thunk in (_deleter, _capsule_destructor):
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(_thunk))


@atexit.register
def _at_exit() -> None:
    """Before the interpreter tears modules down: a tensor a consumer frees later must neither
    call back into Python nor read freed memory, so every live export keeps its memory for
    good (a leak at exit only) and its deleter becomes NULL, which DLPack consumers skip."""
    with _LOCK:
        for managed, *_ in _LIVE.values():
            managed.deleter = _Deleter()
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(_LIVE))


def export(
    address: int,
    shape: Sequence[int],
    dtype: DLDataType,
    device_type: int,
    device_id: int,
    owner: object,
) -> Any:
    """A ``"dltensor"`` capsule over the compact row-major tensor at ``address``.

    :param address: the first element's address (host or device).
    :param shape: the tensor's shape (``()`` for a scalar).
    :param dtype: its DLPack dtype.
    :param device_type: :data:`KDL_CPU` or :data:`KDL_CUDA`.
    :param device_id: the device ordinal (0 for the host).
    :param owner: kept alive as long as the export is.
    """
    dims = (ctypes.c_int64 * max(len(shape), 1))(*shape)
    managed = _DLManagedTensor()
    managed.dl_tensor.data = address
    managed.dl_tensor.device = _DLDevice(device_type, device_id)
    managed.dl_tensor.ndim = len(shape)
    managed.dl_tensor.dtype = _DLDataType(dtype.code, dtype.bits, dtype.lanes)
    managed.dl_tensor.shape = dims
    managed.dl_tensor.strides = None  # compact row-major
    managed.dl_tensor.byte_offset = 0
    managed.manager_ctx = None
    managed.deleter = _deleter
    key = ctypes.addressof(managed)
    with _LOCK:
        _LIVE[key] = (managed, dims, owner)
    destructor = ctypes.cast(_capsule_destructor, ctypes.c_void_p).value
    return _capsule_new(key, _NAME, destructor)


def live_exports() -> int:
    """How many exports have not been released yet (tests read it)."""
    with _LOCK:
        return len(_LIVE)


def capsule_tensor(capsule: Any) -> Any:
    """The ``DLTensor`` inside an unconsumed ``"dltensor"`` capsule (for tests and debugging:
    ``.data``, ``.device``, ``.ndim``, ``.dtype``, ``.shape[i]``). Keep the capsule alive while
    reading it."""
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype = ctypes.c_void_p
    get.argtypes = (ctypes.py_object, ctypes.c_char_p)
    managed = ctypes.cast(get(capsule, _NAME), ctypes.POINTER(_DLManagedTensor))
    return managed.contents.dl_tensor
