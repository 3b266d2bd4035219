"""The exceptions vramcore raises.

Every error derives from :class:`VramError` and says whether retrying the same call can help
(:attr:`VramError.retriable`). Messages are written for the operator who reads them: what went
wrong and what to do next. No message ever carries a secret (worker token, seal key, HMAC key,
signature) or a device pointer; the constructors below take only what is safe to show.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AllocationFailed",
    "AuditError",
    "BackendUnavailable",
    "ConfigError",
    "DeviceDigestUnavailable",
    "DigestFailed",
    "InsufficientVram",
    "IntegrityViolation",
    "InvalidInput",
    "ManagerClosed",
    "NotSealed",
    "PolicyViolation",
    "SealVerificationFailed",
    "VramError",
]


class VramError(Exception):
    """Base class of every vramcore error.

    :attr retriable: ``True`` when the same call may succeed later (memory freed, a transient
        device error); ``False`` when the condition is fatal for this input or this worker.
    """

    retriable: bool = False

    @property
    def fatal(self) -> bool:
        """The opposite of :attr:`retriable`: retrying the same call cannot help."""
        return not self.retriable


class InvalidInput(VramError, ValueError):
    """An argument was malformed (a bad shard id, a size of zero, an unknown device...)."""


class ConfigError(VramError):
    """The configuration (environment, plugin set, backend choice) cannot work as given."""


class BackendUnavailable(ConfigError):
    """The requested allocator backend is unknown or cannot run on this machine.

    :attr choices: names of the backends that are registered.
    """

    def __init__(self, message: str, *, choices: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.choices = tuple(choices)


class DeviceDigestUnavailable(BackendUnavailable):
    """The device cannot compute this digest (a kernel that fails to compile or launch, no
    scratch memory for it): raised by a ``vramcore_device_digest`` implementation.

    Not a verdict on the bytes: the core then hashes the same bytes on the host, audits a
    warning, and still cross-checks later device digests. Any *other* exception from a
    device-digest hook is a typed, audited failure of the operation. Retriable: the device may
    have room (or a working driver) for the next digest. A plugin may raise a subclass (its own
    typed CUDA error, for instance).
    """

    retriable = True


class DigestFailed(VramError):
    """A shard's digest could not be computed: the device-digest plugin, or the backend while
    the bytes were read back, raised something unexpected (its type is named; its own
    message, which vramcore cannot vouch for, is kept only as the ``__cause__``).

    A seal that hits it is refused (nothing stays allocated); a verification that hits it
    fails closed as :class:`SealVerificationFailed` with reason ``"digest_failed"``. Both are
    audited.
    """


class InsufficientVram(VramError):
    """Not enough free device memory for an allocation.

    Retriable: memory may be freed by deallocating other shards.
    """

    retriable = True

    def __init__(self, needed: int, available: int, *, device: int | None = None) -> None:
        where = f" on GPU {device}" if device is not None else ""
        super().__init__(
            f"not enough VRAM{where}: need {needed} bytes, {available} available; "
            "deallocate other shards or choose another device"
        )
        self.needed = needed
        self.available = available
        self.device = device


class AllocationFailed(VramError):
    """The backend failed to allocate or to copy into device memory.

    Retriable: the cause is usually transient (fragmentation, a busy device). Nothing is left
    allocated when this is raised by :class:`vramcore.VramManager`.
    """

    retriable = True


class NotSealed(VramError):
    """The shard is not resident in this manager (never sealed here, or already deallocated)."""


class SealVerificationFailed(VramError):
    """A seal did not verify: its signature is wrong or the bytes in VRAM changed.

    :attr shard_id: the shard that failed.
    :attr reason: a short machine-readable reason, one of
        :class:`vramcore.events.VerificationReason`: ``"signature"``, ``"device"``,
        ``"stale"``, ``"quarantined"``, ``"digest"`` (the bytes changed) or ``"digest_failed"``
        (the bytes could not be read or hashed: not verified, not shown corrupted).
    :attr byte_range: ``(start, end)`` (end exclusive) of the first corrupted leaf, when the
        bytes changed.
    :attr corrupted_ranges: every corrupted leaf's byte range.
    :attr tensors: names of the tensors whose bytes overlap a corrupted range (safetensors only).
    """

    def __init__(
        self,
        message: str,
        *,
        shard_id: str,
        reason: str,
        corrupted_ranges: Sequence[tuple[int, int]] = (),
        tensors: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.shard_id = shard_id
        self.reason = reason
        self.corrupted_ranges = tuple(corrupted_ranges)
        self.tensors = tuple(tensors)

    @property
    def byte_range(self) -> tuple[int, int] | None:
        """The first corrupted byte range, or ``None`` when no bytes were compared."""
        return self.corrupted_ranges[0] if self.corrupted_ranges else None


class IntegrityViolation(VramError):
    """Loaded bytes do not match what was promised (``expected_sha256``, a malformed file).

    :attr reason: ``"sha256_mismatch"``, ``"malformed_file"``, ``"changed_while_loading"``,
        ``"cross_check"`` (the bytes in VRAM, as the device or a read-back hashed them, are not
        the bytes staged for the copy) or ``"integrity"`` (anything else); audited as the
        ``reason`` of a ``vram.seal_refused`` event.
    """

    def __init__(self, message: str, *, reason: str = "integrity") -> None:
        super().__init__(message)
        self.reason = reason


class PolicyViolation(VramError):
    """A device or allocation breaks the VRAM-only policy; the worker must not start.

    :attr rule: the rule broken (``"integrated"``, ``"ats"``, ``"managed"``...).
    """

    def __init__(self, message: str, *, rule: str, device: int | None = None) -> None:
        super().__init__(message)
        self.rule = rule
        self.device = device


class AuditError(VramError):
    """An audit sink failed on a security-critical event, or no sink is configured.

    The operation that produced the event is failed (fail closed).

    :attr configuration: ``True`` when the cause is configuration (no sink at all) rather than
        a sink that failed at run time.
    """

    def __init__(self, message: str, *, configuration: bool = False) -> None:
        super().__init__(message)
        self.configuration = configuration


class ManagerClosed(VramError):
    """The :class:`vramcore.VramManager` was closed, or closed while this call was running.

    Fatal for the manager: create a new one. Nothing the failed call allocated stays allocated.
    """
