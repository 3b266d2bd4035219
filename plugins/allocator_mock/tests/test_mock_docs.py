"""The mock plugin's public names are documented."""

from __future__ import annotations

from vramcore.testing import undocumented_public_names


def test_public_names_are_documented() -> None:
    assert undocumented_public_names("vramcore_allocator_mock") == []
