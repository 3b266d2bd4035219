"""Every module and public name of the plugin is documented; ``__all__`` names real objects."""

from __future__ import annotations

import pytest

from vramcore.testing import undocumented_public_names

MODULES = [
    "vramcore_audit_chain",
    "vramcore_audit_chain._cli",
    "vramcore_audit_chain._config",
    "vramcore_audit_chain._encode",
    "vramcore_audit_chain._format",
    "vramcore_audit_chain._head",
    "vramcore_audit_chain._keys",
    "vramcore_audit_chain._recovery",
    "vramcore_audit_chain._sink",
    "vramcore_audit_chain._verify",
    "vramcore_audit_chain._witness",
    "vramcore_audit_chain._writer",
]


@pytest.mark.parametrize("name", MODULES)
def test_public_names_are_documented(name: str) -> None:
    assert undocumented_public_names(name) == []


def test_every_reason_is_documented_in_the_format() -> None:
    from pathlib import Path

    from vramcore_audit_chain import REASONS

    text = (Path(__file__).parents[1] / "FORMAT.md").read_text()
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for reason in REASONS:
        assert f"`{reason}`" in text and f"`{reason}`" in readme, reason
