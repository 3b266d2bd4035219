"""vramcore-allocator-cupy: real VRAM through CuPy, with the Merkle digest computed on the GPU.

Registers the allocator backend ``cupy`` (priority 100: chosen over the mock whenever it can
run) and implements the device-digest hook for its buffers, so seals and verifications hash
the weights where they are, without copying them back to the host.

Nothing here imports CuPy at import time: on a machine without CuPy, a driver or a GPU the
plugin loads, and ``vramcore plugins`` / ``vramcore devices`` say why the backend is not
viable (see :func:`why_not`).

Environment: ``VRAMCORE_CUPY_NVML=0`` turns the NVML queries off (on by default when
``nvidia-ml-py`` is installed).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from vramcore import Setting
from vramcore.backend import AllocatorBackend, BackendSpec, DeviceBuffer, DeviceDigest
from vramcore.hookspecs import hookimpl
from vramcore_allocator_cupy._backend import BackendClosed, CupyBackend, CupyDigestUnavailable
from vramcore_allocator_cupy._memory import SAFETENSORS_DTYPES, DeviceMemory
from vramcore_allocator_cupy._nvml import NvmlHealth, nvml_health
from vramcore_allocator_cupy._probe import INSTALL_HINT, device_info, diagnose, why_not

__all__ = [
    "INSTALL_HINT",
    "PRIORITY",
    "SAFETENSORS_DTYPES",
    "BackendClosed",
    "CupyBackend",
    "CupyDigestUnavailable",
    "DeviceMemory",
    "NvmlHealth",
    "device_info",
    "diagnose",
    "nvml_health",
    "vramcore_allocator_backends",
    "vramcore_device_digest",
    "why_not",
]

__version__ = "0.1.0"

#: Above the mock (a real GPU wins whenever one is usable).
PRIORITY = 100


def _factory() -> CupyBackend:
    return CupyBackend(nvml=os.environ.get("VRAMCORE_CUPY_NVML", "1") != "0")


@hookimpl
def vramcore_allocator_backends() -> Sequence[BackendSpec]:
    """Offer the ``cupy`` backend; its probe says why it cannot run, when it cannot."""
    return [
        BackendSpec(
            name="cupy",
            priority=PRIORITY,
            probe=why_not,
            factory=_factory,
            install_hint=INSTALL_HINT,
            diagnose=diagnose,
            description="CUDA GPUs through CuPy: cudaMalloc, pinned staging, device-side digest",
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
    """Digest a cupy buffer on its GPU; defer (``None``) for every other backend.

    :raises CupyDigestUnavailable: the kernels cannot run on the GPU this time (the core
        hashes on the host, with an audited warning).
    """
    if not isinstance(backend, CupyBackend) or buffer.backend != backend.name:
        return None
    return backend.digest(buffer, leaf_size, leaf_range, leaf_indices)


@hookimpl
def vramcore_settings() -> Sequence[Setting]:
    """``VRAMCORE_CUPY_NVML``."""
    return [
        Setting(
            key="cupy_nvml",
            help="query NVML (ECC counters, retired pages, addressing mode) "
            "when nvidia-ml-py is installed",
            kind="bool",
            default="true",
        ),
    ]
