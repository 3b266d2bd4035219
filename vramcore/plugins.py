"""Plugin manager factory, plugin discovery and backend selection.

:func:`get_plugin_manager` builds a fresh manager every call (there is no module-global one):
it adds the hook specs, registers the core's defaults, then loads the ``vramcore`` entry points
one by one. A plugin that fails to import (whatever it raises, ``SystemExit`` and
``KeyboardInterrupt`` included), or that defines an unknown or misspelt ``vramcore_*`` hook
(found by pluggy's ``check_pending()``; every ``vramcore_*`` function counts as a hook
implementation, marked or not), is reported (a warning, and in
:attr:`VramcorePluginManager.failures`, which ``vramcore plugins`` prints) and skipped; with
``strict=True`` (or ``VRAMCORE_STRICT_PLUGINS=1``) it is fatal. Two distributions registering
the same entry-point name are both skipped and reported, until one is chosen.

Environment:

``VRAMCORE_PLUGINS``
    Comma-separated allowlist of plugins to load: an entry-point name (``mock``) or
    ``distribution:entry-point`` (``vramcore-allocator-mock:mock``) to pick one of two
    distributions that use the same name. Set but empty: load none.
``VRAMCORE_DISABLE_PLUGINS``
    Comma-separated plugins never to load, in the same syntax (applied after the allowlist).
``VRAMCORE_ALLOCATOR``
    Backend name used when the caller names none.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from types import ModuleType
from typing import Any

import attrs
import pluggy

from vramcore import _builtin, hookspecs
from vramcore.backend import BackendSpec
from vramcore.errors import BackendUnavailable, ConfigError
from vramcore.validation import escape_text, safe_repr

__all__ = [
    "ENTRY_POINT_GROUP",
    "INSTALL_ADVICE",
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

    def parse_hookimpl_opts(self, plugin: object, name: str) -> Any:
        """Treat every ``vramcore_*`` function as a hook implementation, marked or not.

        So a misspelt hook (``vramcore_allocator_backend``) is not silently ignored as a
        plain function: :meth:`check_pending` reports it, as pytest does for ``pytest_*``.
        """
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name.startswith("vramcore_") and callable(getattr(plugin, name, None)):
            return {}
        return opts

    def register_checked(
        self, plugin: object, name: str | None = None, *, distribution: str = "", version: str = ""
    ) -> str:
        """Register ``plugin`` and reject it (unregistered again) if it has unknown hooks."""
        try:
            registered = self.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:  # a known hook with wrong arguments
            raise ConfigError(
                f"plugin {escape_text(str(name or plugin))} is invalid: {escape_text(str(exc))}"
            ) from None
        if registered is None:
            raise ConfigError(f"plugin {name or plugin!r} is blocked or already registered")
        try:
            self.check_pending()
        except pluggy.PluginValidationError:
            unknown = sorted(c.name for c in self.get_hookcallers(plugin) or () if c.spec is None)
            self.unregister(plugin)
            raise ConfigError(
                f"plugin {registered} implements unknown hook(s) "
                f"{', '.join(_suggest(h) for h in unknown)}; "
                f"known hooks: {', '.join(_known_hooks())}"
            ) from None
        hooks = tuple(sorted(c.name for c in self.get_hookcallers(plugin) or ()))
        self.loaded.append(PluginInfo(registered, distribution, version, hooks))
        return registered


def _known_hooks() -> list[str]:
    return sorted(n for n in dir(hookspecs) if n.startswith("vramcore_"))


def _suggest(hook: str) -> str:
    close = difflib.get_close_matches(hook, _known_hooks(), n=1)
    shown = escape_text(hook)
    return f"{shown} (did you mean {close[0]}?)" if close else shown


def _names(value: str | None) -> set[str] | None:
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


def _normalise(distribution: str) -> str:
    """PEP 503 name normalisation: ``Vramcore_Allocator.Mock`` -> ``vramcore-allocator-mock``."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _selected(names: set[str], entry_point: str, distribution: str) -> bool:
    """Whether ``names`` (from an environment variable) picks this entry point."""
    if entry_point in names:
        return True
    return any(
        ":" in n
        and _normalise(n.split(":", 1)[0]) == _normalise(distribution)
        and n.split(":", 1)[1] == entry_point
        for n in names
    )


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
    installed = _entry_point_modules() if any(isinstance(p, ModuleType) for p in plugins) else {}
    for plugin in plugins:
        # An installed plugin module passed directly keeps its entry-point name: its name is
        # the scope of its keys (SinkContext.derive_key), the same in tests and in production.
        name = installed.get(plugin.__name__) if isinstance(plugin, ModuleType) else None
        name = (
            name or getattr(plugin, "__name__", None) or f"{type(plugin).__name__}-{id(plugin):x}"
        )
        pm.register_checked(plugin, name=name)
    if load_entrypoints:
        _load_entrypoints(pm, env, strict=strict)
    return pm


def _entry_point_modules() -> dict[str, str]:
    """Module name -> entry-point name, for installed plugins whose entry point is a module."""
    found: dict[str, str] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ":" not in ep.value:
            found.setdefault(ep.value.strip(), ep.name)
    return found


def _dist_of(ep: Any) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "?", "?"
    return str(dist.name), str(dist.version)


def _load_entrypoints(pm: VramcorePluginManager, env: Mapping[str, str], *, strict: bool) -> None:
    allow = _names(env.get("VRAMCORE_PLUGINS"))
    deny = _names(env.get("VRAMCORE_DISABLE_PLUGINS")) or set()
    by_name: dict[str, list[Any]] = {}
    seen: set[tuple[str, str, str]] = set()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist, _version = _dist_of(ep)
        key = (ep.name, _normalise(dist), ep.value)
        if key in seen:  # the same distribution found twice on sys.path
            continue
        seen.add(key)
        if allow is not None and not _selected(allow, ep.name, dist):
            continue
        if _selected(deny, ep.name, dist):
            continue
        by_name.setdefault(ep.name, []).append(ep)
    for name in sorted(by_name):
        candidates = by_name[name]
        if len(candidates) > 1:
            _report_collision(pm, name, candidates, strict=strict)
            continue
        _load_one(pm, candidates[0], strict=strict)


def _report_collision(
    pm: VramcorePluginManager, name: str, candidates: list[Any], *, strict: bool
) -> None:
    dists = sorted(_dist_of(ep)[0] for ep in candidates)
    choices = " or ".join(f"VRAMCORE_PLUGINS={d}:{name}" for d in dists)
    error = (
        f"entry point name {name!r} is registered by {len(dists)} distributions "
        f"({', '.join(dists)}); none was loaded: uninstall one, or choose with {choices}"
    )
    if strict:
        raise ConfigError(f"plugin {escape_text(error)}")
    pm.failures.append(PluginFailure(name, ", ".join(dists), escape_text(error)))
    warnings.warn(f"vramcore plugin {escape_text(error)}", RuntimeWarning, stacklevel=3)


def _load_one(pm: VramcorePluginManager, ep: Any, *, strict: bool) -> None:
    if pm.has_plugin(ep.name):
        return
    dist, version = _dist_of(ep)
    try:
        plugin = ep.load()
        if pm.is_registered(plugin):  # also passed directly (tests compose this way)
            return
        pm.register_checked(plugin, name=ep.name, distribution=dist, version=version)
    except BaseException as exc:
        # SystemExit or KeyboardInterrupt raised while a plugin imports is the plugin's
        # failure, not a request to stop: the plugin is skipped, the process goes on.
        text = escape_text(str(exc))[:300]
        failure = PluginFailure(ep.name, dist, f"{type(exc).__name__}: {text}")
        if strict:
            raise ConfigError(
                f"plugin {ep.name} ({dist}) failed to load: {failure.error}"
            ) from None
        pm.failures.append(failure)
        warnings.warn(
            f"vramcore plugin {ep.name!r} ({dist}) was skipped: {failure.error}",
            RuntimeWarning,
            stacklevel=3,
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
    pm: pluggy.PluginManager,
    name: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    source: str = "allocator",
) -> BackendSpec:
    """Choose a backend: ``name`` > ``VRAMCORE_ALLOCATOR`` > the highest-priority viable one.

    :param source: what the caller called ``name`` (``"--allocator"`` in the CLI), for messages.

    :raises BackendUnavailable: the name is unknown (the message lists the choices), the named
        backend cannot run here (the message says why and what to install), or none is viable.
    """
    env = os.environ if env is None else env
    backends = collect_backends(pm)
    choices = sorted(backends)
    wanted = name or env.get("VRAMCORE_ALLOCATOR") or None
    if wanted is not None:
        source = source if name else "VRAMCORE_ALLOCATOR"
        spec = backends.get(wanted)
        if spec is None:
            raise BackendUnavailable(
                f"unknown {source} {safe_repr(wanted)}; choose one of: "
                f"{', '.join(choices) or '(none)'}{_install_advice(backends)}",
                choices=choices,
            )
        reason = spec.why_not()
        if reason is not None:
            hint = f"; {escape_text(spec.install_hint)}" if spec.install_hint else ""
            raise BackendUnavailable(
                f"{source} {wanted!r} cannot run here: {escape_text(reason)}{hint}",
                choices=choices,
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


#: Where backends come from, said without naming a package index entry this project does
#: not publish (anyone could register such a name).
INSTALL_ADVICE = (
    "backends come from plugins: from a clone of the vramcore repository, "
    "`pip install ./ ./plugins/allocator_mock` installs the core and the mock backend "
    "(README: Install); `vramcore plugins` lists what is installed"
)


def _install_advice(backends: Mapping[str, Any]) -> str:
    return f". {INSTALL_ADVICE}" if not backends else ""
