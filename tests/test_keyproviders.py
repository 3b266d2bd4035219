"""Where the worker token comes from: the environment, a token file, the system keyring."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

from vramcore._keyproviders import read_worker_token
from vramcore.errors import ConfigError, InvalidInput
from vramcore.seal import WorkerToken
from vramcore.testing import TEST_TOKEN

FINGERPRINT = WorkerToken(TEST_TOKEN).fingerprint


def _token_file(tmp_path: Path, text: str = TEST_TOKEN + "\n", mode: int = 0o600) -> Path:
    path = tmp_path / "token"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_no_source_set_gives_none() -> None:
    assert read_worker_token({}) is None


def test_the_token_from_the_environment() -> None:
    token = read_worker_token({"VRAMCORE_WORKER_TOKEN": TEST_TOKEN})
    assert token is not None and token.fingerprint == FINGERPRINT


def test_the_token_from_a_private_file_without_its_newline(tmp_path: Path) -> None:
    path = _token_file(tmp_path)
    token = read_worker_token({"VRAMCORE_WORKER_TOKEN_FILE": str(path)})
    assert token is not None and token.fingerprint == FINGERPRINT


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o622])
def test_a_token_file_others_can_read_or_write_is_refused(tmp_path: Path, mode: int) -> None:
    path = _token_file(tmp_path, mode=mode)
    with pytest.raises(ConfigError, match=f"mode {mode:03o}.*chmod 600") as info:
        read_worker_token({"VRAMCORE_WORKER_TOKEN_FILE": str(path)})
    assert TEST_TOKEN not in str(info.value)


def test_a_token_file_that_is_a_link_or_not_a_file_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(_token_file(tmp_path))
    with pytest.raises(ConfigError, match="symbolic link"):
        read_worker_token({"VRAMCORE_WORKER_TOKEN_FILE": str(link)})
    with pytest.raises(ConfigError, match="not a regular file"):
        read_worker_token({"VRAMCORE_WORKER_TOKEN_FILE": str(tmp_path)})
    with pytest.raises(ConfigError, match="cannot be opened"):
        read_worker_token({"VRAMCORE_WORKER_TOKEN_FILE": str(tmp_path / "missing")})


@pytest.mark.skipif(os.getuid() != 0, reason="making a file of another user needs root")
def test_a_token_file_of_another_user_is_refused(tmp_path: Path) -> None:
    path = _token_file(tmp_path)
    os.chown(path, 12345, -1)
    with pytest.raises(ConfigError, match="owned by uid 12345"):
        read_worker_token({"VRAMCORE_WORKER_TOKEN_FILE": str(path)})


def test_a_weak_token_in_a_file_is_refused_naming_the_variable(tmp_path: Path) -> None:
    path = _token_file(tmp_path, "passwordpassword1234\n")
    with pytest.raises(InvalidInput, match="VRAMCORE_WORKER_TOKEN_FILE is too easy to guess"):
        read_worker_token({"VRAMCORE_WORKER_TOKEN_FILE": str(path)})


def test_two_sources_at_once_are_refused(tmp_path: Path) -> None:
    env = {"VRAMCORE_WORKER_TOKEN": TEST_TOKEN, "VRAMCORE_WORKER_TOKEN_FILE": str(tmp_path)}
    with pytest.raises(ConfigError, match="set only one of"):
        read_worker_token(env)


@pytest.fixture
def fake_keyring(monkeypatch: pytest.MonkeyPatch) -> dict[tuple[str, str], str]:
    """A stand-in for the keyring package: (service, user name) -> secret."""
    store: dict[tuple[str, str], str] = {}
    module = ModuleType("keyring")
    module.get_password = lambda service, user: store.get((service, user))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "keyring", module)
    return store


def test_the_token_from_the_system_keyring(fake_keyring: dict[tuple[str, str], str]) -> None:
    fake_keyring[("vramcore", "worker-token")] = TEST_TOKEN
    fake_keyring[("svc", "w7")] = TEST_TOKEN
    for spec in ("vramcore", "svc:w7"):
        token = read_worker_token({"VRAMCORE_WORKER_TOKEN_KEYRING": spec})
        assert token is not None and token.fingerprint == FINGERPRINT


def test_an_empty_keyring_entry_says_how_to_store_one(
    fake_keyring: dict[tuple[str, str], str],
) -> None:
    with pytest.raises(ConfigError, match="keyring set vramcore worker-token"):
        read_worker_token({"VRAMCORE_WORKER_TOKEN_KEYRING": "vramcore"})


def test_without_the_keyring_package_it_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "keyring", None)  # import fails
    with pytest.raises(ConfigError, match=r"\./\[keyring\]"):
        read_worker_token({"VRAMCORE_WORKER_TOKEN_KEYRING": "vramcore"})
