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
import sys
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from vramcore.validation import escape_text

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERNAL",
    "EXIT_OK",
    "EXIT_USAGE",
    "Commands",
    "Console",
    "Handler",
    "UsageError",
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


class Commands:
    """A level of subcommands; plugins receive one in ``vramcore_add_commands``."""

    def __init__(self, subparsers: Any) -> None:
        self._subparsers = subparsers
        self._groups: dict[str, Commands] = {}

    def add(self, name: str, *, help: str, handler: Handler) -> argparse.ArgumentParser:
        """Add a command; returns its parser so the caller can add arguments."""
        parser: argparse.ArgumentParser = self._subparsers.add_parser(
            name, help=help, description=help
        )
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
        parser: argparse.ArgumentParser = self._subparsers.add_parser(
            name, help=help, description=help
        )
        parser.set_defaults(handler=None, group_parser=parser)
        sub = parser.add_subparsers(title="commands", metavar="COMMAND")
        group = Commands(sub)
        self._groups[name] = group
        return group
