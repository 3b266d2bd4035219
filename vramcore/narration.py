"""Operations the manager narrates through the ``vramcore_operation`` wrapper hook.

Each manager step (seal, verify, allocate, copy, digest, deallocate) runs as
``pm.hook.vramcore_operation(op=Operation(...))``. The core's own implementation (registered
``trylast``) runs the step; plugins wrap it (``@hookimpl(wrapper=True)``) to time, trace or
log it without the core knowing them. Steps nest: a seal's allocate/copy/digest operations run
inside the seal operation, so wrappers see the nesting through their own context (a span stack).

An :class:`Operation` carries only public facts in :attr:`Operation.attributes` (shard id,
device, byte counts, backend, outcome); the manager never puts a secret, a pointer or shard
bytes there.

Wrappers observe; they never decide. :func:`perform` runs an operation through the hook and
then takes the outcome from the operation itself, not from what the hook chain returned: an
exception the step raised is raised again even if a wrapper swallowed it (or replaced it), a
wrapper cannot replace the step's result, and a wrapper that never lets the step run fails the
operation. A wrapper raising around a step that succeeded fails the operation too. So a buggy
or hostile narration plugin cannot turn a failed verification into a pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from vramcore._context import current_correlation_id
from vramcore.errors import VramError

__all__ = ["OPERATION_NAMES", "AttributeValue", "Operation", "perform"]

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

    __slots__ = (
        "_error",
        "_ran",
        "_result",
        "_run",
        "attributes",
        "correlation_id",
        "name",
        "started",
    )

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
        self._ran = False
        self._result: Any = None
        self._error: BaseException | None = None

    def run(self) -> Any:
        """Perform the step (called by the core's hook implementation, once).

        Sets ``attributes["outcome"]`` (``"ok"``, or ``"error"`` with ``error_type``) unless
        the step set it. A second call raises :class:`~vramcore.errors.VramError`.
        """
        if self._ran:
            raise VramError(f"the {self.name} step was run twice by a vramcore_operation hook")
        self._ran = True
        try:
            self._result = self._run(self)
        except BaseException as exc:
            self._error = exc
            self.attributes.setdefault("outcome", "error")
            self.attributes["error_type"] = type(exc).__name__
            raise
        self.attributes.setdefault("outcome", "ok")
        return self._result

    def __repr__(self) -> str:
        return f"<Operation {self.name} {self.attributes}>"


def perform(hook: Any, name: str, step: Callable[[Operation], Any], **attributes: Any) -> Any:
    """Run ``step`` as operation ``name`` through ``hook.vramcore_operation``; fail closed.

    :param hook: the plugin manager's hook relay.
    :return: what ``step`` returned, whatever the wrappers returned.
    :raises: what ``step`` raised, whatever the wrappers did with it; what a wrapper raised
        around a step that succeeded (the caller must undo the step's effects: the operation
        failed); :class:`~vramcore.errors.VramError` when a wrapper kept the step from
        running.
    """
    op = Operation(name, step, **attributes)
    try:
        hook.vramcore_operation(op=op)
    except BaseException as exc:
        if op._error is not None:  # the step's own error, not what a wrapper made of it
            raise op._error from op._error.__cause__
        if not op._ran and isinstance(exc, Exception) and not isinstance(exc, VramError):
            raise VramError(
                f"a vramcore_operation wrapper failed before the {name} step ran "
                f"({type(exc).__name__}); the operation failed closed"
            ) from exc
        raise  # a wrapper failed around a step that succeeded: the operation fails (closed)
    if op._error is not None:  # a wrapper swallowed the step's exception
        raise op._error
    if not op._ran:
        raise VramError(
            f"a vramcore_operation wrapper did not let the {name} step run; the operation "
            "failed closed (check the narration plugins: a wrapper must yield exactly once)"
        )
    return op._result
