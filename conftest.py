"""Settings for the whole test suite (core and plugins).

Hypothesis runs derandomized with no example database: CI sees the same examples on every
run (a red CI blocks landing, so a property test must not fail by chance), and nothing is
written to the working tree. To hunt for new counterexamples locally, run with
``--hypothesis-profile=explore`` (fresh random examples each run).
"""

import os
from collections.abc import Iterator

import pytest
from hypothesis import settings

settings.register_profile("vramcore", database=None, deadline=None, derandomize=True)
settings.register_profile("explore", database=None, deadline=None)
settings.load_profile("vramcore")


@pytest.fixture(autouse=True)
def _name_the_mock_allocator() -> Iterator[None]:
    """Name the mock backend for every test: it is never chosen unless named.

    Tests that exercise backend selection itself delete the variable again (with their own
    ``monkeypatch``). Set by hand rather than through ``monkeypatch``, so that a test's own
    ``monkeypatch`` is still torn down before the other autouse fixtures of its module.
    """
    before = os.environ.get("VRAMCORE_ALLOCATOR")
    os.environ["VRAMCORE_ALLOCATOR"] = "mock"
    yield
    if before is None:
        os.environ.pop("VRAMCORE_ALLOCATOR", None)
    else:
        os.environ["VRAMCORE_ALLOCATOR"] = before
