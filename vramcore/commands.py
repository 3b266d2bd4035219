"""The CLI's extension surface: how core and plugins add ``vramcore`` subcommands.

A command is an argparse parser plus a handler ``handler(args, console) -> int`` returning the
exit code: :data:`EXIT_OK` (0), :data:`EXIT_FAILURE` (1, an integrity or policy failure was
found) or :data:`EXIT_USAGE` (2, bad usage or configuration). A handler raises
:class:`UsageError` (or any :class:`vramcore.errors.InvalidInput` / ``ConfigError``) for a
user mistake; the CLI prints it in one line, never a traceback. Every command gets ``--json``;
:class:`Console` prints either the human text or the JSON document.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from typing import Any, TextIO

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "Commands", "Console", "Handler", "UsageError"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


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
            print(text, file=self._out, flush=True)

    def progress(self, text: str) -> None:
        """Print progress to stderr (human mode only), so stdout stays clean for pipes."""
        if not self.json:
            print(text, file=self._err, flush=True)

    def result(self, data: Mapping[str, Any], text: str | None = None) -> None:
        """Print the command's result: ``data`` as JSON, or ``text`` for humans."""
        if self.json:
            print(json.dumps(data, indent=2, sort_keys=True, default=str), file=self._out)
        elif text is not None:
            print(text, file=self._out, flush=True)

    def error(self, text: str) -> None:
        """Print an error line to stderr (both modes)."""
        print(f"vramcore: error: {text}", file=self._err, flush=True)


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
