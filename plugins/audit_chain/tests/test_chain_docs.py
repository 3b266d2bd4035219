"""Every module and public name of the plugin is documented; ``__all__`` names real objects."""

from __future__ import annotations

import importlib
import inspect

import pytest

MODULES = [
    "vramcore_audit_chain",
    "vramcore_audit_chain._cli",
    "vramcore_audit_chain._config",
    "vramcore_audit_chain._encode",
    "vramcore_audit_chain._format",
    "vramcore_audit_chain._keys",
    "vramcore_audit_chain._recovery",
    "vramcore_audit_chain._sink",
    "vramcore_audit_chain._verify",
    "vramcore_audit_chain._writer",
]


@pytest.mark.parametrize("name", MODULES)
def test_public_names_are_documented(name: str) -> None:
    module = importlib.import_module(name)
    assert inspect.getdoc(module)
    undocumented = []
    for attr in module.__all__:
        obj = getattr(module, attr)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            if not obj.__doc__:
                undocumented.append(attr)
            if inspect.isclass(obj):
                for meth_name, meth in vars(obj).items():
                    doc = getattr(meth, "__doc__", None) or getattr(
                        getattr(meth, "fget", None), "__doc__", None
                    )
                    if not meth_name.startswith("_") and callable(meth) and not doc:
                        undocumented.append(f"{attr}.{meth_name}")
    assert not undocumented, undocumented


def test_every_reason_is_documented_in_the_format() -> None:
    from pathlib import Path

    from vramcore_audit_chain import REASONS

    text = (Path(__file__).parents[1] / "FORMAT.md").read_text()
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for reason in REASONS:
        assert f"`{reason}`" in text and f"`{reason}`" in readme, reason
