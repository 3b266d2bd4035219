"""Configuration in one place: ``vramcore.toml``, the environment, then arguments.

Every setting has one name, its key in ``vramcore.toml`` (``audit_log``), and one environment
variable derived from it (``VRAMCORE_AUDIT_LOG``). The core declares its own settings and each
plugin declares its own through :func:`~vramcore.hookspecs.vramcore_settings`, so this module
knows no plugin by name.

Where a value comes from, weakest first:

1. the setting's default;
2. ``/etc/vramcore.toml``, then ``vramcore.toml`` in the current directory (the project's
   file wins over the system's); ``VRAMCORE_CONFIG=/path/to/file.toml`` names one file
   instead of both;
3. the environment (``VRAMCORE_*``);
4. command-line arguments (``--allocator``, ``--device``, ``--no-audit``).

A file value reaches the code that reads the variable through :meth:`Configuration.applied`:
each file value whose variable is unset is set for the duration of one CLI command. Files are
checked before anything runs: an unknown key, a value of the wrong type, a secret in a file or
a malformed file is one :class:`~vramcore.errors.ConfigError` naming the key and the file.
Secrets (the worker token) are never shown: :meth:`Value.shown` gives a fingerprint.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import tomllib
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs

from vramcore.errors import ConfigError, InvalidInput
from vramcore.validation import escape_text

__all__ = [
    "CONFIG_VARIABLE",
    "PROJECT_FILE_NAME",
    "SYSTEM_FILE",
    "VARIABLE_PREFIX",
    "Configuration",
    "Setting",
    "Value",
    "core_settings",
    "declared_settings",
]

#: Prefix of every setting's environment variable.
VARIABLE_PREFIX = "VRAMCORE_"
#: The variable naming one configuration file to read instead of the usual places.
CONFIG_VARIABLE = "VRAMCORE_CONFIG"
#: The system-wide file, read first.
SYSTEM_FILE = Path("/etc/vramcore.toml")
#: The project's file, looked for in the current directory; it overrides the system's.
PROJECT_FILE_NAME = "vramcore.toml"

Kind = Literal["text", "path", "int", "bool", "list", "choice"]
_KEY = re.compile(r"[a-z][a-z0-9_]{0,62}")


@attrs.frozen(kw_only=True)
class Setting:
    """One configuration setting, as a plugin (or the core) declares it.

    :attr key: its key in ``vramcore.toml`` (lower case, ``[a-z0-9_]``); the environment
        variable is ``VRAMCORE_`` + the key in upper case (:attr:`variable`).
    :attr help: one line saying what it does.
    :attr kind: ``text``, ``path``, ``int``, ``bool`` (``true``/``false`` in the file, ``1``/``0``
        in the environment), ``list`` (an array in the file, comma-separated in the
        environment) or ``choice`` (one of :attr:`choices`).
    :attr default: what happens when it is unset, in words (``"the number of cores"``).
    :attr choices: the allowed values of a ``choice``.
    :attr minimum: the smallest allowed ``int``.
    :attr maximum: the largest allowed ``int``.
    :attr secret: never shown; refused in a configuration file.
    :attr activates: ``"sink"`` or ``"witness"`` when setting it turns on the plugin's audit
        sink or witness (``vramcore doctor`` says which variable is missing).
    """

    key: str = attrs.field()
    help: str
    kind: Kind = "text"
    default: str = "unset"
    choices: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None
    secret: bool = False
    activates: Literal["sink", "witness"] | None = None

    @key.validator
    def _check_key(self, _attr: attrs.Attribute[str], key: str) -> None:
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ConfigError(f"setting key {key!r} must be lower case [a-z0-9_], e.g. 'audit_log'")

    @property
    def variable(self) -> str:
        """The environment variable: ``VRAMCORE_`` + the key in upper case."""
        return VARIABLE_PREFIX + self.key.upper()

    def check_file_value(self, value: object, where: str) -> str:
        """``value`` from a TOML file as the variable's text, or a one-line :class:`ConfigError`.

        :param where: the file, named in the error.
        """
        prefix = f"{self.key} in {where}"
        if self.secret:
            raise ConfigError(
                f"{prefix}: a secret does not belong in a configuration file; set "
                f"{self.variable} from your secret store instead"
            )
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ConfigError(f"{prefix}: must be true or false, got {_show(value)}")
            return "1" if value else "0"
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{prefix}: must be a whole number, got {_show(value)}")
            low, high = self.minimum, self.maximum
            if (low is not None and value < low) or (high is not None and value > high):
                raise ConfigError(f"{prefix}: must be from {low} to {high}, got {value}")
            return str(value)
        if self.kind == "list":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f'{prefix}: must be a list of names, e.g. ["mock"]')
            bad = [v for v in value if not v.strip() or "," in v]
            if bad:
                raise ConfigError(f"{prefix}: {_show(bad[0])} is not a name")
            return ",".join(v.strip() for v in value)
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{prefix}: must be a non-empty string, got {_show(value)}")
        if self.kind == "choice" and value not in self.choices:
            raise ConfigError(f"{prefix}: {_show(value)} is not one of {', '.join(self.choices)}")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise ConfigError(f"{prefix}: control characters are not allowed")
        return value


def _show(value: object) -> str:
    """A short, escaped rendering of a file value for an error message."""
    return escape_text(repr(value)[:60])


@attrs.frozen(kw_only=True)
class Value:
    """A setting's effective value and where it came from.

    :attr setting: the setting.
    :attr text: the value as its variable's text (``None``: unset, the default applies).
    :attr source: ``default``, ``file``, ``environment`` or ``argument``.
    :attr origin: the file path, the variable or the argument that gave it (empty for the
        default).
    :attr plugin: the plugin that declared the setting (``vramcore`` for the core's).
    """

    setting: Setting
    text: str | None = attrs.field(repr=False)
    source: Literal["default", "file", "environment", "argument"]
    origin: str = ""
    plugin: str = "vramcore"

    def shown(self) -> str:
        """The value as it may be printed: a secret shows as its fingerprint only."""
        if self.text is None:
            return f"({self.setting.default})"
        if not self.setting.secret:
            return self.text
        from vramcore.seal import WorkerToken

        try:
            return f"set (fingerprint {WorkerToken(self.text).fingerprint})"
        except InvalidInput:
            return "set (not a usable secret: too short or too simple)"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (a secret's value replaced by :meth:`shown`)."""
        value = None if self.text is None else (self.shown() if self.setting.secret else self.text)
        return {
            "key": self.setting.key,
            "variable": self.setting.variable,
            "value": value,
            "default": self.setting.default,
            "source": self.source,
            "origin": self.origin,
            "plugin": self.plugin,
            "secret": self.setting.secret,
            "help": self.setting.help,
        }


class Configuration:
    """The configuration files found, and the effective value of every declared setting.

    :param files: ``(path, table)`` pairs, weakest first (as :meth:`load` reads them).
    :param environ: the environment (default ``os.environ``).
    """

    def __init__(
        self,
        files: Sequence[tuple[Path, Mapping[str, Any]]] = (),
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.files = [path for path, _ in files]
        self._environ = os.environ if environ is None else environ
        #: Variables :meth:`applied` set from a file (their value is the file's, not the
        #: environment's).
        self._applied: set[str] = set()
        #: key -> (raw value, file): the strongest file wins.
        self._raw: dict[str, tuple[object, Path]] = {}
        for path, table in files:
            for key, value in table.items():
                self._raw[key] = (value, path)

    @classmethod
    def load(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        cwd: Path | None = None,
        system_file: Path = SYSTEM_FILE,
    ) -> Configuration:
        """Read the configuration files (see the module docstring); none is fine.

        :raises ConfigError: a file cannot be read or is not valid TOML (one line naming it),
            or ``VRAMCORE_CONFIG`` names a file that does not exist.
        """
        environ = os.environ if environ is None else environ
        explicit = environ.get(CONFIG_VARIABLE, "").strip()
        if explicit:
            path = Path(explicit)
            if not path.is_file():
                raise ConfigError(f"{CONFIG_VARIABLE}={explicit}: no such file")
            paths = [path]
        else:
            project = (Path.cwd() if cwd is None else cwd) / PROJECT_FILE_NAME
            paths = [p for p in (system_file, project) if p.is_file()]
        return cls([(path, _read_toml(path)) for path in paths], environ)

    def file_value(self, key: str) -> tuple[object, Path] | None:
        """The raw value of ``key`` in the strongest file that sets it, and that file."""
        return self._raw.get(key)

    def check(self, declared: Mapping[str, tuple[Setting, str]]) -> None:
        """Refuse unknown keys and bad values in the files.

        :param declared: key -> (setting, declaring plugin), every setting known.
        :raises ConfigError: one line naming the key and the file.
        """
        for key, (value, path) in self._raw.items():
            entry = declared.get(key)
            if entry is None:
                close = difflib.get_close_matches(key, list(declared), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(
                    f"unknown key {escape_text(key)[:60]!r} in {path}{hint}; "
                    "`vramcore config` lists every setting"
                )
            entry[0].check_file_value(value, str(path))

    @contextlib.contextmanager
    def applied(self, environ: MutableMapping[str, str]) -> Iterator[None]:
        """Set each file value whose variable is unset in ``environ``; restore it after.

        Values are converted as :meth:`Setting.check_file_value` would, by type only (the
        settings are checked once the plugins that declare them are loaded).
        """
        added = []
        for key, (value, _path) in self._raw.items():
            variable = VARIABLE_PREFIX + key.upper()
            if variable not in environ and _KEY.fullmatch(key):
                text = _as_text(value)
                if text is not None:
                    environ[variable] = text
                    added.append(variable)
        self._applied.update(added)
        try:
            yield
        finally:
            for variable in added:
                environ.pop(variable, None)
            self._applied.difference_update(added)

    def resolve(
        self,
        declared: Mapping[str, tuple[Setting, str]],
        arguments: Mapping[str, tuple[str, str]] | None = None,
    ) -> list[Value]:
        """The effective value of every declared setting, in key order.

        :param declared: key -> (setting, declaring plugin).
        :param arguments: key -> (value text, the argument that gave it, e.g. ``--allocator``).
        """
        arguments = arguments or {}
        values = []
        for key in sorted(declared):
            setting, plugin = declared[key]
            values.append(self._value(setting, plugin, arguments.get(key)))
        return values

    def _value(self, setting: Setting, plugin: str, argument: tuple[str, str] | None) -> Value:
        if argument is not None:
            return Value(
                setting=setting,
                text=argument[0],
                source="argument",
                origin=argument[1],
                plugin=plugin,
            )
        env_text = self._environ.get(setting.variable)
        in_file = self._raw.get(setting.key)
        if env_text is not None and setting.variable not in self._applied:
            return Value(
                setting=setting,
                text=env_text,
                source="environment",
                origin=setting.variable,
                plugin=plugin,
            )
        if in_file is not None:
            return Value(
                setting=setting,
                text=_as_text(in_file[0]),
                source="file",
                origin=str(in_file[1]),
                plugin=plugin,
            )
        return Value(setting=setting, text=None, source="default", plugin=plugin)


def _as_text(value: object) -> str | None:
    """A TOML value as environment text (``None`` for tables and other non-settings)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | str):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(v.strip() for v in value)
    return None


def _read_toml(path: Path) -> dict[str, Any]:
    """The top-level table of ``path``, or a one-line :class:`ConfigError` naming it."""
    try:
        with path.open("rb") as fh:
            table = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 text") from None
    return table


def declared_settings(plugin_manager: Any) -> dict[str, tuple[Setting, str]]:
    """Every setting the loaded plugins declare: key -> (setting, plugin name).

    :raises ConfigError: a plugin answered with something that is not a :class:`Setting`, or
        two plugins declared one key (the message names both).
    """
    declared: dict[str, tuple[Setting, str]] = {}
    impls = plugin_manager.hook.vramcore_settings.get_hookimpls()
    for impl in impls:  # registration order, the core's (trylast) first
        name = "vramcore" if impl.plugin_name == "vramcore.builtin" else impl.plugin_name
        others = [other.plugin for other in impls if other is not impl]
        answers = plugin_manager.subset_hook_caller("vramcore_settings", others)()
        answer = answers[0] if answers else []
        if not isinstance(answer, list | tuple) or not all(
            isinstance(item, Setting) for item in answer
        ):
            raise ConfigError(f"plugin {name}: vramcore_settings must return a list of Setting")
        for setting in answer:
            if setting.key in declared:
                other = declared[setting.key][1]
                raise ConfigError(
                    f"setting {setting.key} is declared by both {other} and {name}; "
                    "disable one of them (VRAMCORE_DISABLE_PLUGINS)"
                )
            declared[setting.key] = (setting, name)
    return declared


def core_settings() -> list[Setting]:
    """The settings the core itself reads (its :func:`vramcore_settings` answer)."""
    return [
        Setting(
            key="worker_token",
            help="the worker's secret: at least 16 bytes and an estimated 128 bits (patterns, "
            "common words refused; make one with `secrets.token_urlsafe(32)`); shown as a "
            "fingerprint only",
            default="the CLI makes an ephemeral one unless an audit log is configured",
            secret=True,
        ),
        # From here: sec's token sources and seal key provider (vramcore/_keyproviders.py).
        Setting(
            key="worker_token_file",
            help="instead of the variable: a file holding the token, a regular file of this "
            "user with mode 600 (anything else refused)",
            kind="path",
        ),
        Setting(
            key="worker_token_keyring",
            help="instead of the variable: SERVICE or SERVICE:USERNAME in the system keyring "
            "(user name worker-token by default; pip install './[keyring]')",
        ),
        Setting(
            key="seal_key_provider",
            help="the plugin (entry point or distribution:entry-point) that provides the seal "
            "key, e.g. from a KMS",
            default="unset: the key is derived from the token, no plugin is asked",
        ),
        Setting(
            key="allocator",
            help="the backend to use when the caller names none; the mock (host memory) only "
            "when named, and with no viable GPU backend a seal fails naming each backend and why",
            default="the highest-priority viable backend (never the mock)",
        ),
        Setting(
            key="plugins",
            help="allowlist of plugins to load (entry point or distribution:entry-point)",
            kind="list",
            default="every installed plugin",
        ),
        Setting(
            key="disable_plugins",
            help="plugins never to load (same syntax as plugins)",
            kind="list",
            default="none",
        ),
        Setting(
            key="strict_plugins",
            help="a plugin that fails to load is fatal instead of skipped",
            kind="bool",
            default="false",
        ),
        Setting(
            key="audit_mode",
            help="how CLI commands audit: required (a durable sink, fail closed) or best_effort "
            "(every sink, never fatal); --no-audit disables auditing",
            kind="choice",
            choices=("required", "best_effort"),
            default="required",
        ),
        Setting(
            key="hash_workers",
            help="host threads hashing leaves",
            kind="int",
            minimum=1,
            maximum=1024,
            default="the number of cores",
        ),
        Setting(
            key="read_threads",
            help="threads reading a file into the staging buffers while it is sealed, each "
            "hashing what it read",
            kind="int",
            minimum=1,
            maximum=64,
            default="the hash workers, at most 8",
        ),
        Setting(
            key="log_format",
            help="how the CLI writes log records to stderr: text lines or one JSON object each",
            kind="choice",
            choices=("text", "json"),
            default="text",
        ),
        Setting(
            key="debug",
            help="the CLI shows the traceback of an unexpected error (for a bug report)",
            kind="bool",
            default="false",
        ),
    ]
