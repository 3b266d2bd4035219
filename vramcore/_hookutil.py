"""Small helpers for calling hooks whose answers the core must not trust blindly."""

from __future__ import annotations

from typing import Any

__all__ = ["BUILTIN_PLUGIN", "implementers"]

#: The name the core's default hook implementations are registered under.
BUILTIN_PLUGIN = "vramcore.builtin"


def implementers(hook_caller: Any) -> str:
    """The plugins implementing a hook, besides the core's defaults, for error messages."""
    names = sorted({impl.plugin_name for impl in hook_caller.get_hookimpls()} - {BUILTIN_PLUGIN})
    return ", ".join(names) or "the core default"
