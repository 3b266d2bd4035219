"""Operations the manager narrates through the ``vramcore_operation`` wrapper hook.

Each manager step (seal, verify, allocate, copy, digest, deallocate) runs as
``pm.hook.vramcore_operation(op=Operation(...))``. The core's own implementation (registered
``trylast``) runs the step; plugins wrap it (``@hookimpl(wrapper=True)``) to time, trace or
log it without the core knowing them. Steps nest: a seal's allocate/copy/digest operations run
inside the seal operation, so wrappers see the nesting through their own context (a span stack).

An :class:`Operation` carries only public facts in :attr:`Operation.attributes` (shard id,
device, byte counts, backend, outcome); the manager never puts a secret, a pointer or shard
bytes there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from vramcore._context import current_correlation_id

__all__ = ["OPERATION_NAMES", "AttributeValue", "Operation"]

#: The operation names the manager narrates.
OPERATION_NAMES = ("seal", "verify", "allocate", "copy", "digest", "deallocate")

AttributeValue = str | int | float | bool


class Operation:
    """One narrated step.

    :attr name: one of :data:`OPERATION_NAMES`.
    :attr attributes: public facts about the step; the step adds results (``outcome``,
        ``leaf_count``...) before it returns, so a wrapper reads them after ``yield``.
    :attr correlation_id: from :func:`vramcore.correlate`, ``""`` when none.
    :attr started: ``time.perf_counter()`` when the operation object was made.
    """

    __slots__ = ("_run", "attributes", "correlation_id", "name", "started")

    def __init__(
        self, name: str, run: Callable[[Operation], Any], **attributes: AttributeValue
    ) -> None:
        if name not in OPERATION_NAMES:
            raise ValueError(f"unknown operation {name!r}; one of {OPERATION_NAMES}")
        self.name = name
        self._run = run
        self.attributes: dict[str, AttributeValue] = dict(attributes)
        self.correlation_id = current_correlation_id()
        self.started = time.perf_counter()

    def run(self) -> Any:
        """Perform the step (called by the core's hook implementation, once)."""
        return self._run(self)

    def __repr__(self) -> str:
        return f"<Operation {self.name} {self.attributes}>"
