"""The working parts of one manager, as its flows (a seal, a verification) use them.

:class:`~vramcore.manager.VramManager` builds and owns the parts (backend, residency table,
audit sinks, seal key) and hands the flows one :class:`Core` that holds them, plus the few
steps every flow shares: narrating an operation, the policy check of an allocation, freeing
a buffer. Nothing here calls back into the manager.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from vramcore._digests import DigestSource
from vramcore._emitter import Emitter
from vramcore._residency import Residency, Resident
from vramcore.backend import AllocatorBackend, DeviceBuffer, DeviceInfo
from vramcore.errors import AuditError, ManagerClosed, PolicyViolation
from vramcore.narration import Operation, perform
from vramcore.policy import Finding, VramPolicy
from vramcore.seal import SecretKey

__all__ = ["CLOSED", "Core", "enforce", "raise_close_errors"]

log = logging.getLogger("vramcore")

#: What every call on a closed manager says.
CLOSED = "this VramManager is closed; create a new one"


class Core:
    """One device of one backend, with everything a flow needs to work on it.

    :attr backend: the allocator backend.
    :attr device: the device index; :attr device_info: its probe record.
    :attr residency: the resident shards and the operations in progress.
    :attr emitter: audit events of this manager.
    :attr digests: where digests come from (device or host).
    :attr policy: the VRAM-only policy.
    :attr leaf_size: the Merkle leaf size.
    """

    def __init__(
        self,
        *,
        hook: Any,
        backend: AllocatorBackend,
        device_info: DeviceInfo,
        residency: Residency,
        emitter: Emitter,
        digests: DigestSource,
        policy: VramPolicy,
        key: SecretKey,
    ) -> None:
        self.hook = hook
        self.backend = backend
        self.device = emitter.device
        self.device_info = device_info
        self.residency = residency
        self.emitter = emitter
        self.digests = digests
        self.policy = policy
        self.leaf_size = digests.leaf_size
        self._key = key

    def key(self) -> SecretKey:
        """The seal key, while the manager is open.

        :raises ManagerClosed: it was wiped (the manager closed).
        """
        if self._key.wiped:
            raise ManagerClosed(CLOSED)
        return self._key

    def perform(self, name: str, step: Callable[[Operation], Any], **attributes: Any) -> Any:
        """Run ``step`` as the narrated operation ``name`` (:func:`vramcore.narration.perform`)."""
        return perform(self.hook, name, step, **attributes)

    def facts(self, shard_id: str, nbytes: int, **more: Any) -> dict[str, Any]:
        """The public facts every operation on a shard carries."""
        return {
            "shard_id": shard_id,
            "device": self.device,
            "device_name": self.device_info.name,
            "nbytes": nbytes,
            "backend": self.backend.name,
            **more,
        }

    def capacity(self, op: Operation) -> None:
        """Record the device's memory use after ``op`` on it."""
        free, total = self.backend.mem_info(self.device)
        op.attributes["vram_used"] = total - free
        op.attributes["vram_total"] = total

    def enforce(self, findings: Sequence[Finding]) -> None:
        """Audit every policy finding; raise for the refused ones (see :func:`enforce`)."""
        enforce(self.emitter, findings)

    def free(self, buf: DeviceBuffer) -> None:
        """Free ``buf`` on the backend and take its bytes off the manager's count."""
        self.backend.free(buf)
        self.residency.add_bytes(-buf.nbytes)

    def release_all(self, residents: Sequence[Resident]) -> list[BaseException]:
        """Free every one of ``residents`` (closing); return the errors, each freed or not."""
        errors: list[BaseException] = []
        for resident in residents:
            try:
                self.release_buffer(resident.shard.shard_id, resident.buffer)
            except BaseException as exc:
                errors.append(exc)
        return errors

    def release_buffer(self, shard_id: str, buf: DeviceBuffer) -> None:
        """Free a shard's buffer as the narrated ``deallocate`` operation, audited."""
        self.perform(
            "deallocate", _Release(self, shard_id, buf).run, **self.facts(shard_id, buf.nbytes)
        )


def raise_close_errors(stuck: int, timeout: float, errors: Sequence[BaseException]) -> None:
    """What ``close()`` raises once it has cleaned up, if anything.

    :raises ManagerClosed: ``stuck`` operations were still in the backend (left open).
    :raises AuditError: a sink (or the backend) failed to close; the first error is chained.
    """
    if stuck:
        raise ManagerClosed(
            f"{stuck} operation(s) were still running in the backend "
            f"{timeout:g} s after close(); the backend was left open"
        )
    if errors:
        raise AuditError(
            f"closing the manager hit {len(errors)} error(s); the first: "
            f"{type(errors[0]).__name__}: {errors[0]}"
        ) from errors[0]


def enforce(emitter: Emitter, findings: Sequence[Finding]) -> None:
    """Audit every policy finding; raise for the refused ones (reported ones are logged).

    :raises PolicyViolation: a finding refuses the device or the allocation.
    """
    for finding in findings:
        emitter.policy_violation(
            emitter.device, finding.rule, finding.detail, refused=finding.refused
        )
        if not finding.refused:
            log.warning("VRAM-only policy: %s", finding.detail)
    refused = [f for f in findings if f.refused]
    if refused:
        raise PolicyViolation(
            f"VRAM-only policy refused: {'; '.join(f.detail for f in refused)}",
            rule=refused[0].rule,
            device=emitter.device,
        )


class _Release:
    """The ``deallocate`` step of one buffer."""

    def __init__(self, core: Core, shard_id: str, buf: DeviceBuffer) -> None:
        self._core = core
        self._shard_id = shard_id
        self._buf = buf

    def run(self, op: Operation) -> None:
        """Free the buffer, record the capacity after it and audit it."""
        self._core.free(self._buf)
        self._core.capacity(op)
        self._core.emitter.deallocated(self._shard_id, self._buf.nbytes)
