"""The VRAM-only residency policy.

Weights must live in discrete device memory that the host cannot map or page in. A device
passes when it is not integrated, and when it cannot read pageable host memory (ATS or HMM) —
unless the operator explicitly allows host access, for instance on a Grace Hopper system where
ATS is always on. Supporting managed memory is not a violation (every recent discrete GPU
does); *using* it is: each allocation's pointer type must be plain device memory.

Checked when a manager starts (every device it will use) and on every allocation. A failure is
audited as a :class:`vramcore.events.PolicyViolation` event and raised as
:class:`vramcore.errors.PolicyViolation`.
"""

from __future__ import annotations

import attrs

from vramcore.backend import DeviceInfo, MemoryKind
from vramcore.validation import check_flag

__all__ = ["Finding", "VramPolicy"]


@attrs.frozen
class Finding:
    """One broken rule: its name and a sentence an operator can act on."""

    rule: str
    detail: str


def _flag(_inst: object, attr: attrs.Attribute[bool], value: object) -> None:
    # A string such as "false" is truthy: it would silently turn a refusal off.
    check_flag(value, field=attr.name)


@attrs.frozen(kw_only=True)
class VramPolicy:
    """What the worker accepts.

    :attr allow_host_access: accept devices that can read pageable host memory through ATS or
        HMM. Off by default; turning it on means a kernel bug could read weights from (or a
        host process could plant them in) host RAM, which the seal then cannot rule out.
    :attr require_ecc: refuse devices whose ECC is reported off or unknown.

    Both must be real booleans (:class:`~vramcore.errors.InvalidInput` otherwise).
    """

    allow_host_access: bool = attrs.field(default=False, validator=_flag)
    require_ecc: bool = attrs.field(default=False, validator=_flag)

    def check_device(self, info: DeviceInfo) -> list[Finding]:
        """Every rule ``info`` breaks (an empty list means the device passes)."""
        found = []
        if info.integrated:
            found.append(
                Finding(
                    "integrated",
                    f"GPU {info.index} ({info.name}) is integrated: its memory is host RAM",
                )
            )
        if info.pageable_memory_access and not self.allow_host_access:
            how = "ATS (host page tables)" if info.host_page_tables else "HMM"
            found.append(
                Finding(
                    "ats" if info.host_page_tables else "hmm",
                    f"GPU {info.index} ({info.name}) can access pageable host memory through "
                    f"{how}; refuse, or set allow_host_access if this is accepted on purpose",
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
