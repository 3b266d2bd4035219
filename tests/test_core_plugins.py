"""The plugin manager factory, entry-point loading and allocator backend selection."""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import vramcore_allocator_mock

import vramcore.plugins
from vramcore import VramManager, hookimpl
from vramcore.backend import BackendSpec
from vramcore.errors import BackendUnavailable, ConfigError, InvalidInput
from vramcore.plugins import collect_backends, get_plugin_manager, select_backend
from vramcore.testing import TEST_TOKEN

GOOD = """
from vramcore import hookimpl
from vramcore.backend import BackendSpec

@hookimpl
def vramcore_allocator_backends():
    return [BackendSpec(name="{name}", priority=1, probe=lambda: None, factory=lambda: None)]
"""
BROKEN = """
raise ImportError("No module named 'cupy_cuda99x'")
"""
UNKNOWN_HOOK = """
from vramcore import hookimpl

@hookimpl
def vramcore_allocator_backends():
    return []

def vramcore_not_a_hook():
    return None
"""


@pytest.fixture
def entry_points(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., list[importlib.metadata.EntryPoint]]:
    """``entry_points(name=source, ...)``: installs fake ``vramcore`` entry points.

    Each source becomes a module of a unique name in ``tmp_path``; the installed entry points
    are replaced by exactly these.
    """
    monkeypatch.syspath_prepend(str(tmp_path))
    created: list[str] = []

    def install(**sources: str) -> list[importlib.metadata.EntryPoint]:
        eps = []
        for name, source in sources.items():
            module = f"vc_test_{name}_{uuid.uuid4().hex[:8]}"
            (tmp_path / f"{module}.py").write_text(textwrap.dedent(source.format(name=name)))
            created.append(module)
            eps.append(importlib.metadata.EntryPoint(name, module, "vramcore"))

        def fake(**kwargs: Any) -> list[importlib.metadata.EntryPoint]:
            assert kwargs == {"group": "vramcore"}
            return list(eps)

        monkeypatch.setattr(vramcore.plugins.importlib.metadata, "entry_points", fake)
        return eps

    yield install
    for module in created:
        sys.modules.pop(module, None)


def _backend_names(pm: Any) -> list[str]:
    return sorted(collect_backends(pm))


# -- the factory ----------------------------------------------------------------------------


def test_each_call_builds_a_fresh_manager() -> None:
    a = get_plugin_manager(load_entrypoints=False)
    b = get_plugin_manager(load_entrypoints=False)
    assert a is not b
    a.register(vramcore_allocator_mock, name="mock-only-in-a")
    assert a.has_plugin("mock-only-in-a")
    assert not b.has_plugin("mock-only-in-a")
    assert _backend_names(a) == ["mock"]
    assert _backend_names(b) == []


def test_there_is_no_module_global_manager() -> None:
    assert not any(
        isinstance(value, vramcore.plugins.VramcorePluginManager)
        for value in vars(vramcore.plugins).values()
    )


def test_direct_plugin_with_an_unknown_hook_is_rejected() -> None:
    class Typo:
        @hookimpl
        def vramcore_audit_sink(self, context: Any) -> list[Any]:  # missing "s"
            return []

    with pytest.raises(ConfigError, match="vramcore_audit_sink") as info:
        get_plugin_manager([Typo()], load_entrypoints=False)
    assert "vramcore_audit_sinks" in str(info.value)  # the known hooks are listed


def test_direct_plugin_with_wrong_hook_arguments_is_a_config_error() -> None:
    class WrongArgs:
        @hookimpl
        def vramcore_seal_key(self, token: Any, key_id: str) -> None:
            return None

    with pytest.raises(ConfigError, match="key_id"):
        get_plugin_manager([WrongArgs()], load_entrypoints=False)


def test_direct_plugins_are_listed_with_their_hooks() -> None:
    pm = get_plugin_manager([vramcore_allocator_mock], load_entrypoints=False)
    (info,) = pm.loaded
    # An installed plugin module passed directly keeps its entry-point name (the scope of its
    # keys), so it is the same plugin in a test as in production.
    assert info.name == "mock"
    assert "vramcore_allocator_backends" in info.hooks


def test_plugin_objects_that_are_not_installed_keep_their_own_names() -> None:
    class Local:
        pass

    module = type(vramcore_allocator_mock)("my_local_plugin")
    pm = get_plugin_manager([module, Local()], load_entrypoints=False)
    names = [p.name for p in pm.loaded]
    assert names[0] == "my_local_plugin"
    assert names[1].startswith("Local-")


# -- entry points ---------------------------------------------------------------------------


def test_entry_point_plugins_are_loaded(entry_points: Any) -> None:
    entry_points(alpha=GOOD, beta=GOOD)
    pm = get_plugin_manager(env={})
    assert _backend_names(pm) == ["alpha", "beta"]
    assert [p.name for p in pm.loaded] == ["alpha", "beta"]
    assert pm.failures == []


def test_broken_plugin_is_reported_and_skipped(entry_points: Any) -> None:
    entry_points(alpha=GOOD, broken=BROKEN)
    with pytest.warns(RuntimeWarning, match="'broken'.*skipped.*cupy_cuda99x"):
        pm = get_plugin_manager(env={})
    assert _backend_names(pm) == ["alpha"]
    (failure,) = pm.failures
    assert failure.name == "broken"
    assert failure.error.startswith("ImportError: ")
    assert "cupy_cuda99x" in failure.error


def test_broken_plugin_is_fatal_when_strict(entry_points: Any) -> None:
    entry_points(alpha=GOOD, broken=BROKEN)
    with pytest.raises(ConfigError, match=r"broken.*failed to load"):
        get_plugin_manager(env={}, strict=True)
    with pytest.raises(ConfigError):
        get_plugin_manager(env={"VRAMCORE_STRICT_PLUGINS": "1"})


def test_entry_point_with_an_unknown_hook_is_skipped(entry_points: Any) -> None:
    entry_points(odd=UNKNOWN_HOOK, alpha=GOOD)
    with pytest.warns(RuntimeWarning, match="vramcore_not_a_hook"):
        pm = get_plugin_manager(env={})
    assert [f.name for f in pm.failures] == ["odd"]
    assert not pm.has_plugin("odd")
    assert [p.name for p in pm.loaded] == ["alpha"]


@pytest.mark.parametrize(
    ("env", "loaded", "failed"),
    [
        ({}, ["alpha", "beta"], ["broken"]),
        ({"VRAMCORE_PLUGINS": "alpha"}, ["alpha"], []),
        ({"VRAMCORE_PLUGINS": " beta , alpha "}, ["alpha", "beta"], []),
        ({"VRAMCORE_PLUGINS": ""}, [], []),
        ({"VRAMCORE_PLUGINS": "nonexistent"}, [], []),
        ({"VRAMCORE_DISABLE_PLUGINS": "broken"}, ["alpha", "beta"], []),
        ({"VRAMCORE_DISABLE_PLUGINS": "broken,alpha"}, ["beta"], []),
        ({"VRAMCORE_PLUGINS": "alpha,broken", "VRAMCORE_DISABLE_PLUGINS": "broken"}, ["alpha"], []),
    ],
)
def test_allowlist_and_denylist(
    entry_points: Any, env: dict[str, str], loaded: list[str], failed: list[str]
) -> None:
    entry_points(alpha=GOOD, beta=GOOD, broken=BROKEN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = get_plugin_manager(env=env)
    assert sorted(p.name for p in pm.loaded) == loaded
    assert _backend_names(pm) == loaded
    assert [f.name for f in pm.failures] == failed
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == len(failed)


def test_environment_is_read_from_os_environ_by_default(
    entry_points: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry_points(alpha=GOOD, beta=GOOD)
    monkeypatch.setenv("VRAMCORE_PLUGINS", "beta")
    assert _backend_names(get_plugin_manager()) == ["beta"]
    monkeypatch.setenv("VRAMCORE_PLUGINS", "")
    assert _backend_names(get_plugin_manager()) == []


def test_installed_mock_entry_point_loads() -> None:
    pm = get_plugin_manager(env={"VRAMCORE_PLUGINS": "mock"})
    (info,) = pm.loaded
    assert info.name == "mock"
    assert info.distribution == "vramcore-allocator-mock"
    assert "vramcore_allocator_backends" in info.hooks
    assert pm.failures == []


def test_plugin_given_directly_and_installed_is_registered_once() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pm = get_plugin_manager([vramcore_allocator_mock], env={"VRAMCORE_PLUGINS": "mock"})
    assert pm.failures == []
    assert _backend_names(pm) == ["mock"]


def test_load_entrypoints_false_loads_nothing(entry_points: Any) -> None:
    entry_points(alpha=GOOD)
    assert _backend_names(get_plugin_manager(load_entrypoints=False, env={})) == []


# -- backend selection ----------------------------------------------------------------------


class Backends:
    """A plugin offering the given specs."""

    def __init__(self, *specs: BackendSpec) -> None:
        self.specs = list(specs)

    @hookimpl
    def vramcore_allocator_backends(self) -> list[BackendSpec]:
        return self.specs


def spec(name: str, priority: int, why_not: str | None = None, **kw: Any) -> BackendSpec:
    return BackendSpec(
        name=name, priority=priority, probe=lambda: why_not, factory=lambda: None, **kw
    )


def _raising_probe() -> str | None:
    raise RuntimeError("libcuda.so: cannot open shared object file")


@pytest.fixture
def pm(make_plugin_manager: Any) -> Any:
    return make_plugin_manager(
        Backends(
            spec("low", 1),
            spec("high", 10),
            spec("gpu", 50, "no CUDA driver found", install_hint="pip install gpu-extra"),
            BackendSpec(name="crashy", priority=99, probe=_raising_probe, factory=lambda: None),
        )
    )


def test_highest_priority_viable_backend_wins(pm: Any) -> None:
    assert select_backend(pm, env={}).name == "high"


def test_environment_beats_priority(pm: Any) -> None:
    assert select_backend(pm, env={"VRAMCORE_ALLOCATOR": "low"}).name == "low"
    assert select_backend(pm, env={"VRAMCORE_ALLOCATOR": "mock"}).name == "mock"


def test_explicit_name_beats_environment(pm: Any) -> None:
    assert select_backend(pm, "mock", env={"VRAMCORE_ALLOCATOR": "low"}).name == "mock"


def test_unknown_name_lists_the_choices(pm: Any) -> None:
    with pytest.raises(BackendUnavailable) as info:
        select_backend(pm, "cuda", env={})
    assert info.value.choices == ("crashy", "gpu", "high", "low", "mock")
    message = str(info.value)
    assert "'cuda'" in message
    assert "crashy, gpu, high, low, mock" in message
    with pytest.raises(BackendUnavailable, match="VRAMCORE_ALLOCATOR 'cuda'"):
        select_backend(pm, env={"VRAMCORE_ALLOCATOR": "cuda"})


def test_non_viable_named_backend_says_why_and_what_to_install(pm: Any) -> None:
    with pytest.raises(BackendUnavailable) as info:
        select_backend(pm, "gpu", env={})
    assert "no CUDA driver found" in str(info.value)
    assert "pip install gpu-extra" in str(info.value)


def test_probe_that_raises_is_not_viable(pm: Any) -> None:
    crashy = collect_backends(pm)["crashy"]
    reason = crashy.why_not()
    assert reason is not None
    assert "RuntimeError" in reason and "libcuda.so" in reason
    with pytest.raises(BackendUnavailable, match="viability probe failed"):
        select_backend(pm, "crashy", env={})


def test_no_viable_backend_lists_every_reason(make_plugin_manager: Any) -> None:
    pm = make_plugin_manager(
        Backends(spec("gpu", 50, "no CUDA driver found"), spec("tpu", 5, "not a TPU host")),
        mock=False,
    )
    with pytest.raises(BackendUnavailable) as info:
        select_backend(pm, env={})
    assert "gpu: no CUDA driver found" in str(info.value)
    assert "tpu: not a TPU host" in str(info.value)


def test_no_backend_installed_says_what_to_install(make_plugin_manager: Any) -> None:
    pm = make_plugin_manager(mock=False)
    with pytest.raises(
        BackendUnavailable, match=r"pip install \./ \./plugins/allocator_mock"
    ) as info:
        select_backend(pm, env={})
    assert info.value.choices == ()
    # No advice to install a name from an index this project does not publish to.
    assert "pip install vramcore-" not in str(info.value)


def test_duplicate_backend_names_are_rejected(make_plugin_manager: Any) -> None:
    pm = make_plugin_manager(Backends(spec("mock", 5)))
    with pytest.raises(ConfigError, match="two plugins offer an allocator backend named 'mock'"):
        select_backend(pm, env={})


def test_a_plugin_offering_something_else_is_rejected(make_plugin_manager: Any) -> None:
    class Junk:
        @hookimpl
        def vramcore_allocator_backends(self) -> list[object]:
            return ["mock"]

    with pytest.raises(ConfigError, match="not a BackendSpec"):
        collect_backends(make_plugin_manager(Junk()))


def test_manager_selects_its_backend_by_name_and_env(
    make_plugin_manager: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VRAMCORE_MOCK_VRAM", "2x64MiB")
    pm = make_plugin_manager()
    with VramManager(TEST_TOKEN, allocator="mock", plugin_manager=pm, audit="disabled") as m:
        assert m.backend_name == "mock"
        assert m.total_vram() == 64 << 20
    monkeypatch.setenv("VRAMCORE_ALLOCATOR", "mock")
    with VramManager(TEST_TOKEN, 1, plugin_manager=pm, audit="disabled") as m:
        assert m.device == 1
    monkeypatch.setenv("VRAMCORE_ALLOCATOR", "nope")
    with pytest.raises(BackendUnavailable, match="choose one of: mock"):
        VramManager(TEST_TOKEN, plugin_manager=pm, audit="disabled")
    with pytest.raises(InvalidInput, match="allocator must be"):
        VramManager(TEST_TOKEN, allocator=42, plugin_manager=pm, audit="disabled")  # type: ignore[arg-type]


def test_manager_closes_the_backend_it_made_not_one_it_was_given(
    make_plugin_manager: Any, mock_backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[Any] = []
    original = vramcore_allocator_mock.MockBackend.from_env

    def from_env(env: Any = None) -> Any:
        made.append(original(env))
        return made[-1]

    monkeypatch.setattr(vramcore_allocator_mock.MockBackend, "from_env", from_env)
    pm = make_plugin_manager()
    with VramManager(TEST_TOKEN, allocator="mock", plugin_manager=pm, audit="disabled"):
        pass
    assert made and made[0].closed
    with VramManager(TEST_TOKEN, allocator=mock_backend, plugin_manager=pm, audit="disabled"):
        pass
    assert not mock_backend.closed
