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

Identity: a plugin loaded from an entry point is known by its distribution and entry-point
name together (``vramcore-audit-chain:audit_chain``, see :meth:`VramcorePluginManager.identity`);
the core derives the plugin's keys from that identity, so a plugin of another distribution
cannot take a name over. One plugin object reachable through several entry points (an alias
another distribution registers for an installed plugin) is loaded under none of them and
reported: loading it under the alias would rename its key scope.
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
from vramcore._hookutil import BUILTIN_PLUGIN, implementers
from vramcore.backend import AllocatorBackend, BackendSpec, DeviceInfo
from vramcore.errors import BackendUnavailable, ConfigError
from vramcore.validation import escape_text, safe_repr

__all__ = [
    "ENTRY_POINT_GROUP",
    "INSTALL_ADVICE",
    "PluginFailure",
    "PluginInfo",
    "VramcorePluginManager",
    "built_backend",
    "collect_backends",
    "get_plugin_manager",
    "plugin_identity",
    "probe_devices",
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
        self._identities: dict[str, str] = {}

    def record_failure(self, name: str, distribution: str, error: str) -> None:
        """List a plugin's failure (``vramcore plugins`` shows it); ``error`` is shown as is."""
        self.failures.append(PluginFailure(name, distribution, error))

    def identity(self, name: str) -> str:
        """The identity of the plugin registered as ``name``: ``distribution:entry-point``.

        The core derives a plugin's keys from it. For a plugin object passed directly that no
        installed entry point names, the distribution part is empty (``:name``).
        """
        return self._identities.get(name, f":{name}")

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
        self._identities[registered] = plugin_identity(distribution, registered)
        return registered


def _known_hooks() -> list[str]:
    return sorted(n for n in dir(hookspecs) if n.startswith("vramcore_"))


def _suggest(hook: str) -> str:
    close = difflib.get_close_matches(hook, _known_hooks(), n=1)
    shown = escape_text(hook)
    return f"{shown} (did you mean {close[0]}?)" if close else shown


def plugin_identity(distribution: str, entry_point: str) -> str:
    """A plugin's identity: its normalised distribution name and entry-point name.

    ``plugin_identity("Vramcore_Audit.Chain", "audit_chain")`` is
    ``"vramcore-audit-chain:audit_chain"``.
    An auditor re-derives a plugin's keys offline with it
    (:meth:`vramcore.audit.SinkContext.from_token`).
    """
    return f"{_normalise(distribution)}:{entry_point}"


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


#: The environment variables plugin loading and backend selection read (and no others: a
#: frame holding this snapshot shows no secret, as one holding ``os.environ`` would).
_PLUGIN_ENV = (
    "VRAMCORE_PLUGINS",
    "VRAMCORE_DISABLE_PLUGINS",
    "VRAMCORE_STRICT_PLUGINS",
    "VRAMCORE_ALLOCATOR",
)


def _plugin_env(env: Mapping[str, str] | None) -> dict[str, str]:
    source = os.environ if env is None else env
    return {k: source[k] for k in _PLUGIN_ENV if k in source}


def get_plugin_manager(
    plugins: Iterable[object] = (),
    *,
    load_entrypoints: bool = True,
    strict: bool | None = None,
    env: Mapping[str, str] | None = None,
) -> VramcorePluginManager:
    """Build a plugin manager.

    :param plugins: plugin objects to register directly (tests compose mocks this way). An
        unknown hook in one of these always raises :class:`ConfigError`. An installed plugin
        module passed this way keeps its identity (distribution and entry-point name), so
        tests and production derive the same keys.
    :param load_entrypoints: load plugins installed under the ``vramcore`` entry-point group.
    :param strict: make a broken installed plugin fatal; default from
        ``VRAMCORE_STRICT_PLUGINS``.
    :param env: environment to read (default ``os.environ``).
    """
    settings = _plugin_env(env)
    if strict is None:
        strict = settings.get("VRAMCORE_STRICT_PLUGINS", "") not in ("", "0", "false")
    pm = VramcorePluginManager()
    pm.add_hookspecs(hookspecs)
    pm.register(_builtin, name=BUILTIN_PLUGIN)
    installed = _entry_point_modules() if any(isinstance(p, ModuleType) for p in plugins) else {}
    for plugin in plugins:
        found = installed.get(plugin.__name__) if isinstance(plugin, ModuleType) else None
        if found is not None:
            pm.register_checked(plugin, name=found[1], distribution=found[0])
            continue
        name = getattr(plugin, "__name__", None) or f"{type(plugin).__name__}-{id(plugin):x}"
        pm.register_checked(plugin, name=name)
    if load_entrypoints:
        _load_entrypoints(pm, settings, strict=strict)
    return pm


def _entry_point_modules() -> dict[str, tuple[str, str]]:
    """Module name -> (distribution, entry-point name), for installed plugins whose entry
    point is a module and is the only entry point naming that module."""
    found: dict[str, set[tuple[str, str]]] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ":" not in ep.value:
            found.setdefault(ep.value.strip(), set()).add((_dist_of(ep)[0], ep.name))
    return {module: next(iter(eps)) for module, eps in found.items() if len(eps) == 1}


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
    loaded: list[tuple[Any, object]] = []
    for name in sorted(by_name):
        candidates = by_name[name]
        if len(candidates) > 1:
            _report_collision(pm, name, candidates, strict=strict)
            continue
        if pm.has_plugin(name):
            continue
        plugin = _import_one(pm, candidates[0], strict=strict)
        if plugin is not None:
            loaded.append((candidates[0], plugin))
    for ep, plugin in _without_aliases(pm, loaded, strict=strict):
        _register_one(pm, ep, plugin, strict=strict)


def _without_aliases(
    pm: VramcorePluginManager, loaded: list[tuple[Any, object]], *, strict: bool
) -> list[tuple[Any, object]]:
    """The loaded entry points whose plugin object no other entry point also names.

    A plugin reachable through two entry points has no single identity: registering it under
    the first name found would let another distribution's alias rename (or take) its key
    scope. Each such plugin is loaded under none of its names and reported.
    """
    by_object: dict[int, list[Any]] = {}
    for ep, plugin in loaded:
        by_object.setdefault(id(plugin), []).append(ep)
    kept = []
    for ep, plugin in loaded:
        names = by_object[id(plugin)]
        if len(names) == 1 or pm.is_registered(plugin):
            kept.append((ep, plugin))
            continue
        if ep is not names[0]:
            continue  # reported once, with the first
        shown = ", ".join(f"{_normalise(_dist_of(e)[0])}:{e.name}" for e in names)
        error = (
            f"one plugin is registered under {len(names)} entry points ({shown}); none was "
            "loaded, since an alias would rename its key scope: uninstall the alias or disable "
            f"it with VRAMCORE_DISABLE_PLUGINS=distribution:name"
        )
        if strict:
            raise ConfigError(f"plugin {escape_text(error)}")
        pm.failures.append(PluginFailure(ep.name, shown, escape_text(error)))
        warnings.warn(f"vramcore plugin {escape_text(error)}", RuntimeWarning, stacklevel=4)
    return kept


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


def _import_one(pm: VramcorePluginManager, ep: Any, *, strict: bool) -> object | None:
    try:
        plugin: object = ep.load()
    except BaseException as exc:
        # SystemExit or KeyboardInterrupt raised while a plugin imports is the plugin's
        # failure, not a request to stop: the plugin is skipped, the process goes on.
        _skip(pm, ep, exc, strict=strict)
        return None
    return plugin


def _register_one(pm: VramcorePluginManager, ep: Any, plugin: object, *, strict: bool) -> None:
    if pm.is_registered(plugin):  # also passed directly (tests compose this way)
        return
    dist, version = _dist_of(ep)
    try:
        pm.register_checked(plugin, name=ep.name, distribution=dist, version=version)
    except BaseException as exc:
        _skip(pm, ep, exc, strict=strict)


def _skip(pm: VramcorePluginManager, ep: Any, exc: BaseException, *, strict: bool) -> None:
    dist, _version = _dist_of(ep)
    text = escape_text(str(exc))[:300]
    failure = PluginFailure(ep.name, dist, f"{type(exc).__name__}: {text}")
    if strict:
        raise ConfigError(f"plugin {ep.name} ({dist}) failed to load: {failure.error}") from None
    pm.failures.append(failure)
    warnings.warn(
        f"vramcore plugin {ep.name!r} ({dist}) was skipped: {failure.error}",
        RuntimeWarning,
        stacklevel=4,
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

    A backend whose memory is host RAM (:attr:`BackendSpec.host_memory`: the mock) is chosen
    only when named; it never stands in for a GPU backend that cannot run.

    :param source: what the caller called ``name`` (``"--allocator"`` in the CLI), for messages.

    :raises BackendUnavailable: the name is unknown (the message lists the choices), the named
        backend cannot run here (the message says why and what to install), or no GPU
        backend is viable (the message names each backend tried and why it cannot run).
    """
    settings = _plugin_env(env)
    backends = collect_backends(pm)
    choices = sorted(backends)
    wanted = name or settings.get("VRAMCORE_ALLOCATOR") or None
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
        if spec.host_memory:
            continue
        reason = spec.why_not()
        if reason is None:
            return spec
        reasons.append(f"{spec.name}: {escape_text(reason)}")
    named_only = sorted(s.name for s in backends.values() if s.host_memory)
    if named_only:
        first = named_only[0]
        reasons.append(
            f"{', '.join(named_only)}: host memory, never chosen unless named "
            f"(--allocator {first}, allocator={first!r} or VRAMCORE_ALLOCATOR={first})"
        )
    detail = "; ".join(reasons) if reasons else "no allocator plugin is installed"
    raise BackendUnavailable(
        f"no GPU allocator backend can run here ({detail}){_install_advice(backends)}",
        choices=choices,
    )


def built_backend(spec: BackendSpec) -> AllocatorBackend:
    """``spec.factory()``, checked: a plugin's factory that builds something else is a
    :class:`ConfigError` naming the backend (never an ``AttributeError`` later)."""
    backend = spec.factory()
    if not isinstance(backend, AllocatorBackend):
        raise ConfigError(
            f"the plugin offering backend {escape_text(spec.name)} built a "
            f"{type(backend).__name__}, not an AllocatorBackend"
        )
    return backend


def probe_devices(pm: pluggy.PluginManager, backend: AllocatorBackend) -> list[DeviceInfo]:
    """The devices of ``backend`` as the probe hook describes them, checked.

    :raises ConfigError: the hook (or the backend itself) answered something that is not a
        list of :class:`~vramcore.backend.DeviceInfo`; the message names the plugins.
    """
    devices = pm.hook.vramcore_probe_devices(backend=backend)
    if not isinstance(devices, list | tuple) or not all(isinstance(d, DeviceInfo) for d in devices):
        raise ConfigError(
            f"the device probe ({implementers(pm.hook.vramcore_probe_devices)}, backend "
            f"{escape_text(str(backend.name))}) returned {type(devices).__name__}, "
            "not a list of DeviceInfo"
        )
    return list(devices)


#: Where backends come from, said without naming a package index entry this project does
#: not publish (anyone could register such a name).
INSTALL_ADVICE = (
    "backends come from plugins: from a clone of the vramcore repository, "
    "`pip install ./ ./plugins/allocator_mock` installs the core and the mock backend "
    "(README: Install); `vramcore plugins` lists what is installed"
)


def _install_advice(backends: Mapping[str, Any]) -> str:
    return f". {INSTALL_ADVICE}" if not backends else ""
