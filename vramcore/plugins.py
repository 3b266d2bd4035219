"""Plugin manager factory, plugin discovery and backend selection.

:func:`get_plugin_manager` builds a fresh manager every call (there is no module-global one):
it adds the hook specs, registers the core's defaults, then loads the ``vramcore`` entry points
one by one. A plugin that fails to import, or that defines an unknown ``vramcore_*`` hook, is
reported (a warning, and in :attr:`VramcorePluginManager.failures`, which ``vramcore plugins``
prints) and skipped; with ``strict=True`` (or ``VRAMCORE_STRICT_PLUGINS=1``) it is fatal.

Environment:

``VRAMCORE_PLUGINS``
    Comma-separated allowlist of entry-point names to load. Set but empty: load none.
``VRAMCORE_DISABLE_PLUGINS``
    Comma-separated entry-point names never to load (applied after the allowlist).
``VRAMCORE_ALLOCATOR``
    Backend name used when the caller names none.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
import pluggy

from vramcore import _builtin, hookspecs
from vramcore.backend import BackendSpec
from vramcore.errors import BackendUnavailable, ConfigError

__all__ = [
    "ENTRY_POINT_GROUP",
    "PluginFailure",
    "PluginInfo",
    "VramcorePluginManager",
    "collect_backends",
    "get_plugin_manager",
    "select_backend",
]

ENTRY_POINT_GROUP = "vramcore"


@attrs.frozen
class PluginFailure:
    """A plugin that could not be loaded: its entry-point name, distribution and why."""

    name: str
    distribution: str
    error: str


@attrs.frozen
class PluginInfo:
    """A loaded plugin: its entry-point name, distribution, version and the hooks it implements."""

    name: str
    distribution: str
    version: str
    hooks: tuple[str, ...]


class VramcorePluginManager(pluggy.PluginManager):
    """A :class:`pluggy.PluginManager` that remembers what it loaded and what failed."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.failures: list[PluginFailure] = []
        self.loaded: list[PluginInfo] = []

    def register_checked(
        self, plugin: object, name: str | None = None, *, distribution: str = "", version: str = ""
    ) -> str:
        """Register ``plugin`` and reject it (unregistered again) if it has unknown hooks."""
        try:
            registered = self.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:  # a known hook with wrong arguments
            raise ConfigError(f"plugin {name or plugin!r} is invalid: {exc}") from None
        if registered is None:
            raise ConfigError(f"plugin {name or plugin!r} is blocked or already registered")
        unknown = [
            hook
            for hook in dir(plugin)
            if hook.startswith("vramcore_") and not hasattr(hookspecs, hook)
        ]
        if unknown:
            self.unregister(plugin)
            raise ConfigError(
                f"plugin {registered} implements unknown hook(s) {', '.join(sorted(unknown))}; "
                f"known hooks: {', '.join(_known_hooks())}"
            )
        hooks = tuple(sorted(c.name for c in self.get_hookcallers(plugin) or ()))
        self.loaded.append(PluginInfo(registered, distribution, version, hooks))
        return registered


def _known_hooks() -> list[str]:
    return sorted(n for n in dir(hookspecs) if n.startswith("vramcore_"))


def _names(value: str | None) -> set[str] | None:
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


def get_plugin_manager(
    plugins: Iterable[object] = (),
    *,
    load_entrypoints: bool = True,
    strict: bool | None = None,
    env: Mapping[str, str] | None = None,
) -> VramcorePluginManager:
    """Build a plugin manager.

    :param plugins: plugin objects to register directly (tests compose mocks this way). An
        unknown hook in one of these always raises :class:`ConfigError`.
    :param load_entrypoints: load plugins installed under the ``vramcore`` entry-point group.
    :param strict: make a broken installed plugin fatal; default from
        ``VRAMCORE_STRICT_PLUGINS``.
    :param env: environment to read (default ``os.environ``).
    """
    env = os.environ if env is None else env
    if strict is None:
        strict = env.get("VRAMCORE_STRICT_PLUGINS", "") not in ("", "0", "false")
    pm = VramcorePluginManager()
    pm.add_hookspecs(hookspecs)
    pm.register(_builtin, name="vramcore.builtin")
    for plugin in plugins:
        name = getattr(plugin, "__name__", None) or f"{type(plugin).__name__}-{id(plugin):x}"
        pm.register_checked(plugin, name=name)
    if load_entrypoints:
        _load_entrypoints(pm, env, strict=strict)
    return pm


def _load_entrypoints(pm: VramcorePluginManager, env: Mapping[str, str], *, strict: bool) -> None:
    allow = _names(env.get("VRAMCORE_PLUGINS"))
    deny = _names(env.get("VRAMCORE_DISABLE_PLUGINS")) or set()
    eps = sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
    for ep in eps:
        if (allow is not None and ep.name not in allow) or ep.name in deny:
            continue
        if pm.has_plugin(ep.name):
            continue
        dist = ep.dist.name if ep.dist is not None else "?"
        version = ep.dist.version if ep.dist is not None else "?"
        try:
            plugin = ep.load()
            if pm.is_registered(plugin):  # also passed directly (tests compose this way)
                continue
            pm.register_checked(plugin, name=ep.name, distribution=dist, version=version)
        except Exception as exc:
            failure = PluginFailure(ep.name, dist, f"{type(exc).__name__}: {exc}")
            if strict:
                raise ConfigError(
                    f"plugin {ep.name} ({dist}) failed to load: {failure.error}"
                ) from exc
            pm.failures.append(failure)
            warnings.warn(
                f"vramcore plugin {ep.name!r} ({dist}) was skipped: {failure.error}",
                RuntimeWarning,
                stacklevel=2,
            )


def collect_backends(pm: pluggy.PluginManager) -> dict[str, BackendSpec]:
    """All backends the plugins offer, by name. Duplicate names are a :class:`ConfigError`."""
    found: dict[str, BackendSpec] = {}
    results: list[Sequence[BackendSpec]] = pm.hook.vramcore_allocator_backends()
    for specs in results:
        for spec in specs:
            if not isinstance(spec, BackendSpec):
                raise ConfigError(f"a plugin offered {type(spec).__name__}, not a BackendSpec")
            if spec.name in found:
                raise ConfigError(
                    f"two plugins offer an allocator backend named {spec.name!r}; "
                    "uninstall one or disable it with VRAMCORE_DISABLE_PLUGINS"
                )
            found[spec.name] = spec
    return found


def select_backend(
    pm: pluggy.PluginManager, name: str | None = None, *, env: Mapping[str, str] | None = None
) -> BackendSpec:
    """Choose a backend: ``name`` > ``VRAMCORE_ALLOCATOR`` > the highest-priority viable one.

    :raises BackendUnavailable: the name is unknown (the message lists the choices), the named
        backend cannot run here (the message says why and what to install), or none is viable.
    """
    env = os.environ if env is None else env
    backends = collect_backends(pm)
    choices = sorted(backends)
    wanted = name or env.get("VRAMCORE_ALLOCATOR") or None
    if wanted is not None:
        source = "allocator" if name else "VRAMCORE_ALLOCATOR"
        spec = backends.get(wanted)
        if spec is None:
            raise BackendUnavailable(
                f"unknown {source} {wanted!r}; choose one of: {', '.join(choices) or '(none)'}"
                f"{_install_advice(backends)}{_plugin_hint(wanted)}",
                choices=choices,
            )
        reason = spec.why_not()
        if reason is not None:
            hint = f"; {spec.install_hint}" if spec.install_hint else ""
            raise BackendUnavailable(
                f"allocator {wanted!r} cannot run here: {reason}{hint}", choices=choices
            )
        return spec
    reasons: list[str] = []
    for spec in sorted(backends.values(), key=lambda s: (-s.priority, s.name)):
        reason = spec.why_not()
        if reason is None:
            return spec
        reasons.append(f"{spec.name}: {reason}")
    detail = "; ".join(reasons) if reasons else "no allocator plugin is installed"
    raise BackendUnavailable(
        f"no viable allocator backend ({detail}){_install_advice(backends)}", choices=choices
    )


def _plugin_hint(name: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,40}", name):
        return ""
    return (
        f". Backends come from plugins: for {name!r}, install its plugin "
        f"(by convention: pip install vramcore-allocator-{name})"
    )


def _install_advice(backends: Mapping[str, Any]) -> str:
    if backends:
        return ""
    return (
        ". Install one: vramcore-allocator-cupy or vramcore-allocator-pycuda for a GPU, "
        "vramcore-allocator-mock for tests"
    )
