"""The docstring check plugin authors run on their public names."""

from __future__ import annotations

import importlib
import inspect

__all__ = ["undocumented_public_names"]


def undocumented_public_names(module_name: str) -> list[str]:
    """Names in ``module_name``'s ``__all__`` (and their public methods) without a docstring.

    Also lists ``"<module>"`` when the module itself has none. Plugin authors use it in a
    one-line test; ``AttributeError`` means ``__all__`` names something that does not exist.
    """
    module = importlib.import_module(module_name)
    missing = [] if inspect.getdoc(module) else ["<module>"]
    for attr in getattr(module, "__all__", ()):
        obj = getattr(module, attr)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if not inspect.getdoc(obj):
            missing.append(attr)
        if inspect.isclass(obj):
            for name, member in vars(obj).items():
                target = member.fget if isinstance(member, property) else member
                if name.startswith("_") or not (callable(target) or isinstance(member, property)):
                    continue
                if not inspect.getdoc(target):
                    missing.append(f"{attr}.{name}")
    return missing
