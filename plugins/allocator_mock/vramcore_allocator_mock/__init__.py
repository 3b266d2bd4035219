"""vramcore-allocator-mock: host memory standing in for VRAM, with fault injection.

The mock behaves like a device where it matters to vramcore: allocations are bounded by a
per-device capacity, copies are bounds-checked, a freed buffer cannot be used again, and it
reports :class:`~vramcore.backend.DeviceInfo` with the policy flags. It also lets tests break
things on purpose: flip bits in a live allocation, fail the next allocation, copy, copy
completion, read, free or digest, poison the device with a sticky error, make a device look
integrated or ATS-capable, hand out managed memory.

By default it is kinder than a GPU (zeroed memory, synchronous copies, usable after
``close()``); options make it as strict as one: asynchronous copies that read the host
buffer only when they complete, garbage in fresh memory, strict close, sticky errors, an
opaque ``DeviceBuffer.native``, and a mock device-side digest. It passes
:class:`vramcore.testing.BackendContract` in every configuration.

Configuration (when built from the entry point, :meth:`MockBackend.from_env`):

``VRAMCORE_MOCK_DEVICES``
    Number of devices (default 1).
``VRAMCORE_MOCK_VRAM``
    Capacity per device: ``24GiB``, ``512MiB``, ``1000000`` (bytes), or ``2x24GiB``, which
    also sets the device count (default ``1x24GiB``).
``VRAMCORE_MOCK_FAITHFUL``
    ``1``: asynchronous copies, uninitialised memory, strict close and opaque native at once.
``VRAMCORE_MOCK_ASYNC``, ``VRAMCORE_MOCK_UNINITIALISED``, ``VRAMCORE_MOCK_STRICT_CLOSE``,
``VRAMCORE_MOCK_STICKY_ERRORS``, ``VRAMCORE_MOCK_DEVICE_DIGEST``, ``VRAMCORE_MOCK_OPAQUE_NATIVE``
    ``1``/``0``: one option each (they override ``VRAMCORE_MOCK_FAITHFUL``).
``VRAMCORE_MOCK_COPY_DELAY``
    Seconds after which an asynchronous copy nobody waited for completes (default 0.005).
``VRAMCORE_MOCK_FAIL``
    ``OP:N[,OP:N...]``: the ``N``-th call of ``OP`` (``allocate``, ``copy``, ``wait``,
    ``read``, ``free``, ``digest``) fails once, e.g. ``read:3,free:1``.

Capacity is bookkeeping: the host memory used is what is allocated, not the capacity.
"""

from __future__ import annotations

from collections.abc import Sequence

from vramcore import Setting
from vramcore.backend import AllocatorBackend, BackendSpec, DeviceBuffer, DeviceDigest
from vramcore.hookspecs import hookimpl
from vramcore_allocator_mock._backend import (
    BackendClosed,
    DevicePoisoned,
    MockBackend,
    MockDeviceArray,
)
from vramcore_allocator_mock._config import parse_vram
from vramcore_allocator_mock._copies import MockCopyHandle

__all__ = [
    "BackendClosed",
    "DevicePoisoned",
    "MockBackend",
    "MockCopyHandle",
    "MockDeviceArray",
    "parse_vram",
    "vramcore_allocator_backends",
    "vramcore_device_digest",
]

__version__ = "0.1.0"


@hookimpl
def vramcore_allocator_backends() -> Sequence[BackendSpec]:
    """Offer the ``mock`` backend: host memory, so it is used only when named."""
    return [
        BackendSpec(
            name="mock",
            priority=-100,
            probe=lambda: None,
            factory=MockBackend.from_env,
            install_hint=(
                "from a clone of the vramcore repository: pip install ./plugins/allocator_mock"
            ),
            description="host memory standing in for VRAM (tests, demos); fault injection",
            host_memory=True,
        )
    ]


@hookimpl
def vramcore_device_digest(
    backend: AllocatorBackend,
    buffer: DeviceBuffer,
    leaf_size: int,
    leaf_range: tuple[int, int] | None,
) -> DeviceDigest | None:
    """Digest a mock buffer "on the device" when its backend has ``device_digest=True``.

    Computed from the mock's memory with :mod:`vramcore.digest` (after pending copies land),
    honouring leaf ranges, so the core's device-digest path runs without a GPU. ``None``
    (the core hashes on the host) for any other backend.
    """
    if not isinstance(backend, MockBackend) or not backend.device_digest:
        return None
    return backend.digest(buffer, leaf_size, leaf_range)


@hookimpl
def vramcore_settings() -> Sequence[Setting]:
    """The mock's ``VRAMCORE_MOCK_*`` settings (see the module docstring)."""
    switch = "one GPU-like behaviour, overriding mock_faithful"
    return [
        Setting(
            key="mock_devices",
            help="number of mock devices",
            kind="int",
            minimum=1,
            maximum=1024,
            default="1",
        ),
        Setting(
            key="mock_vram",
            help="capacity per mock device: 24GiB, 512MiB or 2x24GiB",
            default="24GiB",
        ),
        Setting(
            key="mock_faithful",
            help="asynchronous copies, uninitialised memory, strict "
            "close and opaque native at once",
            kind="bool",
            default="false",
        ),
        Setting(
            key="mock_async", help=f"asynchronous copies ({switch})", kind="bool", default="false"
        ),
        Setting(
            key="mock_uninitialised",
            help=f"garbage in fresh memory ({switch})",
            kind="bool",
            default="false",
        ),
        Setting(
            key="mock_strict_close",
            help=f"unusable after close ({switch})",
            kind="bool",
            default="false",
        ),
        Setting(
            key="mock_sticky_errors",
            help=f"an injected fault poisons the device ({switch})",
            kind="bool",
            default="false",
        ),
        Setting(
            key="mock_device_digest",
            help=f"a mock device-side digest ({switch})",
            kind="bool",
            default="false",
        ),
        Setting(
            key="mock_opaque_native",
            help=f"an opaque DeviceBuffer.native ({switch})",
            kind="bool",
            default="false",
        ),
        Setting(
            key="mock_copy_delay",
            help="seconds after which an unwaited asynchronous copy completes",
            default="0.005",
        ),
        Setting(
            key="mock_fail",
            help="OP:N[,OP:N...]: the N-th call of OP fails once (e.g. read:3,free:1)",
            default="no injected faults",
        ),
    ]
