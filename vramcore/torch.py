"""PyTorch on the sealed bytes: bind a module's weights to VRAM and verify before each forward.

Needs PyTorch: the core's ``torch`` extra (``./[torch]`` from a clone) or any PyTorch build
the machine needs. Two functions::

    from vramcore.torch import bind, verify_before_forward

    sealed = manager.seal_dir("models/minilm")              # or [manager.seal_file(path)]
    model = BertModel(config)                               # any torch.nn.Module
    bind(model, manager, sealed)                            # weights now ARE the sealed bytes
    verify_before_forward(model, manager, sealed, sample=0.01)
    model(input_ids)                                        # verified first; refused if not

:func:`bind` replaces each parameter and buffer of the module by a view of the sealed bytes
(``torch.from_dlpack`` of :meth:`vramcore.backend.DeviceBuffer.tensors`): no second copy
exists, so what runs is what was verified. Every ``data_ptr`` lies inside its shard's
allocation. Names are matched exactly (after ``prefix``); missing, unexpected, mis-shaped or
mis-typed names are reported, and refused when ``strict`` (the default). Bound parameters are
frozen (``requires_grad=False``): a serving process never writes its weights, and a write
would fail the next verification.

:func:`verify_before_forward` installs a forward pre-hook that verifies every shard (fully,
or a CSPRNG sample of leaves) before each forward pass; a failed verification raises
:class:`~vramcore.errors.SealVerificationFailed` (audited) and the pass does not run. A shard
deallocated meanwhile raises :class:`~vramcore.errors.NotSealed`: its views are stale.

Both take a :class:`~vramcore.SealedModel` (what ``seal_dir`` returns) or the shards
themselves. Given the model, they also check the model attestation's own signature
(:meth:`VramManager.verify_model`), so a list of shards that was edited (a shard dropped or
swapped) is refused rather than served.

Verification and the forward pass are not atomic: bytes changed after the check and before the
kernels read them are caught by the next check (or a background scrub), not this one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

try:
    import torch
    import torch.utils.dlpack
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "vramcore.torch needs PyTorch: install the PyTorch build this machine needs, or the "
        "core's torch extra from a clone (./[torch])"
    ) from exc

from vramcore._sealdir import SealedModel
from vramcore.errors import InvalidInput
from vramcore.manager import VramManager
from vramcore.shard import SealedShard
from vramcore.validation import safe_repr

__all__ = ["BindError", "Binding", "bind", "verify_before_forward"]

_SHOWN = 5  # names listed per problem in a BindError message


class BindError(InvalidInput):
    """The module and the sealed tensors do not match (raised by a strict :func:`bind`).

    :attr missing: module entries no shard holds.
    :attr unexpected: sealed tensors the module has no entry for.
    :attr mismatched: ``(name, why)`` for entries whose shape or dtype differ.
    """

    def __init__(
        self,
        missing: Sequence[str],
        unexpected: Sequence[str],
        mismatched: Sequence[tuple[str, str]],
    ) -> None:
        self.missing = tuple(missing)
        self.unexpected = tuple(unexpected)
        self.mismatched = tuple(mismatched)
        parts = []
        for label, names in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("mismatched", [f"{n} ({why})" for n, why in self.mismatched]),
        ):
            if names:
                shown = ", ".join(safe_repr(n) for n in names[:_SHOWN])
                more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
                parts.append(f"{len(names)} {label}: {shown}{more}")
        super().__init__("cannot bind the module to the sealed tensors: " + "; ".join(parts))


@attrs.frozen
class Binding:
    """What :func:`bind` did.

    :attr bound: module entry name -> the shard id whose bytes it now is.
    :attr missing: module entries left as they were (only when not strict).
    :attr unexpected: sealed tensors no module entry took (only when not strict).
    """

    bound: Mapping[str, str]
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()


def bind(
    module: torch.nn.Module,
    manager: VramManager,
    shards: SealedModel | Iterable[SealedShard],
    *,
    strict: bool = True,
    prefix: str = "",
) -> Binding:
    """Make ``module``'s parameters and buffers zero-copy views of the sealed ``shards``.

    Each shard is verified (fully) before its tensors are taken; a :class:`~vramcore.SealedModel`
    has its attestation's signature checked first. A module entry ``name`` takes
    the sealed tensor ``prefix + name``. Parameters tied to each other (one tensor under two
    names) are bound once, through whichever name a shard holds.

    :param strict: refuse (:class:`BindError`) unless every persistent entry is found, every
        sealed tensor is used, and shapes and dtypes agree. When ``False``, binds what
        matches and reports the rest on the returned :class:`Binding` (mismatches are still
        refused: a tensor that does not fit cannot be bound).
    :raises BindError: as above.
    :raises SealVerificationFailed: a shard, or the model attestation, does not verify.
    """
    if not isinstance(module, torch.nn.Module):
        raise InvalidInput(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(prefix, str):
        raise InvalidInput("prefix must be a string")
    if isinstance(shards, SealedModel):
        manager.verify_attestation(shards)  # its list of shards is the one sealed
        shards = shards.shards
    return _Binder(module, manager, tuple(shards), strict=bool(strict), prefix=prefix).bind()


class _Binder:
    """One bind: collects the sealed views, matches them to the module, then swaps them in."""

    def __init__(
        self,
        module: torch.nn.Module,
        manager: VramManager,
        shards: tuple[SealedShard, ...],
        *,
        strict: bool,
        prefix: str,
    ) -> None:
        self.module = module
        self.manager = manager
        self.shards = shards
        self.strict = strict
        self.prefix = prefix
        self.sealed: dict[str, tuple[str, Any]] = {}  # tensor name -> (shard id, view)
        # Module entries, grouped by the tensor object they hold (tied weights share one).
        self.groups: dict[int, list[str]] = {}
        self.entries: dict[str, torch.Tensor] = {}
        self.persistent: set[str] = set()

    def bind(self) -> Binding:
        self._collect_sealed()
        self._collect_entries()
        chosen, missing, mismatched = self._match()
        used = {self.prefix + name for name in [*chosen, *(n for n, _ in mismatched)]}
        unexpected = sorted(n for n in self.sealed if n not in used and not self._tied_to(n, used))
        if mismatched or (self.strict and (missing or unexpected)):
            raise BindError(missing, unexpected, mismatched)
        bound: dict[str, str] = {}
        for name, tensor in chosen.items():
            shard_id = self.sealed[self.prefix + name][0]
            current = self.entries[name]
            value = (
                torch.nn.Parameter(tensor, requires_grad=False)
                if isinstance(current, torch.nn.Parameter)
                else tensor
            )
            for alias in self.groups[id(current)]:  # tied entries keep sharing one tensor
                self._swap(alias, value)
                bound[alias] = shard_id
        return Binding(bound=bound, missing=tuple(missing), unexpected=tuple(unexpected))

    def _collect_sealed(self) -> None:
        for shard in self.shards:
            if not isinstance(shard, SealedShard):
                raise InvalidInput(
                    f"shards must be SealedShard objects, got {type(shard).__name__}"
                )
            with self.manager.verified(shard) as buf:
                views = buf.tensors()
            for name, view in views.items():
                if name in self.sealed:
                    raise InvalidInput(
                        f"tensor {safe_repr(name)} is in shard {self.sealed[name][0]} and in "
                        f"shard {shard.shard_id}"
                    )
                self.sealed[name] = (shard.shard_id, view)

    def _collect_entries(self) -> None:
        self.persistent = set(self.module.state_dict(keep_vars=True))
        named = [
            *self.module.named_parameters(remove_duplicate=False),
            *self.module.named_buffers(remove_duplicate=False),
        ]
        for name, tensor in named:
            self.entries[name] = tensor
            self.groups.setdefault(id(tensor), []).append(name)

    def _match(self) -> tuple[dict[str, torch.Tensor], list[str], list[tuple[str, str]]]:
        chosen: dict[str, torch.Tensor] = {}
        missing: list[str] = []
        mismatched: list[tuple[str, str]] = []
        for names in self.groups.values():
            found = [n for n in names if self.prefix + n in self.sealed]
            if not found:
                missing += [n for n in names if n in self.persistent]
                continue
            name = found[0]
            current = self.entries[name]
            sealed = torch.utils.dlpack.from_dlpack(self.sealed[self.prefix + name][1])
            if tuple(sealed.shape) != tuple(current.shape):
                why = f"sealed {list(sealed.shape)}, module {list(current.shape)}"
                mismatched.append((name, why))
            elif sealed.dtype != current.dtype:
                mismatched.append((name, f"sealed {sealed.dtype}, module {current.dtype}"))
            else:
                chosen[name] = sealed
        return chosen, sorted(missing), mismatched

    def _tied_to(self, sealed_name: str, used: set[str]) -> bool:
        """A sealed tensor whose module entry is tied to one already bound counts as used."""
        if not sealed_name.startswith(self.prefix):
            return False
        entry = self.entries.get(sealed_name[len(self.prefix) :])
        return entry is not None and any(
            self.prefix + alias in used for alias in self.groups[id(entry)]
        )

    def _swap(self, name: str, tensor: torch.Tensor) -> None:
        owner_name, _, attr = name.rpartition(".")
        owner = self.module.get_submodule(owner_name)
        if isinstance(tensor, torch.nn.Parameter):
            owner._parameters[attr] = tensor
        else:
            owner._buffers[attr] = tensor


def verify_before_forward(
    module: torch.nn.Module,
    manager: VramManager,
    shards: SealedModel | Iterable[SealedShard],
    sample: float | int | None = None,
) -> torch.utils.hooks.RemovableHandle:
    """Verify ``shards`` before every forward pass of ``module``; refuse the pass otherwise.

    Given a :class:`~vramcore.SealedModel`, each check is :meth:`VramManager.verify_model`
    (the attestation's signature, then every shard).

    :param sample: ``None`` re-hashes every byte (see :meth:`VramManager.verify_sealed`); a
        fraction in ``(0, 1]`` or a leaf count checks that many CSPRNG-chosen leaves.
    :returns: the hook's handle (``handle.remove()`` uninstalls it).
    :raises SealVerificationFailed: (from the forward call) a shard, or the model
        attestation, failed verification.
    """
    if not isinstance(module, torch.nn.Module):
        raise InvalidInput(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if isinstance(shards, SealedModel):
        check = _ForwardCheck(manager, shards, (), sample)
    else:
        check = _ForwardCheck(manager, None, tuple(shards), sample)
    return module.register_forward_pre_hook(check)


@attrs.frozen
class _ForwardCheck:
    """The forward pre-hook :func:`verify_before_forward` installs."""

    manager: VramManager
    model: SealedModel | None
    shards: tuple[SealedShard, ...]
    sample: float | int | None

    def __call__(self, _module: torch.nn.Module, _args: Any) -> None:
        if self.model is not None:
            self.manager.verify_model(self.model, sample=self.sample)
        for shard in self.shards:
            self.manager.verify_sealed(shard, sample=self.sample)
