"""Storage faults for the sink and witness contracts: a full disk, or a disk that hangs.

The default way the contracts break a sink's or a witness's storage: ``os.write``,
``os.fsync`` and ``os.fdatasync`` (what a file-backed sink calls to make a record last)
raise ``ENOSPC`` or block until released. A sink that stores elsewhere (a remote store, a
database) overrides the contract's ``break_storage`` / ``block_storage`` fixtures instead.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from typing import Any

import pytest

__all__ = ["DiskFault"]

_PATCHED = ("write", "fsync", "fdatasync")


class DiskFault:
    """Makes this process's ``os.write`` / ``os.fsync`` / ``os.fdatasync`` fail or block.

    :param monkeypatch: the test's monkeypatch (the patches end with the test).
    :param max_block: seconds a blocked call waits at most if nobody releases it (so a
        failing test cannot leave a thread blocked for ever).
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, max_block: float = 120.0) -> None:
        self._monkeypatch = monkeypatch
        self._max_block = max_block
        self._released = threading.Event()
        self._originals: dict[str, Callable[..., Any]] = {
            name: getattr(os, name) for name in _PATCHED if hasattr(os, name)
        }
        self.blocked_calls = 0

    def fail(self, _target: object = None) -> None:
        """From now on every patched call raises ``OSError(ENOSPC)`` (a full disk)."""
        for name in self._originals:
            self._monkeypatch.setattr(os, name, self._failing)

    def block(self, _target: object = None) -> Callable[[], None]:
        """From now on every patched call blocks until :meth:`release`; returns ``release``."""
        for name, original in self._originals.items():
            self._monkeypatch.setattr(os, name, self._blocking(original))
        return self.release

    def release(self) -> None:
        """Let blocked calls go on (they then do what they were asked) and undo the patches."""
        for name, original in self._originals.items():
            self._monkeypatch.setattr(os, name, original)
        self._released.set()

    @staticmethod
    def _failing(*_args: Any, **_kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device (injected by the contract)")

    def _blocking(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def blocked(*args: Any, **kwargs: Any) -> Any:
            self.blocked_calls += 1
            self._released.wait(self._max_block)
            return original(*args, **kwargs)

        return blocked
