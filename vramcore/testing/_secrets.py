"""Find a secret anywhere a plugin can reach: in text, in bytes, in an object graph.

The contracts use it to prove that a sink or witness was handed nothing that can sign a seal:
neither the worker token nor the seal key appears in its events, its context, its report or
any object it can reach from them.
"""

from __future__ import annotations

import base64
import gc
import inspect
import types
from collections import deque
from collections.abc import Iterable
from typing import Any

from vramcore.seal import SEAL_KEY_INFO, WorkerToken

__all__ = ["SecretScan"]

#: Objects the graph walk does not enter: code and the import system lead to every global of
#: the process (the test's own constants among them), not to what the plugin was handed.
_OPAQUE = (
    types.ModuleType,
    type,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.CodeType,
    types.FrameType,
    types.TracebackType,
)
_MAX_OBJECTS = 200_000


class SecretScan:
    """The forms of one worker token's secrets, and where to look for them.

    :param token: the worker token the manager was started with.
    """

    def __init__(self, token: str | bytes) -> None:
        raw = token.encode("utf-8") if isinstance(token, str) else bytes(token)
        worker = WorkerToken(raw)
        seal_key = worker.derive(SEAL_KEY_INFO).export()
        self._needles: dict[str, bytes] = {}
        for what, secret in (("the worker token", raw), ("the seal key", seal_key)):
            self._needles[what] = secret
            self._needles[f"{what} (hex)"] = secret.hex().encode("ascii")
            self._needles[f"{what} (base64)"] = base64.b64encode(secret).rstrip(b"=")
        self.objects_seen = 0

    def in_text(self, value: str | bytes | bytearray | memoryview) -> list[str]:
        """Which secrets ``value`` contains (names like ``"the seal key (hex)"``)."""
        data = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else bytes(value)
        lowered = data.lower()
        return [
            what
            for what, needle in self._needles.items()
            if needle in data or ("hex" in what and needle.lower() in lowered)
        ]

    def in_objects(self, roots: Iterable[Any]) -> list[str]:
        """Which secrets any string or buffer reachable from ``roots`` contains, and where.

        Walks references (``gc.get_referents``) breadth first, without entering modules,
        classes, functions or frames; each finding names the type that held it.
        """
        found: list[str] = []
        seen: set[int] = set()
        queue: deque[Any] = deque(roots)
        while queue and len(seen) < _MAX_OBJECTS:
            obj = queue.popleft()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if isinstance(obj, str | bytes | bytearray | memoryview):
                found += [f"{what} in a {type(obj).__name__}" for what in self._text_of(obj)]
                continue
            if isinstance(obj, _OPAQUE) or inspect.ismodule(obj):
                continue
            queue.extend(gc.get_referents(obj))
        self.objects_seen = len(seen)
        return sorted(set(found))

    def _text_of(self, obj: str | bytes | bytearray | memoryview) -> list[str]:
        try:
            return self.in_text(obj)
        except (TypeError, ValueError):  # a released or non-contiguous buffer
            return []
