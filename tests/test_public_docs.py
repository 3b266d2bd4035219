"""Every public name of the core has a docstring, and ``__all__`` lists only real names."""

from __future__ import annotations

import importlib
from typing import Any

import pytest

from vramcore.testing import undocumented_public_names

MODULES = [
    "vramcore",
    "vramcore.audit",
    "vramcore.backend",
    "vramcore._cli",
    "vramcore._cli.cli",
    "vramcore._cli.commands",
    "vramcore._cli.demo",
    "vramcore._cli.support",
    "vramcore._core",
    "vramcore._digests",
    "vramcore._emitter",
    "vramcore._hookutil",
    "vramcore._loading",
    "vramcore._residency",
    "vramcore._sealing",
    "vramcore._startup",
    "vramcore._verification",
    "vramcore.digest",
    "vramcore.errors",
    "vramcore.events",
    "vramcore.manager",
    "vramcore.narration",
    "vramcore.plugins",
    "vramcore.policy",
    "vramcore.safetensors",
    "vramcore.scrub",
    "vramcore.seal",
    "vramcore.shard",
    "vramcore.testing",
    "vramcore.validation",
]


@pytest.mark.parametrize("name", MODULES)
def test_module_and_public_names_are_documented(name: str) -> None:
    assert hasattr(importlib.import_module(name), "__all__"), f"{name} has no __all__"
    assert undocumented_public_names(name) == []


def test_the_docs_check_finds_what_is_missing(tmp_path: Any, monkeypatch: Any) -> None:
    (tmp_path / "halfdone_module.py").write_text(
        '__all__ = ["Documented", "bare", "Half"]\n'
        'class Documented:\n    """Yes."""\n'
        "def bare(): pass\n"
        'class Half:\n    """Yes."""\n    def method(self): pass\n'
        "    @property\n    def prop(self): return 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert undocumented_public_names("halfdone_module") == [
        "<module>",
        "bare",
        "Half.method",
        "Half.prop",
    ]


def test_core_imports_no_gpu_library() -> None:
    import subprocess
    import sys

    code = (
        "import sys, vramcore, vramcore._cli.cli, vramcore.manager, vramcore.testing;"
        "bad = [m for m in ('cupy', 'pycuda', 'torch', 'opentelemetry') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"the core imported {out}"
