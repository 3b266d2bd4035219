"""Meta-test: every hook in vramcore.hookspecs is exercised by at least one test.

``tests/conftest.py`` records, for every plugin manager built during a test of this
directory, the hooks called with an implementation other than the core's defaults; this test
runs last (the conftest moves it) and compares that record with the hook specs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vramcore import hookspecs

HOOKS = {name for name in dir(hookspecs) if name.startswith("vramcore_")}


def test_every_hook_is_exercised_by_some_test(
    request: pytest.FixtureRequest, exercised_hooks: set[str]
) -> None:
    here = Path(__file__).parent
    wanted = {p.name for p in here.glob("test_*.py")}
    collected = {item.path.name for item in request.session.items if item.path.parent == here}
    if collected != wanted or request.session.testsfailed:
        pytest.skip(
            "hook coverage is only meaningful when every test of tests/ ran and passed "
            f"(collected {len(collected)}/{len(wanted)} modules)"
        )
    missing = sorted(HOOKS - exercised_hooks)
    assert not missing, f"hooks no test exercises with a plugin implementation: {missing}"
    assert exercised_hooks <= HOOKS, exercised_hooks - HOOKS
