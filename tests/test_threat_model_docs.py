"""The README's threat model names the test proving each claim: each named test exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_test_the_threat_model_names_exists() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Threat model") :]
    section = section[: section.index("\n## ", 3)]
    named = set(re.findall(r"`(test_[a-z0-9_]+)`", section))
    assert len(named) >= 15, named
    defined = {
        match
        for path in (ROOT / "tests").glob("test_attack_*.py")
        for match in re.findall(r"^def (test_[a-z0-9_]+)\(", path.read_text(), re.MULTILINE)
    }
    assert sorted(named - defined) == []
