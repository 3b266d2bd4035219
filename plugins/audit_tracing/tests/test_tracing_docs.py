"""Every module and public name of the tracing plugin is documented."""

from __future__ import annotations

import pytest

from vramcore.testing import undocumented_public_names

MODULES = [
    "vramcore_audit_tracing",
    "vramcore_audit_tracing._attributes",
    "vramcore_audit_tracing._metrics",
    "vramcore_audit_tracing._narration",
    "vramcore_audit_tracing._plugin",
    "vramcore_audit_tracing._sink",
    "vramcore_audit_tracing._witness",
]


@pytest.mark.parametrize("name", MODULES)
def test_public_names_are_documented(name: str) -> None:
    assert undocumented_public_names(name) == []
