"""A narration wrapper cannot edit an operation into a different outcome.

What a ``vramcore_operation`` wrapper receives holds no writable state that decides whether the
step failed: setting the operation's private error to ``None``, replacing its step, or
swallowing the exception leaves a tampered or forged seal refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator
from typing import Any

import attrs
import pytest

from vramcore import SealedShard, VramManager, hookimpl
from vramcore.errors import SealVerificationFailed, VramError
from vramcore.narration import Operation


def _edit(op: Operation, **changes: object) -> None:
    """Try to set private attributes of ``op`` the way a hostile wrapper would."""
    for name, value in changes.items():
        with contextlib.suppress(AttributeError, TypeError):
            setattr(op, name, value)


class ClearsTheError:
    """After the step: clear the operation's recorded error and swallow the exception."""

    @hookimpl(wrapper=True)
    def vramcore_operation(self, op: Operation) -> Generator[None, Any, Any]:
        try:
            return (yield)
        except BaseException:
            _edit(op, _error=None, error=None, _result=None)
            return None


class ReplacesTheStep:
    """Before the step: replace what the operation will run with a step that passes."""

    @hookimpl(wrapper=True)
    def vramcore_operation(self, op: Operation) -> Generator[None, Any, Any]:
        if op.name == "verify":
            _edit(op, _run=lambda _op: None, run=lambda: None, _step=lambda _op: None)
            op.attributes["outcome"] = "ok"  # what is reported, not what is decided
        return (yield)


class RunsTheStepItself:
    """Runs the step itself, swallows its failure, then lets the core run it "again"."""

    @hookimpl(wrapper=True)
    def vramcore_operation(self, op: Operation) -> Generator[None, Any, Any]:
        if op.name != "verify":
            return (yield)
        with contextlib.suppress(BaseException):
            op.run()
        _edit(op, _ran=False, _error=None)
        try:
            return (yield)
        except BaseException:
            return None


WRAPPERS: list[Callable[[], object]] = [ClearsTheError, ReplacesTheStep, RunsTheStepItself]


def _tampered(manager: VramManager, backend: Any) -> SealedShard:
    shard = manager.seal_model(b"w" * 70_000, shard_id="tampered")
    with manager.verified(shard) as buf:
        pass
    backend.flip_bit(buf, 1234, 3)
    return shard


def _forged(manager: VramManager, backend: Any) -> SealedShard:
    shard = manager.seal_model(b"f" * 70_000, shard_id="forged")
    return attrs.evolve(shard, digest="ab" * 32)  # the signature no longer matches


@pytest.mark.parametrize("wrapper", WRAPPERS, ids=lambda w: w.__name__)
@pytest.mark.parametrize("make", [_tampered, _forged], ids=["tampered", "forged"])
def test_a_wrapper_editing_the_operation_cannot_make_a_bad_seal_verify(
    new_manager: Callable[..., VramManager],
    mock_backend: Any,
    wrapper: Callable[[], object],
    make: Callable[[VramManager, Any], SealedShard],
) -> None:
    manager = new_manager(mock_backend, wrapper(), audit="disabled")
    shard = make(manager, mock_backend)
    with pytest.raises((SealVerificationFailed, VramError)) as info:
        manager.verify_sealed(shard)
    if isinstance(info.value, SealVerificationFailed):
        assert info.value.reason in ("digest", "signature", "stale")
    with pytest.raises((SealVerificationFailed, VramError)), manager.verified(shard):
        pytest.fail("a bad seal was handed out for inference")


def test_what_a_wrapper_receives_has_no_outcome_state() -> None:
    op = Operation("verify", lambda _op: None, shard_id="s")
    public = {name for name in dir(op) if not name.startswith("__")}
    assert public == {
        "attributes",
        "correlation_id",
        "name",
        "run",
        "started",
        "_attributes",
        "_correlation_id",
        "_name",
        "_started",
    }
    for name in ("_error", "_result", "_run", "_ran", "name", "run"):
        with pytest.raises(AttributeError):
            setattr(op, name, None)
