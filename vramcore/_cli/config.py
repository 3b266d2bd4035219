"""``vramcore config`` and ``vramcore doctor``: the effective configuration, and what is active.

``config`` prints every declared setting (the core's and each loaded plugin's) with its
effective value and where it came from: a configuration file, an environment variable, an
argument or the default. ``doctor`` says, for each installed allocator backend, audit sink and
witness, whether it is active here and, if not, why and what to do. Neither prints a secret:
the worker token shows as its fingerprint.
"""

from __future__ import annotations

import argparse
from typing import Any

from vramcore._cli.commands import EXIT_OK, Console
from vramcore._config import Configuration, Setting, Value, declared_settings
from vramcore.errors import VramError
from vramcore.plugins import VramcorePluginManager, collect_backends, select_backend
from vramcore.validation import escape_text

__all__ = ["ConfigReport", "Doctor"]

_TRUE = {"1", "true", "yes", "on"}


class ConfigReport:
    """``vramcore config``: the effective value and source of every declared setting.

    :param pm: the loaded plugins (whose settings are listed).
    :param config: the configuration files read.
    """

    def __init__(self, pm: VramcorePluginManager, config: Configuration) -> None:
        self._pm = pm
        self._config = config

    def arguments(self, args: argparse.Namespace) -> dict[str, tuple[str, str]]:
        """The settings given as arguments of this command: key -> (text, argument)."""
        given: dict[str, tuple[str, str]] = {}
        if getattr(args, "allocator", None) is not None:
            given["allocator"] = (args.allocator, "--allocator")
        return given

    def values(self, args: argparse.Namespace) -> list[Value]:
        """Every setting's effective value."""
        return self._config.resolve(declared_settings(self._pm), self.arguments(args))

    def run(self, args: argparse.Namespace, console: Console) -> int:
        """Print the configuration; exit 0."""
        values = self.values(args)
        files = [str(path) for path in self._config.files]
        lines = [f"files read: {', '.join(files)}" if files else _NO_FILE]
        plugin = None
        for value in sorted(values, key=lambda v: (v.plugin != "vramcore", v.plugin)):
            if value.plugin != plugin:
                plugin = value.plugin
                lines.append(f"{plugin}:")
            lines.append(f"  {value.setting.key:<26} {value.shown():<34} {_source(value)}".rstrip())
        console.result(
            {"files": files, "settings": [value.to_dict() for value in values]}, "\n".join(lines)
        )
        return EXIT_OK


#: What to do when no backend runs without being named.
_NO_BACKEND_FIX = (
    "a GPU backend needs an NVIDIA GPU and its driver on this machine (`nvidia-smi` lists "
    "them) and the backend's package (the install hints above); to try vramcore without a "
    'GPU, name the mock: --allocator mock, VRAMCORE_ALLOCATOR=mock or allocator = "mock" in '
    "vramcore.toml"
)
_NO_FILE = (
    "files read: none (looked for /etc/vramcore.toml and ./vramcore.toml; "
    "VRAMCORE_CONFIG=/path/file.toml names another)"
)


def _source(value: Value) -> str:
    if value.source == "default":
        return "default"
    if value.source == "environment":
        return f"environment {value.origin}"
    if value.source == "argument":
        return f"argument {value.origin}"
    return f"file {value.origin}"


class Doctor:
    """``vramcore doctor``: for each backend, sink and witness, active or why not, and the fix.

    Nothing is started: backends are probed (their viability check only) and a sink or
    witness counts as active when the settings that turn it on are set.

    :param pm: the loaded plugins.
    :param config: the configuration files read.
    """

    def __init__(self, pm: VramcorePluginManager, config: Configuration) -> None:
        self._pm = pm
        self._config = config
        self._values: dict[str, Value] = {}
        self._plugin_settings: dict[str, list[Setting]] = {}

    def run(self, args: argparse.Namespace, console: Console) -> int:
        """Print the diagnosis; exit 0 (it reports, it does not judge)."""
        declared = declared_settings(self._pm)
        for value in self._config.resolve(declared):
            self._values[value.setting.key] = value
            self._plugin_settings.setdefault(value.plugin, []).append(value.setting)
        data: dict[str, Any] = {
            "backends": self._backends(),
            "default_backend": self._default_backend(),
            "sinks": self._parts("vramcore_audit_sinks", "sink"),
            "witnesses": self._parts("vramcore_audit_witnesses", "witness"),
            "failed_plugins": [
                {"name": f.name, "distribution": f.distribution, "error": f.error}
                for f in self._pm.failures
            ],
        }
        data["audit_required_ok"] = any(s["active"] and s["durable"] for s in data["sinks"])
        console.result(data, "\n".join(self._lines(data)))
        return EXIT_OK

    def _backends(self) -> list[dict[str, Any]]:
        rows = []
        specs = collect_backends(self._pm).values()
        for spec in sorted(specs, key=lambda s: (-s.priority, s.name)):
            reason = spec.why_not()
            checks = spec.checks()
            # With checks, the hint only when installing fixes one that failed (CuPy missing,
            # not the driver); a reason that already says what to install needs no second copy.
            needs = any(not c.ok and c.install for c in checks) if checks else reason is not None
            rows.append(
                {
                    "name": spec.name,
                    "active": reason is None,
                    "reason": reason,
                    "checks": [
                        {"what": escape_text(c.what), "ok": c.ok, "detail": escape_text(c.detail)}
                        for c in checks
                    ],
                    "install": spec.install_hint
                    if needs and reason is not None and spec.install_hint not in reason
                    else None,
                }
            )
        return rows

    def _default_backend(self) -> dict[str, Any]:
        try:
            spec = select_backend(self._pm)
        except VramError as exc:
            return {"name": None, "reason": str(exc), "fix": _NO_BACKEND_FIX}
        return {"name": spec.name, "reason": None, "fix": None}

    def _parts(self, hook: str, role: str) -> list[dict[str, Any]]:
        """The plugins implementing ``hook``, each active or not (by its ``activates``)."""
        rows = []
        for impl in getattr(self._pm.hook, hook).get_hookimpls():
            name = impl.plugin_name
            switches = [s for s in self._plugin_settings.get(name, []) if s.activates == role]
            on = [s for s in switches if self._is_on(s)]
            row: dict[str, Any] = {"plugin": name, "active": bool(on) or not switches}
            if role == "sink":
                row["durable"] = _durable(impl.plugin)
            if not switches:
                row["reason"] = "needs no setting: active whenever the plugin is loaded"
                row["fix"] = None
            elif on:
                row["reason"] = "; ".join(self._how_set(s) for s in on)
                row["fix"] = None
            else:
                row["reason"] = "; ".join(self._why_off(s) for s in switches)
                row["fix"] = " or ".join(_turn_on(s) for s in switches)
            rows.append(row)
        return rows

    def _is_on(self, setting: Setting) -> bool:
        text = self._values[setting.key].text
        if setting.kind == "bool":
            return (
                (text.strip().lower() in _TRUE) if text is not None else setting.default == "true"
            )
        return bool(text and text.strip())

    def _how_set(self, setting: Setting) -> str:
        value = self._values[setting.key]
        if value.source == "default":
            return f"{setting.variable} is on by default"
        return f"{setting.variable} set ({_source(value)})"

    def _why_off(self, setting: Setting) -> str:
        value = self._values[setting.key]
        if value.text is None:
            return f"{setting.variable} is unset"
        return f"{setting.variable}={value.text} ({_source(value)})"

    def _lines(self, data: dict[str, Any]) -> list[str]:
        lines = ["Allocator backends:"]
        for row in data["backends"]:
            state = "can run" if row["active"] else f"cannot run: {row['reason']}"
            lines.append(f"  {row['name']:<14} {state}")
            for check in row["checks"]:
                mark = "ok" if check["ok"] else "missing"
                lines.append(f"  {'':<14} {check['what']}: {mark}: {check['detail']}")
            if row["install"]:
                lines.append(f"  {'':<14} install: {row['install']}")
        if not data["backends"]:
            lines.append("  (none installed)")
        default = data["default_backend"]
        if default["name"]:
            lines.append(f"  default: {default['name']}")
        else:
            lines.append(f"  default: none ({default['reason']})")
            lines.append(f"  {'':<14} fix: {_NO_BACKEND_FIX}")
        for title, key in (("Audit sinks:", "sinks"), ("Audit witnesses:", "witnesses")):
            lines.append(title)
            for row in data[key]:
                state = "active" if row["active"] else "not active"
                durable = "" if row.get("durable", True) else " (not durable)"
                lines.append(f"  {row['plugin']:<14} {state}{durable}: {row['reason']}")
                if row["fix"]:
                    lines.append(f"  {'':<14} fix: {row['fix']}")
            if not data[key]:
                lines.append("  (none installed)")
        lines.append(
            "Audit: audit='required' can start (a durable sink is active)"
            if data["audit_required_ok"]
            else "Audit: audit='required' would refuse to start: no durable sink is active "
            "(see the fixes above, or run with --no-audit on purpose)"
        )
        if data["failed_plugins"]:
            lines.append("Failed plugins (skipped):")
            lines.extend(
                f"  {f['name']:<14} {f['distribution']}: {f['error']}"
                for f in data["failed_plugins"]
            )
        return lines


def _durable(plugin: object) -> bool:
    """Whether a plugin's sinks are durable, as far as can be told without building them.

    A plugin whose sinks keep no lasting record (traces, logs) says so with a module (or
    object) attribute ``SINKS_DURABLE = False``; without one its sinks count as durable (the
    :class:`~vramcore.audit.AuditSink` default).
    """
    return bool(getattr(plugin, "SINKS_DURABLE", True))


def _turn_on(setting: Setting) -> str:
    """How to turn on a switch: its variable, or its key in vramcore.toml."""
    example = "1" if setting.kind == "bool" else "/path"
    key_example = "true" if setting.kind == "bool" else '"/path"'
    return f"set {setting.variable}={example} (or {setting.key} = {key_example} in vramcore.toml)"
