"""The serving modules document every public name (the same check as test_public_docs)."""

from __future__ import annotations

import importlib

import pytest

from vramcore.testing import undocumented_public_names


@pytest.mark.parametrize(
    "name",
    [
        "vramcore._dlpack",
        "vramcore._tensors",
        "vramcore._modeldir",
        "vramcore._publisher",
        "vramcore._sealdir",
        "vramcore._cli.sealdir",
        "vramcore._cli.verify",
        "vramcore.torch",
        "vramcore_allocator_mock._tensors",
        "vramcore_allocator_cupy._tensors",
        "vramcore_allocator_pycuda._tensors",
    ],
)
def test_serving_names_are_documented(name: str) -> None:
    importlib.import_module(name)
    assert undocumented_public_names(name) == []
