"""Typed errors from the public API for wrong types and values (issue 8, point 3).

Each wrong argument raises :class:`vramcore.errors.InvalidInput` (also a ``ValueError``) whose
message names the argument, never a bare ``TypeError``/``ValueError`` from deep inside; the
checks live in :mod:`vramcore.validation` and the manager calls them first.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from vramcore import VramManager, VramPolicy
from vramcore.errors import IntegrityViolation, InvalidInput
from vramcore.testing import TEST_TOKEN, CapturingSink


def _manager(mock_backend: Any, make_plugin_manager: Any, **kwargs: Any) -> VramManager:
    return VramManager(
        TEST_TOKEN,
        allocator=mock_backend,
        plugin_manager=make_plugin_manager(),
        audit="disabled",
        **kwargs,
    )


@pytest.mark.parametrize("leaf_size", ["x", 4096.0, True, 0, 1000, -4096])
def test_leaf_size_must_be_a_multiple_of_4096(
    mock_backend: Any, make_plugin_manager: Any, leaf_size: object
) -> None:
    with pytest.raises(InvalidInput, match="leaf_size"):
        _manager(mock_backend, make_plugin_manager, leaf_size=leaf_size)


@pytest.mark.parametrize("policy", ["strict", {"strict_host_isolation": False}, 1])
def test_policy_must_be_a_vram_policy(
    mock_backend: Any, make_plugin_manager: Any, policy: object
) -> None:
    with pytest.raises(InvalidInput, match="VramPolicy"):
        _manager(mock_backend, make_plugin_manager, policy=policy)


@pytest.mark.parametrize("flag", ["false", "no", 0, None])
def test_policy_flags_refuse_truthy_strings(flag: object) -> None:
    with pytest.raises(InvalidInput, match="True or False"):
        VramPolicy(strict_host_isolation=flag)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="True or False"):
        VramPolicy(require_ecc=flag)  # type: ignore[arg-type]


@pytest.mark.parametrize("token", [" " * 20, "z" * 32, "short"])
def test_tokens_without_entropy_are_refused_by_the_manager(
    mock_backend: Any, make_plugin_manager: Any, token: str
) -> None:
    with pytest.raises(InvalidInput, match=r"secrets\.token_urlsafe"):
        VramManager(token, allocator=mock_backend, plugin_manager=make_plugin_manager())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(lambda _t: 123, "must be a path", id="int"),
        pytest.param(lambda t: f"{t}/a\0b", "NUL", id="NUL"),
        pytest.param(lambda t: t / ("n" * 300), "at most 255 bytes", id="long"),
        pytest.param(lambda t: t, "is a directory", id="directory"),
        pytest.param(lambda _t: "/dev/null", "not a regular file", id="/dev/null"),
    ],
)
def test_seal_file_names_what_is_wrong_with_the_path(
    mock_manager: Any, tmp_path: Path, make: Any, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        mock_manager.seal_file(make(tmp_path))


def test_a_sha256_mismatch_is_audited_as_a_refused_seal(
    mock_manager: Any, audit_capture: CapturingSink, tmp_path: Path
) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"weights" * 1000)
    with pytest.raises(IntegrityViolation):
        mock_manager.seal_file(path, expected_sha256=hashlib.sha256(b"other").hexdigest())
    (event,) = audit_capture.of_type("vram.seal_refused")
    assert event.reason == "sha256_mismatch"  # type: ignore[attr-defined]
    assert "vram.allocation_failed" not in audit_capture.types()


def test_a_malformed_safetensors_file_is_audited_as_a_refused_seal(
    mock_manager: Any, audit_capture: CapturingSink, tmp_path: Path
) -> None:
    path = tmp_path / "bad.safetensors"
    header = b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}'
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(5))  # one byte too many
    with pytest.raises(IntegrityViolation) as info:
        mock_manager.seal_file(path)
    assert info.value.reason == "malformed_file"
    assert [e.reason for e in audit_capture.of_type("vram.seal_refused")] == ["malformed_file"]  # type: ignore[attr-defined]
