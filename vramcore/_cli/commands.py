"""The CLI's extension surface: how core and plugins add ``vramcore`` subcommands.

A command is an argparse parser plus a handler ``handler(args, console) -> int`` returning the
exit code: :data:`EXIT_OK` (0), :data:`EXIT_FAILURE` (1, an integrity, policy or audit failure
was found), :data:`EXIT_USAGE` (2, bad usage or configuration, or input that cannot be read) or
:data:`EXIT_INTERNAL` (3, the command itself failed unexpectedly: a bug, never a verdict).
A handler raises :class:`UsageError` (or any :class:`vramcore.errors.InvalidInput` /
``ConfigError``) for a user mistake; the CLI prints it in one line (one JSON object under
``--json``), never a traceback. Every command gets ``--json``; :class:`Console` prints either
the human text or the JSON document. Text that did not come from vramcore (paths, plugin
messages, tensor names) is escaped before it reaches the terminal.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any, NoReturn, TextIO

from vramcore.errors import ConfigError
from vramcore.validation import escape_text

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERNAL",
    "EXIT_OK",
    "EXIT_USAGE",
    "Commands",
    "Console",
    "Handler",
    "SafeParser",
    "UsageError",
    "add_plugin_commands",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
#: A crash of the command itself: never 1, which says "an integrity failure was found".
EXIT_INTERNAL = 3


class UsageError(Exception):
    """A user mistake on the command line; printed as one line, exit code 2."""


class Console:
    """Output for one command run: human text by default, one JSON document with ``--json``.

    :attr json: whether ``--json`` was given.
    """

    def __init__(self, *, json_mode: bool, out: TextIO | None = None, err: TextIO | None = None):
        self.json = json_mode
        self._out = out if out is not None else sys.stdout
        self._err = err if err is not None else sys.stderr

    def say(self, text: str) -> None:
        """Print human text (suppressed in JSON mode, where only the document is printed)."""
        if not self.json:
            self._print(_escape_lines(text), self._out)

    def progress(self, text: str) -> None:
        """Print progress to stderr (human mode only), so stdout stays clean for pipes."""
        if not self.json:
            self._print(_escape_lines(text), self._err)

    def result(self, data: Mapping[str, Any], text: str | None = None) -> None:
        """Print the command's result: ``data`` as JSON, or ``text`` for humans."""
        if self.json:
            self._print(json.dumps(data, indent=2, sort_keys=True, default=str), self._out)
        elif text is not None:
            self._print(_escape_lines(text), self._out)

    def error(self, text: str, *, kind: str = "error", exit_code: int = 2) -> None:
        """Print one error: a line on stderr, or one JSON object on stdout under ``--json``.

        The text is escaped and kept on one line whatever it holds.
        """
        line = escape_text(" ".join(text.split("\n")))
        if self.json:
            doc = {"error": {"kind": kind, "message": line, "exit_code": exit_code}}
            self._print(json.dumps(doc, sort_keys=True), self._out)
        else:
            self._print(f"vramcore: error: {line}", self._err)

    @staticmethod
    def _print(text: str, stream: TextIO) -> None:
        print(text, file=stream, flush=True)


def _escape_lines(text: str) -> str:
    """Escape each line of human output; the line breaks vramcore wrote stay line breaks."""
    return "\n".join(escape_text(line) for line in text.split("\n"))


Handler = Callable[[argparse.Namespace, Console], int]


#: What a command or group name may be: it is typed on a command line and shown in help.
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")


class SafeParser(argparse.ArgumentParser):
    """An argparse parser whose mistakes are one line (:class:`UsageError`) and whose help
    text is escaped: a plugin's help, metavar or description never reaches the terminal raw
    (no ANSI escapes, no control or bidi characters)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        for key in ("description", "epilog", "usage"):
            if isinstance(kwargs.get(key), str):
                kwargs[key] = escape_text(kwargs[key])
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        """Add an argument; its help and metavar are escaped, its names checked."""
        for name in args:
            if not isinstance(name, str) or escape_text(name) != name:
                raise ConfigError(f"argument name {escape_text(str(name))!r} is not printable")
        if isinstance(kwargs.get("help"), str):
            kwargs["help"] = escape_text(kwargs["help"])
        metavar = kwargs.get("metavar")
        if isinstance(metavar, str):
            kwargs["metavar"] = escape_text(metavar)
        elif isinstance(metavar, tuple):
            kwargs["metavar"] = tuple(escape_text(str(m)) for m in metavar)
        return super().add_argument(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Raise :class:`UsageError` instead of printing usage and exiting."""
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


class Commands:
    """A level of subcommands; plugins receive one in ``vramcore_add_commands``.

    Names are checked (``[a-z0-9][a-z0-9_-]*``, at most 40 characters) and help texts
    escaped. The CLI gives each plugin the commands on its own: if the plugin's hook raises
    or returns something, every command it added is removed again (and the CLI says so),
    and the other commands work as before.
    """

    def __init__(self, subparsers: Any, journal: list[tuple[Any, str, Commands]] | None = None):
        self._subparsers = subparsers
        self._groups: dict[str, Commands] = {}
        # (subparsers action, name, owning level) of everything added since the last mark.
        self._journal: list[tuple[Any, str, Commands]] = [] if journal is None else journal

    def add(self, name: str, *, help: str, handler: Handler) -> argparse.ArgumentParser:
        """Add a command; returns its parser so the caller can add arguments."""
        _check_name(name)
        text = escape_text(str(help))
        parser: argparse.ArgumentParser = self._subparsers.add_parser(
            name, help=text, description=text
        )
        self._journal.append((self._subparsers, name, self))
        parser.add_argument("--json", action="store_true", help="print one JSON document")
        parser.add_argument(
            "-v", "--verbose", action="store_true", help="log narration and audit events to stderr"
        )
        parser.set_defaults(handler=handler)
        return parser

    def group(self, name: str, *, help: str) -> Commands:
        """Add (or reuse) a command group such as ``audit``; returns the group's ``Commands``."""
        if name in self._groups:
            return self._groups[name]
        _check_name(name)
        text = escape_text(str(help))
        parser: argparse.ArgumentParser = self._subparsers.add_parser(
            name, help=text, description=text
        )
        self._journal.append((self._subparsers, name, self))
        parser.set_defaults(handler=None, group_parser=parser)
        sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=SafeParser)
        group = Commands(sub, self._journal)
        self._groups[name] = group
        return group

    def _mark(self) -> int:
        """Where the journal stands now (see :meth:`_undo`)."""
        return len(self._journal)

    def _undo(self, mark: int) -> list[str]:
        """Remove every command and group added since ``mark``; return their names."""
        removed = []
        while len(self._journal) > mark:
            subparsers, name, level = self._journal.pop()
            subparsers.choices.pop(name, None)
            subparsers._choices_actions[:] = [
                a for a in subparsers._choices_actions if a.dest != name
            ]
            level._groups.pop(name, None)
            removed.append(name)
        return removed[::-1]


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(
            f"command name {escape_text(str(name))[:60]!r} is not a lower-case word of "
            "[a-z0-9_-] (at most 40 characters)"
        )


def add_plugin_commands(pm: Any, commands: Commands, console: Console) -> list[str]:
    """Let each plugin add its commands; a plugin that fails loses its own commands only.

    Each plugin's ``vramcore_add_commands`` is called on its own. If it raises (anything,
    ``SystemExit`` included) or returns something (the hook returns nothing), the commands
    it added are removed, the CLI says so on stderr, and ``vramcore plugins`` lists it.

    :return: the names of the plugins whose commands were removed.
    """
    failed = []
    hook = "vramcore_add_commands"
    impls = getattr(pm.hook, hook).get_hookimpls()
    for impl in reversed(impls):  # pluggy's own calling order
        if impl.wrapper or impl.hookwrapper:
            continue
        others = [i.plugin for i in impls if i.plugin is not impl.plugin]
        caller = pm.subset_hook_caller(hook, remove_plugins=others)
        mark = commands._mark()
        try:
            answers = [a for a in caller(commands=commands) if a is not None]
            problem = (
                f"it returned {type(answers[0]).__name__} (the hook returns nothing)"
                if answers
                else None
            )
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit too: the plugin's failure, not a request
            problem = f"it raised {type(exc).__name__}: {escape_text(str(exc))[:200]}"
        if problem is None:
            continue
        removed = commands._undo(mark)
        name = escape_text(impl.plugin_name)
        shown = ", ".join(removed) or "none were added"
        message = f"plugin {name}: its commands were removed ({shown}): {problem}"
        console.progress(f"vramcore: warning: {message}")
        record = getattr(pm, "record_failure", None)  # a VramcorePluginManager lists it
        if record is not None:
            record(impl.plugin_name, "", f"{hook}: {message}")
        failed.append(impl.plugin_name)
    return failed
