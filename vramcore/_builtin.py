"""The core's own hook implementations: the defaults every plugin manager starts with.

Registered ``trylast`` so that any plugin's implementation of a firstresult hook wins.
"""

from __future__ import annotations

from collections.abc import Sequence

from vramcore._config import Setting, core_settings
from vramcore.backend import AllocatorBackend, DeviceInfo
from vramcore.hookspecs import hookimpl
from vramcore.narration import Operation


@hookimpl(trylast=True)
def vramcore_probe_devices(backend: AllocatorBackend) -> Sequence[DeviceInfo]:
    """Ask the backend itself."""
    return backend.devices()


@hookimpl(trylast=True)
def vramcore_operation(op: Operation) -> object:
    """Run the step."""
    return op.run()


@hookimpl(trylast=True)
def vramcore_settings() -> Sequence[Setting]:
    """The core's own settings (token, allocator, plugin selection, hashing threads...)."""
    return core_settings()
