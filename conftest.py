"""Settings for the whole test suite (core and plugins).

Hypothesis runs derandomized with no example database: CI sees the same examples on every
run (a red CI blocks landing, so a property test must not fail by chance), and nothing is
written to the working tree. To hunt for new counterexamples locally, run with
``--hypothesis-profile=explore`` (fresh random examples each run).
"""

from hypothesis import settings

settings.register_profile("vramcore", database=None, deadline=None, derandomize=True)
settings.register_profile("explore", database=None, deadline=None)
settings.load_profile("vramcore")
