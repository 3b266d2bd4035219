"""The backend conformance suite: the mock passes it in every configuration; broken backends
fail it.

``TestMockContract`` runs :class:`vramcore.testing.BackendContract` against the mock in each
of its configurations. The pytester tests run the same suite against backends with deliberate
bugs (a copy that completes late without a handle, a device digest with a wrong leaf) and
check that it fails them, in the tests that cover the bug and only there.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import vramcore_allocator_mock
from vramcore_allocator_mock import MockBackend

from vramcore.testing import BackendContract

pytest_plugins = ["pytester"]

#: Every configuration the mock is checked in (``MockBackend`` keyword arguments). All but
#: ``default`` answer the device-digest hook, so its tests run there; ``default`` shows the
#: suite skipping them, with the reason, for a backend no digest plugin knows.
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "device-digest": {"device_digest": True},
    "async": {"async_copies": True, "device_digest": True},
    "async-slow": {"async_copies": True, "copy_delay": 0.05, "device_digest": True},
    "uninitialised": {"uninitialised": True, "device_digest": True},
    "strict-close": {"strict_close": True, "device_digest": True},
    "opaque-native": {"opaque_native": True, "device_digest": True},
    "faithful+digest": {
        "async_copies": True,
        "uninitialised": True,
        "strict_close": True,
        "opaque_native": True,
        "device_digest": True,
    },
}


class TestMockContract(BackendContract):
    """The mock, in every configuration, keeps the backend contract."""

    @pytest.fixture(params=list(CONFIGS))
    def backend(self, request: pytest.FixtureRequest) -> Iterator[MockBackend]:
        backend = MockBackend(capacity=256 << 20, **CONFIGS[request.param])
        yield backend
        backend.close()

    @pytest.fixture
    def digest_plugins(self) -> Sequence[object]:
        return [vramcore_allocator_mock]


def test_the_faithful_configuration_really_answers_the_digest_hook() -> None:
    # Guards the matrix above: were the digest tests skipped everywhere, the device-digest
    # half of the contract would pass by never running.
    backend = MockBackend(capacity=1 << 20, **CONFIGS["faithful+digest"])
    buf = backend.allocate(0, 10)
    answer = vramcore_allocator_mock.vramcore_device_digest(
        backend=backend, buffer=buf, leaf_size=65536, leaf_range=None
    )
    assert answer is not None
    assert answer.leaf_count == 1


# -- the suite against broken backends ----------------------------------------------------

_PRELUDE = """
import pytest
import vramcore_allocator_mock
from vramcore_allocator_mock import MockBackend
from vramcore.backend import DeviceDigest
from vramcore.hookspecs import hookimpl
from vramcore.testing import BackendContract
"""

LATE_COPY = (
    _PRELUDE
    + '''
class LateCopyBackend(MockBackend):
    """Copies asynchronously but returns no handle: the caller cannot know when data is read."""

    def __init__(self):
        super().__init__(capacity=256 << 20, async_copies=True)

    def copy_in(self, buf, offset, data):
        super().copy_in(buf, offset, data)  # the handle is dropped
        return None


class TestLateCopy(BackendContract):
    @pytest.fixture
    def backend(self):
        backend = LateCopyBackend()
        yield backend
        backend.close()

    @pytest.fixture
    def digest_plugins(self):
        return []
'''
)

WRONG_LEAVES = (
    _PRELUDE
    + '''
class WrongLeafDigest:
    """A device digest whose root is right but whose last leaf hash is wrong."""

    @hookimpl
    def vramcore_device_digest(self, backend, buffer, leaf_size, leaf_range):
        right = backend.digest(buffer, leaf_size, leaf_range)
        leaves = bytearray(right.leaves)
        leaves[-1] ^= 1
        return DeviceDigest(root=right.root, leaves=bytes(leaves), first_leaf=right.first_leaf)


class TestWrongLeaves(BackendContract):
    @pytest.fixture
    def backend(self):
        backend = MockBackend(capacity=256 << 20, device_digest=True)
        yield backend
        backend.close()

    @pytest.fixture
    def digest_plugins(self):
        return [WrongLeafDigest()]
'''
)


def _failed_tests(pytester: pytest.Pytester, source: str) -> tuple[set[str], int]:
    """Run ``source`` with pytest in-process: the names of failed tests, and the pass count."""
    pytester.makepyfile(test_broken_backend=source)
    result = pytester.inline_run("-p", "no:cacheprovider")
    passed, _skipped, failed = result.listoutcomes()
    return {report.nodeid.split("::")[-1].split("[")[0] for report in failed}, len(passed)


def test_a_backend_completing_copies_late_without_a_handle_fails(
    pytester: pytest.Pytester,
) -> None:
    failed, passed = _failed_tests(pytester, LATE_COPY)
    assert failed == {
        "test_source_reuse_after_copy_in",
        "test_staging_buffers_feed_copies",
        "test_no_leak_after_injected_failures",  # a dropped handle loses the copy's error
    }
    assert passed > 20  # the rest of the contract holds: the suite names the bug


def test_a_device_digest_with_wrong_leaves_fails(pytester: pytest.Pytester) -> None:
    failed, passed = _failed_tests(pytester, WRONG_LEAVES)
    assert failed == {"test_device_digest_matches_host", "test_device_digest_of_leaf_ranges"}
    assert passed > 20


def test_a_correct_backend_passes_the_same_run(pytester: pytest.Pytester) -> None:
    # The control for the two tests above: the same harness, the broken part fixed.
    source = LATE_COPY.replace(
        "        return None\n", "        return super().copy_in(buf, offset, data)\n"
    )
    source = source.replace("super().copy_in(buf, offset, data)  # the handle is dropped\n", "")
    failed, passed = _failed_tests(pytester, source)
    assert failed == set()
    assert passed > 20


# -- the testing plugin: the namespaced GPU marker and the mock through its entry point -----

OTHER_PROJECT_CONFTEST = """
def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: this project's own marker")
"""

MARKED_TESTS = """
import pytest

@pytest.mark.vramcore_gpu
def test_needs_a_gpu():
    pass

@pytest.mark.gpu
def test_marked_with_another_projects_gpu_marker():
    pass

def test_plain():
    pass
"""


def test_only_vramcore_gpu_tests_are_skipped_without_a_gpu(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VRAMCORE_FORCE_GPU_TESTS", raising=False)
    monkeypatch.setenv("PATH", str(pytester.path))  # no nvidia-smi anywhere
    pytester.makeconftest(OTHER_PROJECT_CONFTEST)
    pytester.makepyfile(test_marked=MARKED_TESTS)
    result = pytester.inline_run("--strict-markers", "-p", "no:cacheprovider")
    passed, skipped, failed = result.listoutcomes()
    assert not failed
    assert sorted(r.nodeid.split("::")[-1] for r in passed) == [
        "test_marked_with_another_projects_gpu_marker",
        "test_plain",
    ]
    assert len(skipped) == 1
    assert "vramcore_gpu test: no NVIDIA driver (nvidia-smi not found)" in str(skipped[0].longrepr)


def test_vramcore_gpu_tests_run_when_forced(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VRAMCORE_FORCE_GPU_TESTS", "1")
    pytester.makepyfile(
        "import pytest\n\n@pytest.mark.vramcore_gpu\ndef test_needs_a_gpu():\n    pass\n"
    )
    result = pytester.inline_run("--strict-markers", "-p", "no:cacheprovider")
    result.assertoutcome(passed=1)


def test_the_mock_is_reached_through_its_entry_point(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vramcore import testing

    assert testing.mock_plugin() is vramcore_allocator_mock
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **_: [])
    testing.mock_plugin.cache_clear()
    try:
        assert testing.mock_plugin() is None  # importable, but not installed as the plugin
        pytester.makepyfile("def test_uses_the_mock(mock_backend):\n    pass\n")
        result = pytester.inline_run("-p", "no:cacheprovider")
        passed, skipped, failed = result.listoutcomes()
        assert (len(passed), len(skipped), len(failed)) == (0, 1, 0)
        assert "vramcore-allocator-mock is not installed" in str(skipped[0].longrepr)
    finally:
        testing.mock_plugin.cache_clear()


@pytest.mark.parametrize(
    "mock_backend", [{"async_copies": True, "capacity": 1 << 20}], indirect=True
)
def test_the_mock_backend_fixture_takes_options(mock_backend: MockBackend) -> None:
    assert mock_backend.async_copies
    assert mock_backend.mem_info(0) == (1 << 20, 1 << 20)


def test_the_mock_backend_fixture_defaults(mock_backend: MockBackend) -> None:
    assert not mock_backend.async_copies
    assert mock_backend.mem_info(0) == (1 << 30, 1 << 30)
