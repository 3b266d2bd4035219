"""PyCUDA contexts that behave in a host application: adopt, retain, push and always pop.

PyCUDA binds contexts to threads: a context is current only on the thread that pushed it,
and PyCUDA refuses to activate, for a free or a destructor, a context created on another
thread unless it is already current. So the backend never relies on whatever is current:
every operation pushes the device's context on the calling thread and pops it when done
(:func:`activated`), leaving the thread's context stack as it found it.

Which context: the one the application had current on the thread that built the backend,
when it belongs to that device (an integrator running its own PyCUDA context shares
allocations with vramcore), else the device's primary context, which CuPy, PyTorch and the
CUDA runtime also use. A primary context is retained once per process and kept, as the CUDA
runtime does: releasing it while another library uses it would destroy their memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from vramcore.errors import AllocationFailed
from vramcore.validation import scrub_text

from ._api import DriverApi

__all__ = ["activated", "current_context_device", "primary_context"]


def primary_context(api: DriverApi, ordinal: int) -> Any:
    """The device's primary context, retained once for the whole process."""
    with api.lock:
        ctx = api.primary.get(ordinal)
        if ctx is None:
            try:
                ctx = api.driver.Device(ordinal).retain_primary_context()
            except api.driver.Error as exc:
                raise AllocationFailed(
                    f"cannot retain the primary CUDA context of GPU {ordinal}: "
                    f"{scrub_text(str(exc))[:200]}"
                ) from None
            api.primary[ordinal] = ctx
        return ctx


def current_context_device(api: DriverApi, count: int) -> tuple[Any, int] | None:
    """``(context, ordinal)`` of the context current on this thread through PyCUDA, if any."""
    drv = api.driver
    ctx = drv.Context.get_current()
    if ctx is None:
        return None
    device = drv.Context.get_device()
    for ordinal in range(count):
        if drv.Device(ordinal) == device:
            return ctx, ordinal
    return None


@contextlib.contextmanager
def activated(api: DriverApi, ctx: Any, device: int) -> Iterator[None]:
    """Make ``ctx`` current on this thread for the block; pop it afterwards, whatever happens."""
    drv = api.driver
    try:
        ctx.push()
    except drv.Error as exc:
        raise AllocationFailed(
            f"cannot make the CUDA context of GPU {device} current: {scrub_text(str(exc))[:200]}"
        ) from None
    try:
        yield
    finally:
        drv.Context.pop()
