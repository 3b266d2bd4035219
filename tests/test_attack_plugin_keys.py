"""Attacks by an installed plugin on other plugins' keys and on the seal key.

Each test plays a hostile plugin that uses only what the hook interfaces hand it (public API,
then private attributes) and checks it gains nothing: not another plugin's keys, not the
plugin master key, not the seal key, not the worker token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

import attrs
import pytest
import vramcore_audit_chain as chain_plugin
from vramcore_audit_chain import _format as chain_format

from vramcore import VramManager, hookimpl
from vramcore.audit import PLUGIN_MASTER_INFO, AuditSink, SinkContext
from vramcore.errors import ConfigError, NotSealed
from vramcore.events import AuditEvent
from vramcore.seal import SEAL_KEY_INFO, SecretKey, WorkerToken
from vramcore.testing import TEST_TOKEN, CapturingSink

MASTER = WorkerToken(TEST_TOKEN).derive(PLUGIN_MASTER_INFO).export()
SEAL_KEY = WorkerToken(TEST_TOKEN).derive(SEAL_KEY_INFO).export()


def _reachable_keys(obj: object, depth: int = 3) -> Iterator[bytes]:
    """The raw bytes of every key reachable from ``obj`` through its attributes, private
    ones included (``__dict__``, ``__slots__`` with their mangled names, attrs fields)."""
    if isinstance(obj, SecretKey):
        if not obj.wiped:
            yield obj.export()
        return
    if depth == 0 or isinstance(obj, str | bytes | int | float | type(None)):
        return
    names: set[str] = set(getattr(obj, "__dict__", {}))
    for klass in type(obj).__mro__:
        for slot in getattr(klass, "__slots__", ()):
            names.add(f"_{klass.__name__.lstrip('_')}{slot}" if slot.startswith("__") else slot)
    for name in names:
        try:
            value = object.__getattribute__(obj, name)
        except AttributeError:
            continue
        yield from _reachable_keys(value, depth - 1)


class KeyedSink(CapturingSink):
    """A sink that derives its plugin key when it first records an event."""

    def __init__(self, context: SinkContext, purpose: str) -> None:
        super().__init__()
        self.context = context
        self.purpose = purpose
        self.key: bytes | None = None

    def emit(self, event: AuditEvent) -> None:
        if self.key is None:
            self.key = self.context.derive_key(self.purpose).export()
        super().emit(event)


class Victim:
    """An honest plugin with a key of its own."""

    __name__ = "victim"

    def __init__(self) -> None:
        self.context: SinkContext | None = None
        self.sink: KeyedSink | None = None

    @hookimpl
    def vramcore_audit_sinks(self, context: SinkContext) -> Sequence[AuditSink]:
        self.context = context
        self.sink = KeyedSink(context, "victim/state")
        return [self.sink]


class Thief:
    """A hostile plugin: keeps its context to attack it, and wipes it if told to."""

    __name__ = "thief"

    def __init__(self, *, wipe: bool = False) -> None:
        self.context: SinkContext | None = None
        self.wipe = wipe

    @hookimpl
    def vramcore_audit_sinks(self, context: SinkContext) -> Sequence[AuditSink]:
        self.context = context
        if self.wipe:
            context.wipe()
        return []


def _start(new_manager: Any, mock_backend: Any, *plugins: object) -> VramManager:
    manager: VramManager = new_manager(mock_backend, *plugins)
    manager.seal_model(b"weights" * 100, shard_id="s")
    return manager


def test_a_plugin_cannot_evolve_or_re_point_its_context_to_another_plugins_scope(
    new_manager: Any, mock_backend: Any
) -> None:
    victim, thief = Victim(), Thief()
    _start(new_manager, mock_backend, victim, thief)
    assert victim.context is not None and thief.context is not None and victim.sink is not None
    wanted = victim.sink.key
    assert wanted is not None
    forged: list[SinkContext] = []
    if attrs.has(type(thief.context)):  # the public attrs API on a public class
        forged.append(attrs.evolve(thief.context, scope=victim.context.scope))
    object.__setattr__(thief.context, "scope", victim.context.scope)  # re-point, frozen or not
    forged.append(thief.context)
    for context in forged:
        assert context.derive_key("victim/state").export() != wanted


def test_a_plugin_reading_private_attributes_finds_only_its_own_key(
    new_manager: Any, mock_backend: Any
) -> None:
    victim, thief = Victim(), Thief()
    _start(new_manager, mock_backend, victim, thief)
    stolen = set(_reachable_keys(thief.context))
    assert stolen, "the thief's context should hold its own key"
    assert MASTER not in stolen
    assert SEAL_KEY not in stolen
    assert stolen.isdisjoint(set(_reachable_keys(victim.context)))
    # Whatever it found, no key derivable from it through the context is the victim's.
    assert victim.sink is not None and victim.sink.key is not None
    for raw in stolen:
        for info in (b"victim/state", PLUGIN_MASTER_INFO, SEAL_KEY_INFO):
            assert SecretKey(bytearray(raw)).derive(info).export() != victim.sink.key


def test_one_plugin_wiping_its_context_leaves_every_other_plugins_keys(
    new_manager: Any, mock_backend: Any
) -> None:
    victim = Victim()
    # The thief is registered last, so pluggy asks it first: it wipes before the victim starts.
    manager = _start(new_manager, mock_backend, victim, Thief(wipe=True))
    assert victim.sink is not None and victim.sink.key is not None
    assert victim.context is not None
    assert victim.context.derive_key("victim/state").export() == victim.sink.key
    manager.close()
    with pytest.raises(Exception, match="wiped"):
        victim.context.derive_key("victim/state")  # every plugin key dies with the manager


def test_the_audit_chain_gets_the_keys_its_cli_re_derives(
    make_plugin_manager: Any, mock_backend: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VRAMCORE_AUDIT_LOG", str(tmp_path / "log"))
    purpose = chain_format.CHECKPOINT_SIGNING_PURPOSE
    seen: list[tuple[str, bytes]] = []
    real_sink = chain_plugin.ChainSink

    def spying_sink(config: Any, context: SinkContext, **kwargs: Any) -> Any:
        seen.append((context.scope, context.derive_key(purpose).export()))
        return real_sink(config, context, **kwargs)

    monkeypatch.setattr(chain_plugin, "ChainSink", spying_sink)
    pm = make_plugin_manager(chain_plugin)
    with VramManager(TEST_TOKEN, allocator=mock_backend, plugin_manager=pm):
        pass
    offline = SinkContext.from_token(
        WorkerToken(TEST_TOKEN), worker_id="", device=-1, scope=chain_format.KEY_SCOPE
    )
    assert seen == [(chain_format.KEY_SCOPE, offline.derive_key(purpose).export())]


# -- identity: distribution and entry-point name ------------------------------------------


class _Dist:
    def __init__(self, name: str) -> None:
        self.name = name
        self.version = "6.6.6"


class _EntryPoint:
    """An installed entry point, as importlib.metadata describes one."""

    def __init__(self, name: str, target: object, dist: str) -> None:
        self.name = name
        self.value = getattr(target, "__name__", name)
        self.group = "vramcore"
        self.dist = _Dist(dist)
        self._target = target

    def load(self) -> object:
        return self._target


def _install(monkeypatch: pytest.MonkeyPatch, *eps: _EntryPoint) -> None:
    import importlib.metadata

    def entry_points(**params: Any) -> list[_EntryPoint]:
        return [ep for ep in eps if params.get("group", "vramcore") == "vramcore"]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def _chain_context(pm: Any, mock_backend: Any) -> list[SinkContext]:
    seen: list[SinkContext] = []

    @hookimpl(wrapper=True)
    def vramcore_audit_sinks(context: SinkContext) -> Any:
        seen.append(context)
        return (yield)

    spy = ModuleType("spy")
    spy.vramcore_audit_sinks = vramcore_audit_sinks  # type: ignore[attr-defined]
    pm.register(spy, name="spy")
    with VramManager(TEST_TOKEN, allocator=mock_backend, plugin_manager=pm, audit="required"):
        pass
    return seen


def test_an_alias_entry_point_of_another_distribution_cannot_rename_the_chain_scope(
    monkeypatch: pytest.MonkeyPatch, mock_backend: Any, tmp_path: Any
) -> None:
    from vramcore.plugins import get_plugin_manager

    monkeypatch.setenv("VRAMCORE_AUDIT_LOG", str(tmp_path / "log"))
    # "aaa" sorts first: loaded first, it would register the chain under its own name.
    _install(
        monkeypatch,
        _EntryPoint("audit_chain", chain_plugin, "vramcore-audit-chain"),
        _EntryPoint("aaa", chain_plugin, "evil-aliases"),
    )
    with pytest.warns(RuntimeWarning):
        pm = get_plugin_manager(env={})
    names = [pm.get_name(p) for p in pm.get_plugins()]
    assert "aaa" not in names  # the alias never names the chain
    if pm.is_registered(chain_plugin):
        assert pm.get_name(chain_plugin) == "audit_chain"
        seen = _chain_context(pm, mock_backend)
        assert {c.scope for c in seen} <= {chain_format.KEY_SCOPE}
    else:  # refused and reported, never loaded under a name that changes its keys
        assert any("aaa" in f.distribution or "aaa" in f.name for f in pm.failures)


def test_another_distribution_cannot_take_the_chain_name_and_its_keys(
    monkeypatch: pytest.MonkeyPatch, mock_backend: Any, tmp_path: Any
) -> None:
    from vramcore.plugins import get_plugin_manager

    monkeypatch.setenv("VRAMCORE_AUDIT_LOG", str(tmp_path / "log"))
    impostor = ModuleType("impostor")
    purpose = chain_format.CHECKPOINT_SIGNING_PURPOSE
    got: list[bytes] = []

    @hookimpl
    def vramcore_audit_sinks(context: SinkContext) -> Sequence[AuditSink]:
        got.append(context.derive_key(purpose).export())
        return [CapturingSink()]

    impostor.vramcore_audit_sinks = vramcore_audit_sinks  # type: ignore[attr-defined]
    # The real chain is not installed; another distribution registers its entry-point name.
    _install(monkeypatch, _EntryPoint("audit_chain", impostor, "evil-chain"))
    pm = get_plugin_manager(env={})
    with VramManager(TEST_TOKEN, allocator=mock_backend, plugin_manager=pm):
        pass
    (taken,) = got
    real = SinkContext.from_token(
        WorkerToken(TEST_TOKEN), worker_id="", device=-1, scope=chain_format.KEY_SCOPE
    )
    assert taken != real.derive_key(purpose).export()


# -- the seal key ----------------------------------------------------------------------------

ATTACKER_KEY = b"a" * 16 + b"known to the attacker"


class UnnamedKeyProvider:
    """A plugin implementing the key hook, never named by the operator."""

    __name__ = "sneaky"

    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    def vramcore_seal_key(self, worker_id: str) -> SecretKey:
        self.calls.append(worker_id)
        return SecretKey(bytearray(ATTACKER_KEY), label=b"attacker")


def test_a_seal_key_hook_the_operator_did_not_name_is_never_called(
    new_manager: Any, mock_backend: Any
) -> None:
    sneaky = UnnamedKeyProvider()
    manager = new_manager(mock_backend, sneaky, audit="disabled")
    shard = manager.seal_model(b"weights" * 1000, shard_id="s")
    assert sneaky.calls == []
    # The seal is signed by the key derived from the token: another manager with the same
    # token and no plugin accepts the signature (the shard is just not resident there).
    plain = new_manager(mock_backend, audit="disabled")
    with pytest.raises(NotSealed):
        plain.verify_sealed(shard)


class KeyWrapper:
    """A wrapper around the key hook, as a tracing plugin would write one."""

    __name__ = "key_wrapper"

    def __init__(self) -> None:
        self.seen: list[object] = []

    @hookimpl(wrapper=True)
    def vramcore_seal_key(self, worker_id: str) -> Any:
        result = yield
        self.seen.append(result)
        return result


class NamedKms:
    """A key provider the operator names (a KMS stand-in)."""

    __name__ = "kms"

    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    def vramcore_seal_key(self, worker_id: str) -> SecretKey:
        self.calls.append(worker_id)
        return SecretKey(bytearray(b"k" * 32), label=b"kms")


def test_a_wrapper_around_the_key_hook_sees_no_key(
    new_manager: Any, mock_backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VRAMCORE_SEAL_KEY_PROVIDER", "kms")
    wrapper, kms = KeyWrapper(), NamedKms()
    manager = new_manager(mock_backend, kms, wrapper, audit="disabled")
    manager.seal_model(b"weights" * 1000, shard_id="s")
    assert kms.calls == [manager.worker_id]
    assert not any(isinstance(seen, SecretKey | WorkerToken) for seen in wrapper.seen)


def test_a_key_provider_is_never_handed_the_worker_token(
    make_plugin_manager: Any, mock_backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VRAMCORE_SEAL_KEY_PROVIDER", "greedy")
    received: list[object] = []

    class Greedy:
        __name__ = "greedy"

        @hookimpl
        def vramcore_seal_key(self, token: Any, worker_id: str) -> SecretKey:
            received.append(token)
            return SecretKey(bytearray(b"g" * 32), label=b"greedy")

    # A provider asking for the token is refused outright, when it is registered.
    def start() -> None:
        pm = make_plugin_manager(Greedy())
        VramManager(TEST_TOKEN, allocator=mock_backend, plugin_manager=pm, audit="disabled")

    with pytest.raises(ConfigError, match="greedy"):
        start()
    assert received == []


# -- what a narration wrapper is handed ---------------------------------------------------


def _reachable_secrets(obj: object, depth: int = 6) -> list[str]:
    """Paths to every key or token reachable from ``obj`` through attributes (private ones
    too), closures, bound methods and containers: what a hostile wrapper could walk."""
    found: list[str] = []
    seen: set[int] = set()

    def walk(value: object, left: int, path: str) -> None:
        if id(value) in seen or left < 0:
            return
        seen.add(id(value))
        if isinstance(value, SecretKey | WorkerToken):
            found.append(path)
            return
        if isinstance(value, str | bytes | int | float | type | ModuleType | type(None)):
            return
        children: list[tuple[str, object]] = []
        with contextlib.suppress(TypeError):
            children += list(vars(value).items())
        for klass in type(value).__mro__:
            for slot in getattr(klass, "__slots__", ()):
                name = f"_{klass.__name__.lstrip('_')}{slot}" if slot.startswith("__") else slot
                with contextlib.suppress(AttributeError):
                    children.append((name, object.__getattribute__(value, name)))
        for name in ("__self__", "__func__", "__wrapped__"):
            if hasattr(value, name):
                children.append((name, getattr(value, name)))
        for index, cell in enumerate(getattr(value, "__closure__", None) or ()):
            with contextlib.suppress(ValueError):
                children.append((f"<closure {index}>", cell.cell_contents))
        if isinstance(value, list | tuple | set | frozenset):
            children += [(f"[{i}]", v) for i, v in enumerate(value)]
        if isinstance(value, dict):
            children += [(f"[{k!r}]", v) for k, v in value.items()]
        for name, child in children:
            walk(child, left - 1, f"{path}.{name}")

    walk(obj, depth, "op")
    return found


def test_a_narration_wrapper_reaches_no_key_through_the_operation_it_is_handed(
    new_manager: Any, mock_backend: Any
) -> None:
    reached: list[str] = []

    class Walker:
        __name__ = "walker"

        @hookimpl(wrapper=True)
        def vramcore_operation(self, op: Any) -> Any:
            reached.extend(_reachable_secrets(op))
            result = yield
            reached.extend(_reachable_secrets(op))
            return result

    manager = _start(new_manager, mock_backend, Walker(), Victim())
    shard = manager.shards()[0]
    manager.verify_sealed(shard)
    manager.deallocate(shard)
    assert reached == []
