"""vramcore-allocator-pycuda: real VRAM for vramcore through PyCUDA.

The ``pycuda`` backend gives integrators who already run PyCUDA the guarantees the CuPy
backend gives, proven by the same :class:`vramcore.testing.BackendContract` suite:

* **contexts** -- the application's current PyCUDA context for a device when it has one on
  the thread that builds the backend, else the device's primary context (shared with CuPy,
  PyTorch and the CUDA runtime); every call pushes it on the calling thread and pops it
  again, so the backend works from any thread and never leaves a context pushed;
* **memory** -- ``mem_alloc`` (plain device memory; the pointer type is checked with
  ``cuPointerGetAttribute``), frees that return memory at once, nothing leaked on failure;
* **copies** -- pinned, portable staging buffers lent to the core and reused; a copy from
  them runs on a stream and returns an event as its completion handle; other host memory
  is copied synchronously;
* **digest** -- the shared ``rfc6962-sha256`` kernels (:mod:`vramcore.kernels`), compiled by
  NVRTC or taken from the shipped PTX (no ``nvcc``) and loaded with ``module_from_buffer``
  once per device context, giving the host's root and leaves; a sampled check's leaves in
  one launch; any failure is a :class:`PyCudaDigestUnavailable` (the core hashes on the host);
* **probe** -- device attributes (integrated, managed, pageable access through HMM/ATS,
  ECC), UUID and PCI id, plus NVML's ECC error count with the ``nvml`` extra;
* **inference** -- ``VramManager.verified(shard)`` yields a buffer whose ``native`` is a
  :class:`PyCudaShard`: the ``DeviceAllocation``, ``GPUArray`` views, the CUDA Array
  Interface and a DLPack export, all without a copy.

Without PyCUDA, or without a driver, the plugin still loads: the backend reports itself not
viable with the reason (``vramcore plugins``), and nothing here imports PyCUDA until then.
"""

from __future__ import annotations

from collections.abc import Sequence

from vramcore import Setting
from vramcore.backend import AllocatorBackend, BackendSpec, DeviceBuffer, DeviceDigest
from vramcore.hookspecs import hookimpl

from ._api import INSTALL_HINT, DriverApi, diagnose, unavailable_reason
from ._backend import PyCudaBackend
from ._kernels import PyCudaDigestUnavailable
from ._native import PyCudaShard

__all__ = [
    "PRIORITY",
    "DriverApi",
    "PyCudaBackend",
    "PyCudaDigestUnavailable",
    "PyCudaShard",
    "diagnose",
    "make_backend",
    "unavailable_reason",
    "vramcore_allocator_backends",
    "vramcore_device_digest",
]

__version__ = "0.1.0"

#: Selection priority when no backend is named: above the mock, below CuPy (which needs no
#: PyCUDA of its own, and its digest kernels load the same way).
PRIORITY = 50


def make_backend() -> PyCudaBackend:
    """The backend on this machine's PyCUDA (what the ``pycuda`` spec's factory builds).

    :raises vramcore.errors.BackendUnavailable: PyCUDA or the driver cannot run here.
    """
    return PyCudaBackend()


@hookimpl
def vramcore_allocator_backends() -> Sequence[BackendSpec]:
    """Offer the ``pycuda`` backend; its probe says why it cannot run (no PyCUDA, no driver)."""
    return [
        BackendSpec(
            name="pycuda",
            priority=PRIORITY,
            probe=unavailable_reason,
            factory=make_backend,
            install_hint=INSTALL_HINT,
            diagnose=diagnose,
            description="CUDA device memory through PyCUDA; digest on the GPU (NVRTC, shipped PTX)",
        )
    ]


@hookimpl
def vramcore_device_digest(
    backend: AllocatorBackend,
    buffer: DeviceBuffer,
    leaf_size: int,
    leaf_range: tuple[int, int] | None,
    leaf_indices: Sequence[int] | None,
) -> DeviceDigest | None:
    """Digest ``buffer`` on the GPU when ``backend`` is a :class:`PyCudaBackend`; else defer.

    :raises PyCudaDigestUnavailable: the kernels cannot run on the GPU this time.
    """
    if not isinstance(backend, PyCudaBackend):
        return None
    return backend.device_digest(buffer, leaf_size, leaf_range, leaf_indices)


@hookimpl
def vramcore_settings() -> Sequence[Setting]:
    """``VRAMCORE_NVRTC``."""
    return [
        Setting(
            key="nvrtc",
            help="libnvrtc.so that compiles the device digest kernels (both GPU backends; "
            "no nvcc is used)",
            kind="path",
            default="the nvidia-cuda-nvrtc wheel's, then the system's; else the shipped PTX",
        ),
    ]
