"""Operations the manager narrates through the ``vramcore_operation`` wrapper hook.

Each manager step (seal, verify, allocate, copy, digest, deallocate) runs as
``pm.hook.vramcore_operation(op=Operation(...))``. The core's own implementation (registered
``trylast``) runs the step; plugins wrap it (``@hookimpl(wrapper=True)``) to time, trace or
log it without the core knowing them. Steps nest: a seal's allocate/copy/digest operations run
inside the seal operation, so wrappers see the nesting through their own context (a span stack).

An :class:`Operation` carries only public facts in :attr:`Operation.attributes`, under the
names of :data:`OPERATION_ATTRIBUTES` (shard id, device, byte counts, backend, outcome...);
the core never puts a secret, a pointer or shard bytes there. Narration, audit and the tracing
plugin all take these names from here.

Wrappers observe; they never decide. The step, its result and its error are not on the
operation a wrapper receives: the core keeps them in a record of its own, keyed by the
operation, that nothing handed to a plugin refers to. :func:`perform` runs an operation
through the hook and then takes the outcome from that record, not from what the hook chain
returned: an exception the step raised is raised again even if a wrapper swallowed it (or
replaced it), a wrapper cannot replace the step or its result, and a wrapper that never lets
the step run fails the operation. A wrapper raising around a step that succeeded fails the
operation too. So a buggy or hostile narration plugin cannot turn a failed verification into
a pass. (In-process code that patches the core's private modules is outside what any Python
library can defend against; see the README's threat model.)
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Final

from vramcore._context import current_correlation_id
from vramcore.errors import VramError

__all__ = ["OPERATION_ATTRIBUTES", "OPERATION_NAMES", "AttributeValue", "Operation", "perform"]

#: The operation names the manager narrates.
OPERATION_NAMES: Final = ("seal", "verify", "allocate", "copy", "digest", "deallocate")

#: Every attribute an operation may carry -> the one type its value has. Narration wrappers
#: (the tracing plugin) export exactly these; a name that is not here is never set by the core.
OPERATION_ATTRIBUTES: Final[Mapping[str, type]] = {
    "shard_id": str,  #: the shard the step works on
    "device": int,  #: the device index
    "device_name": str,  #: the device's name
    "nbytes": int,  #: bytes the step covers
    "backend": str,  #: the allocator backend
    "digest_alg": str,  #: ``rfc6962-sha256``
    "leaf_size": int,  #: Merkle leaf size
    "leaf_count": int,  #: leaves hashed (digest) or in the shard (seal)
    "source": str,  #: copy: ``memory`` or ``file``; digest: ``device`` or ``host``
    "cross_check": str,  #: seal: ``sample`` or ``full`` (leaves compared with the staged bytes)
    "mode": str,  #: verify: ``full`` or ``sampled``
    "leaves_checked": int,  #: verify: leaves re-hashed from VRAM and compared
    "outcome": str,  #: ``ok``, ``error`` or ``mismatch``
    "error_type": str,  #: the exception class name when the outcome is ``error``
    "reason": str,  #: verify: why a seal failed (``SealVerificationFailed.reason``)
    "vram_used": int,  #: bytes in use on the device after the step
    "vram_total": int,  #: the device's bytes
    "read_threads": int,  #: copy of a file: threads reading it
    "read_cpu_us": int,  #: copy of a file: CPU microseconds the reader threads spent reading
    "hash_cpu_us": int,  #: copy of a file: CPU microseconds the reader threads spent hashing
    "copy_cpu_us": int,  #: copy of a file: CPU microseconds spent issuing device copies
    "stall_us": int,  #: copy of a file: microseconds waiting for reads or hashes to finish
    "cpu_us": int,  #: copy of a file: CPU microseconds of the process (every thread)
    "wall_us": int,  #: copy of a file: microseconds from its first read to its last copy
}

AttributeValue = str | int | float | bool


class _Step:
    """The core's own record of one operation: what to run, whether it ran, what came of it."""

    __slots__ = ("error", "ran", "result", "run")

    def __init__(self, run: Callable[[Operation], Any]) -> None:
        self.run = run
        self.ran = False
        self.result: Any = None
        self.error: BaseException | None = None


# Operation -> its step record. Weak keys: an operation made outside perform() (a plugin's own
# test) leaves nothing behind. Nothing handed to a plugin holds a reference to this mapping.
_STEPS: weakref.WeakKeyDictionary[Operation, _Step] = weakref.WeakKeyDictionary()
_STEPS_LOCK = threading.Lock()


class Operation:
    """One narrated step, as a wrapper sees it: a name and public facts, nothing that decides.

    :param name: one of :data:`OPERATION_NAMES`.
    :param run: the step, called with the operation by :meth:`run` (kept by the core, not
        on the operation).
    :param attributes: the initial public facts (names from :data:`OPERATION_ATTRIBUTES`).
    """

    __slots__ = ("__weakref__", "_attributes", "_correlation_id", "_name", "_started")

    def __init__(
        self, name: str, run: Callable[[Operation], Any], **attributes: AttributeValue
    ) -> None:
        if name not in OPERATION_NAMES:
            raise ValueError(f"unknown operation {name!r}; one of {OPERATION_NAMES}")
        self._name = name
        self._attributes: dict[str, AttributeValue] = dict(attributes)
        self._correlation_id = current_correlation_id()
        self._started = time.perf_counter()
        with _STEPS_LOCK:
            _STEPS[self] = _Step(run)

    @property
    def name(self) -> str:
        """One of :data:`OPERATION_NAMES`."""
        return self._name

    @property
    def attributes(self) -> dict[str, AttributeValue]:
        """Public facts about the step; the step adds results (``outcome``, ``leaf_count``...)
        before it returns, so a wrapper reads them after ``yield``. What a wrapper writes here
        is reported, never consulted: the outcome is decided elsewhere."""
        return self._attributes

    @property
    def correlation_id(self) -> str:
        """From :func:`vramcore.correlate`, ``""`` when none."""
        return self._correlation_id

    @property
    def started(self) -> float:
        """``time.perf_counter()`` when the operation object was made."""
        return self._started

    def run(self) -> Any:
        """Perform the step (called by the core's hook implementation, once).

        Sets ``attributes["outcome"]`` (``"ok"``, or ``"error"`` with ``error_type``) unless
        the step set it. A second call raises :class:`~vramcore.errors.VramError`.
        """
        step = _step_of(self)
        if step.ran:
            raise VramError(f"the {self._name} step was run twice by a vramcore_operation hook")
        step.ran = True
        try:
            step.result = step.run(self)
        except BaseException as exc:
            step.error = exc
            self._attributes.setdefault("outcome", "error")
            self._attributes["error_type"] = type(exc).__name__
            raise
        self._attributes.setdefault("outcome", "ok")
        return step.result

    def __repr__(self) -> str:
        return f"<Operation {self._name} {self._attributes}>"


def _step_of(op: Operation) -> _Step:
    with _STEPS_LOCK:
        step = _STEPS.get(op)
    if step is None:  # pragma: no cover - every Operation registers one
        raise VramError(f"the {op.name} operation has no step")
    return step


def perform(hook: Any, name: str, step: Callable[[Operation], Any], **attributes: Any) -> Any:
    """Run ``step`` as operation ``name`` through ``hook.vramcore_operation``; fail closed.

    :param hook: the plugin manager's hook relay.
    :return: what ``step`` returned, whatever the wrappers returned or changed.
    :raises: what ``step`` raised, whatever the wrappers did with it; what a wrapper raised
        around a step that succeeded (the caller must undo the step's effects: the operation
        failed); :class:`~vramcore.errors.VramError` when a wrapper kept the step from
        running.
    """
    op = Operation(name, step, **attributes)
    record = _step_of(op)
    caller = hook.vramcore_operation
    if _only_the_core(caller):  # no wrapper to narrate to: run the step without pluggy
        op.run()
        return record.result
    try:
        caller(op=op)
    except BaseException as exc:
        if record.error is not None:  # the step's own error, not what a wrapper made of it
            raise record.error from record.error.__cause__
        if not record.ran and isinstance(exc, Exception) and not isinstance(exc, VramError):
            raise VramError(
                f"a vramcore_operation wrapper failed before the {name} step ran "
                f"({type(exc).__name__}); the operation failed closed"
            ) from exc
        raise  # a wrapper failed around a step that succeeded: the operation fails (closed)
    if record.error is not None:  # a wrapper swallowed the step's exception
        raise record.error
    if not record.ran:
        raise VramError(
            f"a vramcore_operation wrapper did not let the {name} step run; the operation "
            "failed closed (check the narration plugins: a wrapper must yield exactly once)"
        )
    return record.result


def _only_the_core(caller: Any) -> bool:
    """Whether the core's own implementation (``vramcore._builtin``) is the hook's only one."""
    impls = caller.get_hookimpls()
    return len(impls) == 1 and impls[0].function.__module__ == "vramcore._builtin"
