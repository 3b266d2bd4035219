"""The VRAM-only residency policy.

Weights must live in discrete device memory that the host cannot map or page in.

* An **integrated** GPU is refused: its "device" memory is host RAM.
* **Every allocation** must be plain device memory (``cudaMalloc``): managed, host-mapped or
  host memory is refused. This per-allocation check is never relaxed; supporting managed
  memory is not a violation (every recent discrete GPU does), *using* it is.
* **Pageable host memory access** (HMM on recent Linux drivers, ATS on Grace Hopper) lets a
  kernel dereference host pointers; it does not move or mirror a ``cudaMalloc``'d shard, which
  stays in HBM and is checked pointer by pointer above. So by default it is *reported*: a
  ``policy.violation`` audit event with severity ``warning`` (rule ``hmm`` or ``ats``), and the
  device is used. An H100 on a current driver reports HMM; refusing it for that alone would
  refuse every modern GPU host. Operators who want no device that can reach host memory at
  all set ``strict_host_isolation=True``, which refuses such devices.
* ``require_ecc=True`` refuses devices whose ECC is off or unknown.

Checked when a manager starts and on every allocation. A refusal is audited as a
:class:`vramcore.events.PolicyViolation` event (severity ``critical``) and raised as
:class:`vramcore.errors.PolicyViolation`.
"""

from __future__ import annotations

import attrs

from vramcore.backend import (
    HOST_MEMORY_NOTICE,
    AllocatorBackend,
    DeviceInfo,
    MemoryKind,
    log_host_memory,
)
from vramcore.errors import InvalidInput
from vramcore.validation import check_flag, safe_repr

__all__ = ["Finding", "VramPolicy", "check_policy"]


@attrs.frozen
class Finding:
    """One rule a device or allocation breaks: its name and a sentence an operator can act on.

    :attr refused: whether the policy refuses because of it; ``False`` for findings that are
        only reported (pageable host memory access without ``strict_host_isolation``).
    """

    rule: str
    detail: str
    refused: bool = True


def _flag(_inst: object, attr: attrs.Attribute[bool], value: object) -> None:
    # A string such as "false" is truthy: it would silently turn a refusal off.
    check_flag(value, field=attr.name)


@attrs.frozen(kw_only=True)
class VramPolicy:
    """What the worker accepts.

    :attr strict_host_isolation: refuse devices that can read pageable host memory (HMM or
        ATS) instead of reporting them (see the module docstring for why the default reports).
    :attr require_ecc: refuse devices whose ECC is reported off or unknown.

    Both must be real booleans (:class:`~vramcore.errors.InvalidInput` otherwise).
    """

    strict_host_isolation: bool = attrs.field(default=False, validator=_flag)
    require_ecc: bool = attrs.field(default=False, validator=_flag)

    def check_device(self, info: DeviceInfo) -> list[Finding]:
        """Every rule ``info`` breaks; the device is refused if any finding is ``refused``."""
        found = []
        if info.integrated:
            found.append(
                Finding(
                    "integrated",
                    f"GPU {info.index} ({info.name}) is integrated: its memory is host RAM",
                )
            )
        if info.pageable_memory_access:
            how = "ATS (host page tables)" if info.host_page_tables else "HMM"
            then = (
                "refused (strict_host_isolation)"
                if self.strict_host_isolation
                else "reported; shards stay in device memory, checked per allocation"
            )
            found.append(
                Finding(
                    "ats" if info.host_page_tables else "hmm",
                    f"GPU {info.index} ({info.name}) can access pageable host memory through "
                    f"{how}: {then}",
                    refused=self.strict_host_isolation,
                )
            )
        if self.require_ecc and info.ecc_enabled is not True:
            state = "off" if info.ecc_enabled is False else "unknown"
            found.append(Finding("ecc", f"GPU {info.index} ({info.name}) has ECC {state}"))
        return found

    def check_allocation(self, kind: MemoryKind, device: int) -> Finding | None:
        """The broken rule when an allocation is not plain device memory, else ``None``."""
        if kind is MemoryKind.DEVICE:
            return None
        return Finding(
            "managed" if kind is MemoryKind.MANAGED else "host_memory",
            f"allocation on GPU {device} is {kind.value} memory, not plain device memory",
        )


def check_policy(policy: object, *, field: str = "policy") -> VramPolicy:
    """Check a policy argument: ``None`` (the strict default) or a :class:`VramPolicy`.

    :raises InvalidInput: anything else.
    """
    if policy is None:
        return VramPolicy()
    if not isinstance(policy, VramPolicy):
        raise InvalidInput(
            f"{field} must be a vramcore.VramPolicy (e.g. VramPolicy(strict_host_isolation=True)) "
            f"or None for the strict default, got {type(policy).__name__} {safe_repr(policy)}"
        )
    return policy


def host_memory_findings(backend: AllocatorBackend, policy: VramPolicy) -> list[Finding]:
    """Say once (a log warning) that ``backend`` keeps weights in host memory, if it does;
    under ``strict_host_isolation`` return the finding that refuses it.
    """
    if not backend.host_memory:
        return []
    log_host_memory(backend.name)
    if not policy.strict_host_isolation:
        return []
    notice = HOST_MEMORY_NOTICE.format(backend=backend.name)
    return [Finding("host_memory", f"{notice}: refused (strict_host_isolation)")]
