"""The pycuda plugin's public names are documented, and so are its private modules'."""

from __future__ import annotations

import pytest

from vramcore.testing import undocumented_public_names


@pytest.mark.parametrize(
    "module",
    [
        "vramcore_allocator_pycuda",
        "vramcore_allocator_pycuda._api",
        "vramcore_allocator_pycuda._backend",
        "vramcore_allocator_pycuda._contexts",
        "vramcore_allocator_pycuda._copies",
        "vramcore_allocator_pycuda._dlpack",
        "vramcore_allocator_pycuda._kernels",
        "vramcore_allocator_pycuda._native",
        "vramcore_allocator_pycuda._probe",
    ],
)
def test_public_names_are_documented(module: str) -> None:
    assert undocumented_public_names(module) == []
