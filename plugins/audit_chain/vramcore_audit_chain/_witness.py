"""The built-in file witness: the chain's heads, appended to a file the operator keeps elsewhere.

The file should live where whoever controls the log directory cannot rewrite it: another
mount, a directory of another user that the worker may only append to, a file shipped off the
host as it grows. It is NDJSON, one signed head per line (see FORMAT.md, *Heads*), opened
``O_APPEND`` and fsynced after each head, so it is itself a valid ``--anchor`` file.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vramcore._heads import newest_head
from vramcore.audit import AuditWitness
from vramcore.errors import ConfigError
from vramcore_audit_chain import _format as fmt
from vramcore_audit_chain._keys import fsync_dir

__all__ = ["FileWitness", "witnesses_from_env"]

log = logging.getLogger("vramcore.audit_chain")

_TRUE = {"1", "true", "yes", "on", "required"}
_FALSE = {"", "0", "false", "no", "off"}


class FileWitness(AuditWitness):
    """Appends every head it is given to ``path``; reads the newest back for the writer.

    :param path: the witness file (created 0600 if missing; its directory must exist).
    :param required: a failed publish fails critical events (fail closed).
    :param log_directory: the log directory, which the witness file must not be inside.
    :raises ConfigError: the file is inside the log directory, or cannot be opened.
    """

    name = "audit_chain.file_witness"

    def __init__(
        self, path: Path, *, required: bool = False, log_directory: Path | None = None
    ) -> None:
        self.path = Path(path)
        self.required = required
        if log_directory is not None and _inside(self.path, log_directory):
            raise ConfigError(
                f"VRAMCORE_AUDIT_WITNESS={self.path} is inside the audit log directory; a "
                "witness must be out of reach of whoever controls the log: put it on another "
                "mount or in a directory the worker may only append to"
            )
        self._lock = threading.Lock()
        existed = self.path.exists()
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        try:
            self._fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            raise ConfigError(
                f"cannot open the audit witness file {self.path} (VRAMCORE_AUDIT_WITNESS): "
                f"{exc.strerror or type(exc).__name__}"
            ) from None
        if not existed:
            fsync_dir(self.path.parent)

    def publish(self, head: Mapping[str, Any]) -> None:
        """Append ``head`` as one line and fsync it."""
        line = (fmt.canonical_json(head) + "\n").encode("ascii")
        with self._lock:
            if self._fd < 0:
                raise OSError("the witness file is closed")
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)

    def latest(self, log_id: str) -> Mapping[str, Any] | None:
        """The newest head of ``log_id`` in the file that its own key signed.

        Others may append to a shared witness: a replayed older head, an unsigned or corrupted
        line, a head signed by another key. None of them can hide the newest authentic head:
        the log's key is pinned by its first intact head in the file, and the head with the
        highest sequence number that key signed wins, wherever it is
        (:func:`vramcore._heads.newest_head`; one streamed pass over the file).
        """
        head = newest_head(self.path, log_id)
        return None if head is None else head.to_dict()

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _inside(path: Path, directory: Path) -> bool:
    try:
        target = path.resolve()
        base = directory.resolve()
    except OSError:
        return False
    return target == base or base in target.parents


def witnesses_from_env(env: Mapping[str, str], log_directory: Path | None) -> list[AuditWitness]:
    """The file witness ``VRAMCORE_AUDIT_WITNESS`` names, if any.

    ``VRAMCORE_AUDIT_WITNESS_REQUIRED=1`` makes it required.

    :raises ConfigError: a malformed value, or see :class:`FileWitness`.
    """
    path = env.get("VRAMCORE_AUDIT_WITNESS", "").strip()
    required_text = env.get("VRAMCORE_AUDIT_WITNESS_REQUIRED", "").strip().lower()
    if required_text not in _TRUE | _FALSE:
        raise ConfigError(
            f"VRAMCORE_AUDIT_WITNESS_REQUIRED must be 1 or 0, got {required_text[:20]!r}"
        )
    if not path:
        if required_text in _TRUE:
            raise ConfigError(
                "VRAMCORE_AUDIT_WITNESS_REQUIRED is set but VRAMCORE_AUDIT_WITNESS is not: "
                "name the witness file"
            )
        return []
    return [FileWitness(Path(path), required=required_text in _TRUE, log_directory=log_directory)]
