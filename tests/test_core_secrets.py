"""No secret (token, seal key, signature) in any repr, message, event, operation or log."""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from vramcore_allocator_mock import MockBackend

from vramcore import MemoryKind, VramManager, hookimpl
from vramcore.errors import VramError
from vramcore.narration import Operation
from vramcore.seal import SEAL_KEY_INFO, WorkerToken
from vramcore.testing import TEST_TOKEN, CapturePlugin, CapturingSink, FailingSink

RAW_KEY = WorkerToken(TEST_TOKEN).derive(SEAL_KEY_INFO).export()


def _forbidden(*signatures: bytes) -> list[str]:
    token = TEST_TOKEN.encode()
    values = [
        TEST_TOKEN,
        token.hex(),
        repr(token),
        base64.b64encode(token).decode(),
        RAW_KEY.hex(),
        RAW_KEY.hex().upper(),
        repr(RAW_KEY),
        str(RAW_KEY),
        base64.b64encode(RAW_KEY).decode(),
    ]
    for sig in signatures:
        values += [sig.hex(), repr(sig), base64.b64encode(sig).decode()]
    return values


def _assert_clean(text: str, forbidden: list[str], what: str) -> None:
    for secret in forbidden:
        assert secret not in text, f"a secret leaked into {what}: {text[:200]!r}"


def _exception_texts(exc: BaseException) -> Iterator[str]:
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield str(current)
        yield repr(current)
        yield from (repr(a) for a in current.args)
        current = current.__cause__ or current.__context__


class OperationRecorder:
    def __init__(self) -> None:
        self.seen: list[str] = []

    @hookimpl(wrapper=True)
    def vramcore_operation(self, op: Operation) -> Any:
        try:
            return (yield)
        finally:
            self.seen.append(repr(op))


def test_worker_token_and_secret_key_reprs() -> None:
    token = WorkerToken(TEST_TOKEN)
    key = token.derive(SEAL_KEY_INFO)
    forbidden = _forbidden()
    for obj in (token, key):
        for text in (repr(obj), str(obj), f"{obj}", f"{obj!r}"):
            _assert_clean(text, forbidden, type(obj).__name__)
    assert token.fingerprint in repr(token)
    assert len(token.fingerprint) == 12
    assert token.fingerprint not in RAW_KEY.hex()
    assert key.fingerprint != token.fingerprint


def test_no_secret_leaks_through_the_failure_paths(
    new_manager: Any,
    mock_backend: Any,
    tmp_path: Path,
    safetensors_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    capture = CapturingSink()
    recorder = OperationRecorder()
    failing = FailingSink(["vram.sealed"])
    failing.event_types = set()  # armed later
    manager = new_manager(mock_backend, recorder, CapturePlugin(capture, failing))
    other = new_manager(
        mock_backend, token="CWFKHQQGXuRnjJ3k24tUKlVBtaK1-3tSf2KelkAIrao", audit="disabled"
    )
    shard = manager.seal_file(safetensors_file)
    foreign = other.seal_model(b"f" * 100, shard_id="model.safetensors")
    signatures = [shard.signature, foreign.signature]
    errors: list[BaseException] = []

    def expect_error(action: Callable[[], Any]) -> None:
        with pytest.raises(VramError) as info:
            action()
        errors.append(info.value)

    # tampered and foreign seals
    for field, value in [("digest", "0" * 64), ("vram_bytes", 1), ("shard_id", "x")]:
        expect_error(lambda f=field, v=value: manager.verify_sealed(attrs.evolve(shard, **{f: v})))
    expect_error(lambda: manager.verify_sealed(foreign))
    # corrupted bytes
    with manager.verified(shard) as buf:
        mock_backend.flip_bit(buf, shard.vram_bytes - 1)
    expect_error(lambda: manager.verify_sealed(shard))
    # allocation, copy, capacity, policy, integrity, audit, input failures
    mock_backend.fail_next_allocation()
    expect_error(lambda: manager.seal_model(b"a" * 10))
    mock_backend.fail_next_copy()
    expect_error(lambda: manager.seal_model(b"a" * 10))
    small = new_manager(MockBackend(capacity=1000), sink=CapturingSink())
    expect_error(lambda: small.seal_model(bytes(1001)))
    mock_backend.hand_out(MemoryKind.MANAGED)
    expect_error(lambda: manager.seal_model(b"a" * 10))
    mock_backend.hand_out(MemoryKind.DEVICE)
    expect_error(
        lambda: manager.seal_file(safetensors_file, shard_id="dup", expected_sha256="0" * 64)
    )
    expect_error(lambda: manager.seal_model(b"a", expected_sha256=hashlib.sha256(b"b").hexdigest()))
    failing.event_types = {"vram.sealed"}
    expect_error(lambda: manager.seal_model(b"a" * 10))
    failing.event_types = set()
    expect_error(lambda: manager.seal_model(b"a", shard_id="model.safetensors"))
    expect_error(lambda: manager.seal_model(b"a", shard_id="bad/id"))
    expect_error(lambda: manager.seal_model(b""))
    expect_error(lambda: manager.seal_file(tmp_path / "missing"))
    expect_error(lambda: new_manager(mock_backend, token="short"))
    manager.deallocate(shard)
    expect_error(lambda: manager.verify_sealed(shard))
    shown = [repr(manager), str(manager), repr(shard), str(shard), repr(foreign)]
    manager.close()
    expect_error(lambda: manager.seal_model(b"a"))
    shown.append(repr(manager))

    forbidden = _forbidden(*signatures)
    assert len(errors) == 19
    for error in errors:
        for text in _exception_texts(error):
            _assert_clean(text, forbidden, f"{type(error).__name__} message")
    for text in shown:
        _assert_clean(text, forbidden, "a repr")
    assert len(capture.events) > 20
    assert {"seal.verification_failed", "vram.allocation_failed", "policy.violation"} <= set(
        capture.types()
    )
    for event in capture.events:
        _assert_clean(event.to_json(), forbidden, f"event {event.event_type}")
        _assert_clean(repr(event), forbidden, f"event {event.event_type}")
    assert recorder.seen
    for text in recorder.seen:
        _assert_clean(text, forbidden, "an operation")
    for record in caplog.records:
        _assert_clean(record.getMessage(), forbidden, "a log record")


def test_the_manager_repr_shows_only_the_fingerprint(mock_manager: VramManager) -> None:
    fingerprint = WorkerToken(TEST_TOKEN).fingerprint
    assert mock_manager.token_fingerprint == fingerprint
    assert fingerprint in repr(mock_manager)
    _assert_clean(repr(mock_manager), _forbidden(), "the manager repr")


def test_the_attestation_without_signature(mock_manager: VramManager) -> None:
    shard = mock_manager.seal_model(b"x" * 10)
    assert shard.signature.hex() in shard.to_json()  # an attestation needs it...
    _assert_clean(shard.to_json(include_signature=False), _forbidden(shard.signature), "json")
    _assert_clean(shard.to_json(), _forbidden(), "json")  # ...but never the key or token
