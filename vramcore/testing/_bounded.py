"""Run one call on another thread and fail the test, saying what hung, past a time limit."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

__all__ = ["BoundedCall", "run_bounded"]


class BoundedCall:
    """One call made on a daemon thread; :meth:`result` waits for it at most ``timeout`` s.

    The thread is a daemon so that a call that never returns cannot keep the test process
    alive; the suite reports the hang instead of waiting for it.
    """

    def __init__(self, fn: Callable[[], Any], what: str) -> None:
        self.fn = fn
        self.what = what
        self.value: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="vramcore-contract", daemon=True)

    def _run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as exc:  # re-raised on the test's thread by result()
            self.error = exc

    def start(self) -> BoundedCall:
        """Start the call; returns ``self``."""
        self._thread.start()
        return self

    def finished_within(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; whether the call has returned (or raised)."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def result(self, timeout: float) -> Any:
        """The call's return value; its exception re-raised; a test failure if it hangs."""
        if not self.finished_within(timeout):
            pytest.fail(
                f"{self.what} did not return within {timeout:.0f} s: it hangs", pytrace=False
            )
        if self.error is not None:
            raise self.error
        return self.value


def run_bounded(fn: Callable[[], Any], what: str, timeout: float) -> Any:
    """Run ``fn`` on another thread; fail the test if it does not return within ``timeout``."""
    return BoundedCall(fn, what).start().result(timeout)
