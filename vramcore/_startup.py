"""What a manager does once, when it starts: choose the backend and probe it (the seal key
comes from :mod:`vramcore._keyproviders`).

Each answer a plugin gives here is checked before it is used; a wrong one is a
:class:`~vramcore.errors.ConfigError` naming the plugins that implement the hook.
"""

from __future__ import annotations

from typing import Any

from vramcore._hookutil import implementers
from vramcore.backend import AllocatorBackend, DeviceInfo
from vramcore.errors import ConfigError, InvalidInput
from vramcore.plugins import select_backend
from vramcore.validation import check_device_index

__all__ = ["make_backend", "probe"]


def make_backend(pm: Any, allocator: str | AllocatorBackend | None) -> AllocatorBackend:
    """The backend ``allocator`` names (or is), else the selection's choice.

    :raises InvalidInput: ``allocator`` is neither a name nor a backend.
    :raises BackendUnavailable: no such backend, or it cannot run here.
    :raises ConfigError: the plugin's factory built something that is not a backend.
    """
    if isinstance(allocator, AllocatorBackend):
        return allocator
    if allocator is not None and not isinstance(allocator, str):
        raise InvalidInput("allocator must be a backend name or an AllocatorBackend")
    backend = select_backend(pm, allocator).factory()
    if not isinstance(backend, AllocatorBackend):
        raise ConfigError(
            f"the allocator plugin ({implementers(pm.hook.vramcore_allocator_backends)}) "
            f"built a {type(backend).__name__}, not an AllocatorBackend"
        )
    return backend


def probe(hook: Any, backend: AllocatorBackend, device: int) -> tuple[int, DeviceInfo]:
    """The checked device index and its probe record.

    :raises InvalidInput: there is no such device.
    :raises ConfigError: the probe answered with something other than ``DeviceInfo`` records.
    """
    devices = hook.vramcore_probe_devices(backend=backend)
    if not isinstance(devices, list | tuple) or not all(isinstance(d, DeviceInfo) for d in devices):
        raise ConfigError(
            f"the device probe ({implementers(hook.vramcore_probe_devices)}) returned "
            f"{type(devices).__name__}, not a list of DeviceInfo"
        )
    index = check_device_index(device, len(devices))
    return index, devices[index]
