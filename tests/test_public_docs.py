"""Every public name of the core has a docstring, and ``__all__`` lists only real names."""

from __future__ import annotations

import importlib
import inspect

import pytest

MODULES = [
    "vramcore",
    "vramcore.audit",
    "vramcore.backend",
    "vramcore.cli",
    "vramcore.commands",
    "vramcore.demo",
    "vramcore._cli_support",
    "vramcore.loading",
    "vramcore.residency",
    "vramcore.verification",
    "vramcore.digest",
    "vramcore.errors",
    "vramcore.events",
    "vramcore.manager",
    "vramcore.narration",
    "vramcore.plugins",
    "vramcore.policy",
    "vramcore.safetensors",
    "vramcore.seal",
    "vramcore.shard",
    "vramcore.testing",
    "vramcore.validation",
]


@pytest.mark.parametrize("name", MODULES)
def test_module_and_public_names_are_documented(name: str) -> None:
    module = importlib.import_module(name)
    assert inspect.getdoc(module), f"{name} has no module docstring"
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    undocumented = []
    for attr in exported:
        obj = getattr(module, attr)  # AttributeError here: __all__ names a missing object
        if inspect.isclass(obj) or inspect.isfunction(obj):
            if not inspect.getdoc(obj):
                undocumented.append(attr)
            if inspect.isclass(obj):
                for meth_name, meth in vars(obj).items():
                    if meth_name.startswith("_") or not callable(meth):
                        continue
                    if not inspect.getdoc(meth):
                        undocumented.append(f"{attr}.{meth_name}")
    assert not undocumented, f"{name}: undocumented public names {undocumented}"


def test_core_imports_no_gpu_library() -> None:
    import subprocess
    import sys

    code = (
        "import sys, vramcore, vramcore.cli, vramcore.manager, vramcore.testing;"
        "bad = [m for m in ('cupy', 'pycuda', 'torch', 'opentelemetry') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"the core imported {out}"
