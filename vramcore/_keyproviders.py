"""Where the worker token and the seal key come from.

The worker token is read from exactly one place the operator chose, and wrapped
(:class:`~vramcore.seal.SecretValue`, then :class:`~vramcore.seal.WorkerToken`) the moment it
is read, so no traceback that captures local variables shows it:

``VRAMCORE_WORKER_TOKEN``
    The token itself.
``VRAMCORE_WORKER_TOKEN_FILE``
    A file holding the token (one trailing newline is ignored). It must be a regular file
    (not a link, a pipe or a device) owned by the user running the worker and readable by
    nobody else (``chmod 600``); anything else is refused, saying why.
``VRAMCORE_WORKER_TOKEN_KEYRING``
    ``SERVICE`` or ``SERVICE:USERNAME`` (default user name ``worker-token``): the token is read
    from the system keyring (the optional ``keyring`` package: the ``keyring`` extra,
    ``pip install './[keyring]'`` from a clone), e.g. stored with
    ``keyring set SERVICE worker-token``.

Setting more than one is refused. The seal key is derived from the token by the core
(HKDF-SHA256, :data:`~vramcore.seal.SEAL_KEY_INFO`) unless the operator names a key-provider
plugin (``VramManager(seal_key_provider=...)`` or ``VRAMCORE_SEAL_KEY_PROVIDER``): only that
plugin's :func:`~vramcore.hookspecs.vramcore_seal_key` is then asked, through a hook caller
holding that plugin alone (no other plugin's wrapper runs around it or sees the key), and
never with the token.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from typing import Any

from vramcore.errors import ConfigError
from vramcore.seal import SEAL_KEY_INFO, TOKEN_ADVICE, SecretKey, SecretValue, WorkerToken
from vramcore.validation import escape_text

__all__ = [
    "KEYRING_USERNAME",
    "SEAL_KEY_PROVIDER_ENV",
    "TOKEN_ENV",
    "TOKEN_FILE_ENV",
    "TOKEN_KEYRING_ENV",
    "TOKEN_SOURCES",
    "read_worker_token",
    "seal_key",
]

TOKEN_ENV = "VRAMCORE_WORKER_TOKEN"  # noqa: S105 - the variable's name, not a token
TOKEN_FILE_ENV = "VRAMCORE_WORKER_TOKEN_FILE"  # noqa: S105
TOKEN_KEYRING_ENV = "VRAMCORE_WORKER_TOKEN_KEYRING"  # noqa: S105
#: Every place a worker token may come from, by the variable that selects it.
TOKEN_SOURCES = (TOKEN_ENV, TOKEN_FILE_ENV, TOKEN_KEYRING_ENV)
SEAL_KEY_PROVIDER_ENV = "VRAMCORE_SEAL_KEY_PROVIDER"
#: The keyring user name used when ``VRAMCORE_WORKER_TOKEN_KEYRING`` names only a service.
KEYRING_USERNAME = "worker-token"
#: A token file larger than this is not a token file.
_MAX_TOKEN_FILE = 4096


def read_worker_token(env: Mapping[str, str] | None = None) -> WorkerToken | None:
    """The worker token from the one source the operator set, or ``None`` when none is set.

    :param env: the environment (default ``os.environ``; read, never kept).
    :raises ConfigError: more than one source is set, the token file is unsafe or unreadable,
        or the keyring holds no token (or is not installed).
    :raises InvalidInput: the token is too weak (the message says how to make one).
    """
    # No local of this frame ever holds the environment or the raw token: each value goes
    # from the environment straight into its wrapper.
    chosen = [name for name in TOKEN_SOURCES if _setting(env, name)]
    if len(chosen) > 1:
        raise ConfigError(f"set only one of {', '.join(chosen)}: they all give the worker token")
    if not chosen:
        return None
    if chosen[0] == TOKEN_ENV:
        return WorkerToken(SecretValue(_setting(env, TOKEN_ENV)), source=TOKEN_ENV)
    if chosen[0] == TOKEN_FILE_ENV:
        return WorkerToken(_read_token_file(_setting(env, TOKEN_FILE_ENV)), source=TOKEN_FILE_ENV)
    return WorkerToken(_read_keyring(_setting(env, TOKEN_KEYRING_ENV)), source=TOKEN_KEYRING_ENV)


def _setting(env: Mapping[str, str] | None, name: str) -> str:
    return (os.environ if env is None else env).get(name, "")


def _read_token_file(path: str) -> SecretValue:
    """The token in ``path``, wrapped; the file must be the user's and nobody else's."""
    shown = escape_text(path)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ConfigError(
            f"{TOKEN_FILE_ENV}={shown} cannot be opened ({exc.strerror or type(exc).__name__}); "
            "it must be a regular file, not a symbolic link"
        ) from None
    try:
        info = os.fstat(fd)
        problem = _file_problem(info)
        if problem is not None:
            raise ConfigError(
                f"{TOKEN_FILE_ENV}={shown} {problem}; the file must be a regular file of "
                f"this user with mode 600 ({TOKEN_ADVICE})"
            )
        data = SecretValue(os.read(fd, _MAX_TOKEN_FILE + 1))
    finally:
        os.close(fd)
    if len(data._value) > _MAX_TOKEN_FILE:  # type: ignore[arg-type]
        raise ConfigError(f"{TOKEN_FILE_ENV}={shown} is larger than a token file can be")
    return _strip_newline(data)


def _file_problem(info: os.stat_result) -> str | None:
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        return f"is owned by uid {info.st_uid}, not by this user (uid {os.getuid()})"
    if info.st_mode & 0o077:
        return (
            f"is readable or writable by others (mode {stat.S_IMODE(info.st_mode):03o}): "
            "chmod 600 it"
        )
    if info.st_size > _MAX_TOKEN_FILE:
        return f"is {info.st_size} bytes: a token file holds one token"
    return None


def _strip_newline(data: SecretValue) -> SecretValue:
    """``data`` without one trailing newline (this never raises: no traceback shows it)."""
    raw = data._value
    if not isinstance(raw, bytes):
        return data
    if raw.endswith(b"\r\n"):
        return SecretValue(raw[:-2])
    if raw.endswith(b"\n"):
        return SecretValue(raw[:-1])
    return data


def _read_keyring(spec: str) -> SecretValue:
    """The token the system keyring holds for ``SERVICE[:USERNAME]``, wrapped."""
    service, _, username = spec.partition(":")
    username = username or KEYRING_USERNAME
    shown = f"{escape_text(service)}:{escape_text(username)}"
    try:
        import keyring  # type: ignore[import-not-found,unused-ignore]  # optional extra
    except ImportError:
        raise ConfigError(
            f"{TOKEN_KEYRING_ENV} is set but the keyring package is not installed: "
            "from a clone of the vramcore repository, pip install './[keyring]' "
            "(or pip install keyring)"
        ) from None
    try:
        value = SecretValue(keyring.get_password(service, username))
    except Exception as exc:  # the backend's own error (locked, no backend): say which
        raise ConfigError(
            f"the system keyring could not give the worker token for {shown}: "
            f"{type(exc).__name__}: {escape_text(str(exc))[:200]}"
        ) from None
    if value._value is None:
        raise ConfigError(
            f"the system keyring holds no worker token for {shown}: store one with "
            f"`keyring set {escape_text(service)} {escape_text(username)}` ({TOKEN_ADVICE})"
        )
    return value


def seal_key(
    pm: Any,
    token: WorkerToken,
    worker_id: str,
    provider: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> SecretKey:
    """The seal key: derived from ``token``, or from the key provider the operator named.

    :param pm: the plugin manager.
    :param provider: the key-provider plugin's name (its entry-point name, or
        ``distribution:entry-point``); default ``VRAMCORE_SEAL_KEY_PROVIDER``; none: the
        core derives the key from the token itself and asks no plugin.
    :raises ConfigError: the named provider is not installed, fails, or returns something
        that is not a :class:`~vramcore.seal.SecretKey` (the message names it).
    """
    name = provider or (os.environ if env is None else env).get(SEAL_KEY_PROVIDER_ENV) or None
    if name is None:
        return token.derive(SEAL_KEY_INFO)
    impl = _provider(pm, name)
    # Only the named plugin's implementations run: no other plugin's wrapper sees the key.
    others = [p for p in pm.get_plugins() if p is not impl.plugin]
    only_provider = pm.subset_hook_caller("vramcore_seal_key", remove_plugins=others)
    try:
        key = only_provider(worker_id=worker_id)
    except Exception as exc:
        raise ConfigError(
            f"seal key provider {escape_text(name)} failed: {type(exc).__name__}: "
            f"{escape_text(str(exc))[:200]}; the manager did not start"
        ) from None
    if not isinstance(key, SecretKey):
        raise ConfigError(
            f"seal key provider {escape_text(name)} returned {type(key).__name__}, not a "
            "SecretKey; the manager did not start"
        )
    return key


def _provider(pm: Any, name: str) -> Any:
    """The named plugin's own (not wrapper) implementation of ``vramcore_seal_key``."""
    identity = getattr(pm, "identity", lambda plugin: f":{plugin}")
    impls = [
        impl
        for impl in pm.hook.vramcore_seal_key.get_hookimpls()
        if not (impl.wrapper or impl.hookwrapper)
    ]
    for impl in impls:
        if name in (impl.plugin_name, identity(impl.plugin_name)):
            return impl
    offered = ", ".join(sorted(impl.plugin_name for impl in impls)) or "none installed"
    raise ConfigError(
        f"seal key provider {escape_text(name)!r} was named ({SEAL_KEY_PROVIDER_ENV} or "
        f"seal_key_provider=) but no plugin of that name provides a seal key "
        f"(providers: {offered})"
    )
