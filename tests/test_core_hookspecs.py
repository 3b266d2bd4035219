"""Hook specifications: documented in full, and each one exercised by a real implementation."""

from __future__ import annotations

import argparse
import inspect
import io
from collections.abc import Sequence
from typing import Any

import pytest

from vramcore import Commands, Console, hookimpl, hookspecs
from vramcore.audit import AuditSink, AuditWitness, SinkContext
from vramcore.backend import DeviceDigest as VramDeviceDigest
from vramcore.backend import DeviceInfo
from vramcore.digest import hash_leaves, merkle_root
from vramcore.errors import (
    AuditError,
    ConfigError,
    InvalidInput,
    NotSealed,
    PolicyViolation,
    SealVerificationFailed,
    VramError,
)
from vramcore.events import AuditEvent
from vramcore.narration import OPERATION_NAMES, Operation
from vramcore.seal import SEAL_KEY_INFO, SecretKey, WorkerToken
from vramcore.testing import TEST_TOKEN, CapturePlugin, CapturingSink, FailingSink

HOOKS = sorted(name for name in dir(hookspecs) if name.startswith("vramcore_"))


def test_hookspecs_module_declares_the_expected_hook_kinds() -> None:
    assert set(HOOKS) == {
        "vramcore_allocator_backends",
        "vramcore_probe_devices",
        "vramcore_seal_key",
        "vramcore_device_digest",
        "vramcore_audit_sinks",
        "vramcore_audit_witnesses",
        "vramcore_audit_failure",
        "vramcore_operation",
        "vramcore_settings",
        "vramcore_add_commands",
    }


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_is_a_spec_with_a_complete_docstring(name: str) -> None:
    func = getattr(hookspecs, name)
    opts = getattr(func, f"{hookspecs.PROJECT_NAME}_spec", None)
    assert opts is not None, f"{name} is not marked @hookspec"
    doc = inspect.getdoc(func)
    assert doc, f"{name} has no docstring"
    summary = doc.splitlines()[0]
    assert summary.endswith("."), f"{name}: the summary line should be a sentence"
    assert len(summary) > 15
    for param in inspect.signature(func).parameters:
        assert f":param {param}:" in doc, f"{name} does not document parameter {param}"
    assert ":return:" in doc, f"{name} does not document its return value"
    firstresult = bool(opts.get("firstresult"))
    if firstresult:
        assert "firstresult" in doc and "Not firstresult" not in doc, name
    else:
        assert "Not firstresult" in doc, f"{name} must say it is not firstresult"
    assert "Called " in doc, f"{name} does not say when it is called"


def test_hookspec_names_all_carry_the_project_prefix() -> None:
    specs = [
        n
        for n, obj in vars(hookspecs).items()
        if callable(obj) and getattr(obj, f"{hookspecs.PROJECT_NAME}_spec", None) is not None
    ]
    assert sorted(specs) == HOOKS


# -- each hook, exercised through a plugin of its own --------------------------------------


class RicherDevices:
    """Reports extra facts (ECC error counts) for the mock backend, defers for others."""

    @hookimpl
    def vramcore_probe_devices(self, backend: Any) -> Sequence[DeviceInfo] | None:
        if backend.name != "mock":
            return None
        base = backend.devices()
        return [
            DeviceInfo(
                index=d.index,
                name="inventory: lab GPU",
                total_bytes=d.total_bytes,
                free_bytes=d.free_bytes,
                ecc_enabled=False,
                ecc_errors=7,
            )
            for d in base
        ]


def test_probe_devices_hook_overrides_the_default(new_manager: Any, mock_backend: Any) -> None:
    manager = new_manager(mock_backend, RicherDevices(), audit="disabled")
    assert manager.device_info.name == "inventory: lab GPU"
    assert manager.device_info.ecc_errors == 7


def test_probe_devices_hook_feeds_the_policy(new_manager: Any, mock_backend: Any) -> None:
    from vramcore.policy import VramPolicy

    with pytest.raises(PolicyViolation) as info:
        new_manager(
            mock_backend, RicherDevices(), audit="disabled", policy=VramPolicy(require_ecc=True)
        )
    assert info.value.rule == "ecc"


class KmsKey:
    """A key provider standing in for a KMS: the same key whatever the worker token."""

    __name__ = "kms"

    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    def vramcore_seal_key(self, worker_id: str) -> SecretKey:
        self.calls.append(worker_id)
        return SecretKey(bytearray(b"k" * 32), label=b"kms")


def test_seal_key_hook_replaces_the_token_derivation(new_manager: Any, mock_backend: Any) -> None:
    kms = KmsKey()
    other_token = "5opWABk6Gu_E2d4EQxcVJ8efuXsJTakqLDTWhA_uFD8"
    named = {"audit": "disabled", "seal_key_provider": "kms"}
    a = new_manager(mock_backend, kms, worker_id="a", **named)
    b = new_manager(mock_backend, kms, worker_id="b", token=other_token, **named)
    c = new_manager(mock_backend, kms, audit="disabled", worker_id="c", token=other_token)
    assert kms.calls == ["a", "b"]  # c did not name it: never asked
    shard = a.seal_model(b"weights" * 1000, shard_id="s")
    # Different tokens, same KMS key: b accepts a's signature (the shard is just not resident
    # there), while c, whose key comes from its token, rejects it.
    with pytest.raises(NotSealed):
        b.verify_sealed(shard)
    with pytest.raises(SealVerificationFailed) as info:
        c.verify_sealed(shard)
    assert info.value.reason == "signature"


def test_seal_key_hook_returning_garbage_is_a_config_error(
    make_plugin_manager: Any, mock_backend: Any
) -> None:
    from vramcore import VramManager

    class Bad:
        __name__ = "bad"

        @hookimpl
        def vramcore_seal_key(self, worker_id: str) -> object:
            return b"raw bytes are not a SecretKey"

    pm = make_plugin_manager(Bad())
    with pytest.raises(ConfigError, match="bad returned bytes"):
        VramManager(
            TEST_TOKEN,
            allocator=mock_backend,
            plugin_manager=pm,
            audit="disabled",
            seal_key_provider="bad",
        )


class DeviceDigest:
    """A "device-side" digest: here computed from the bytes the backend reads back."""

    def __init__(self, corrupt: bool = False) -> None:
        self.calls = 0
        self.corrupt = corrupt

    @hookimpl
    def vramcore_device_digest(
        self, backend: Any, buffer: Any, leaf_size: int, leaf_range: Any
    ) -> Any:
        self.calls += 1
        raw = bytearray(buffer.nbytes)
        backend.read_into(buffer, 0, memoryview(raw))
        leaves = hash_leaves(raw, leaf_size)
        leaves = leaves[:-1] if self.corrupt else leaves
        return VramDeviceDigest(root=merkle_root(leaves), leaves=b"".join(leaves))


def test_device_digest_hook_is_used_and_matches_the_host_path(
    new_manager: Any, mock_backend: Any, pattern: Any
) -> None:
    data = pattern(3 * 65536 + 17)
    plugin = DeviceDigest()
    manager = new_manager(mock_backend, plugin, audit="disabled")
    shard = manager.seal_model(data, shard_id="dev")
    assert plugin.calls == 1
    assert shard.digest == merkle_root(hash_leaves(data)).hex()
    manager.verify_sealed(shard)
    assert plugin.calls == 2


def test_device_digest_hook_with_a_malformed_leaf_list_fails_the_seal_cleanly(
    new_manager: Any, mock_backend: Any, pattern: Any
) -> None:
    manager = new_manager(mock_backend, DeviceDigest(corrupt=True), audit="disabled")
    with pytest.raises(VramError, match="malformed leaf list"):
        manager.seal_model(pattern(3 * 65536), shard_id="bad")
    assert manager.used_vram() == 0
    assert mock_backend.live_allocations == 0


def test_device_digest_leaf_indices_are_kept_as_a_tuple() -> None:
    answer = VramDeviceDigest(root=None, leaves=bytes(64), leaf_indices=[3, 9])
    assert answer.leaf_indices == (3, 9)
    assert answer.leaf_count == 2
    assert VramDeviceDigest(root=None, leaves=bytes(32)).leaf_indices is None


def test_device_digest_implementation_without_leaf_indices_sees_a_whole_buffer_request(
    make_plugin_manager: Any, mock_backend: Any, pattern: Any
) -> None:
    # pluggy passes an implementation only the arguments it names: one written before
    # ``leaf_indices`` existed is asked an index question as a whole-buffer one (the
    # documented fallback the core accepts), and one that names it gets the indices.
    seen: dict[str, Any] = {}

    class Old:
        @hookimpl
        def vramcore_device_digest(
            self, backend: Any, buffer: Any, leaf_size: int, leaf_range: Any
        ) -> Any:
            seen["old"] = leaf_range
            return None

    class New:
        @hookimpl
        def vramcore_device_digest(
            self, backend: Any, buffer: Any, leaf_size: int, leaf_range: Any, leaf_indices: Any
        ) -> Any:
            seen["new"] = (leaf_range, leaf_indices)
            return None

    buf = mock_backend.allocate(0, 4 * 65536)
    try:
        pm = make_plugin_manager(Old(), New())
        pm.hook.vramcore_device_digest(
            backend=mock_backend, buffer=buf, leaf_size=65536, leaf_range=None, leaf_indices=[1, 3]
        )
    finally:
        mock_backend.free(buf)
    assert seen == {"old": None, "new": (None, [1, 3])}


def test_audit_sinks_hook_gets_the_context(new_manager: Any, mock_backend: Any) -> None:
    from vramcore.testing import CapturePlugin

    sink = CapturingSink()
    plugin = CapturePlugin(sink)
    manager = new_manager(mock_backend, plugin, worker_id="w-7")
    assert manager.sinks == (sink,)
    (context,) = plugin.contexts
    assert isinstance(context, SinkContext)
    assert context.worker_id == "w-7"
    assert context.device == 0
    assert TEST_TOKEN not in repr(context)
    manager.close()
    assert sink.closed


def test_sink_context_gives_plugin_keys_never_the_token_or_seal_key(
    new_manager: Any, mock_backend: Any
) -> None:
    from vramcore.testing import CapturePlugin

    plugin = CapturePlugin(CapturingSink())
    manager = new_manager(mock_backend, plugin)
    (context,) = plugin.contexts
    names = set(type(context).__slots__)
    assert not any("token" in n for n in names - {"token_fingerprint"})
    assert context.token_fingerprint == manager.token_fingerprint
    seal_key = WorkerToken(TEST_TOKEN).derive(SEAL_KEY_INFO).export()
    key = context.derive_key("my_plugin/state")
    assert key.export() == context.derive_key("my_plugin/state").export()  # stable per purpose
    assert key.export() != context.derive_key("my_plugin/other").export()
    # No purpose, however chosen, reaches the seal key: plugin keys hang off a master key.
    for purpose in ("seal-key", "x/../seal-key", "vramcore/v1/seal-key"):
        assert context.derive_key(purpose).export() != seal_key
    for bad in ("", "a b", "x" * 129, "\x1b[31m", "é"):
        with pytest.raises(InvalidInput):
            context.derive_key(bad)
    manager.close()
    with pytest.raises(InvalidInput, match="wiped"):
        context.derive_key("my_plugin/state")  # the master key dies with the manager


def test_each_plugin_derives_keys_of_its_own(new_manager: Any, mock_backend: Any) -> None:
    seen: dict[str, SinkContext] = {}

    def plugin(label: str) -> object:
        class KeyedSinkPlugin:
            @hookimpl
            def vramcore_audit_sinks(self, context: SinkContext) -> Sequence[AuditSink]:
                seen[label] = context
                return [CapturingSink()]

        return KeyedSinkPlugin()

    a, b = plugin("a"), plugin("b")
    new_manager(mock_backend, a, b)
    assert seen["a"].scope != seen["b"].scope
    # The same purpose gives each plugin a different key: one cannot derive the other's.
    assert seen["a"].derive_key("shared/purpose").export() != (
        seen["b"].derive_key("shared/purpose").export()
    )
    # Offline, the key is re-derived from the token and the plugin's name.
    again = SinkContext.from_token(
        WorkerToken(TEST_TOKEN), worker_id="x", device=0, scope=seen["a"].scope
    )
    assert again.derive_key("shared/purpose").export() == (
        seen["a"].derive_key("shared/purpose").export()
    )


class RecordingWitness(AuditWitness):
    name = "recording"

    def __init__(self) -> None:
        self.heads: list[Any] = []
        self.closed = False

    def publish(self, head: Any) -> None:
        self.heads.append(head)

    def close(self) -> None:
        self.closed = True


class WitnessPlugin:
    def __init__(self) -> None:
        self.witness = RecordingWitness()

    @hookimpl
    def vramcore_audit_witnesses(self, context: SinkContext) -> Sequence[AuditWitness]:
        return [self.witness]


class HeadPublishingSink(CapturingSink):
    """A log sink that publishes a (toy) head to its witnesses after each event."""

    def __init__(self) -> None:
        super().__init__()
        self.witnesses: Sequence[AuditWitness] = ()

    def attach_witnesses(self, witnesses: Sequence[AuditWitness]) -> None:
        self.witnesses = witnesses

    def emit(self, event: AuditEvent) -> None:
        super().emit(event)
        for witness in self.witnesses:
            witness.publish({"sequence": len(self.events)})


def test_witnesses_hook_feeds_the_sinks_and_closes_after_them(
    new_manager: Any, mock_backend: Any
) -> None:
    sink = HeadPublishingSink()
    witnesses = WitnessPlugin()
    manager = new_manager(mock_backend, witnesses, sink=sink)
    assert sink.witnesses == (witnesses.witness,)
    manager.seal_model(b"w" * 5000, shard_id="witnessed")
    assert witnesses.witness.heads[-1] == {"sequence": len(sink.events)}
    manager.close()
    assert sink.closed
    assert witnesses.witness.closed


def test_witnesses_hook_returning_garbage_is_a_config_error(
    new_manager: Any, mock_backend: Any
) -> None:
    class Garbage:
        @hookimpl
        def vramcore_audit_witnesses(self, context: SinkContext) -> Any:
            return ["not a witness"]

    with pytest.raises(ConfigError, match="vramcore_audit_witnesses"):
        new_manager(mock_backend, Garbage(), sink=CapturingSink())
    assert mock_backend.live_allocations == 0


class FailureReporter:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []

    @hookimpl
    def vramcore_audit_failure(self, sink_name: str, event: AuditEvent, error: Any) -> None:
        self.seen.append((sink_name, event.event_type, type(error).__name__))


def test_audit_failure_hook_is_told_of_every_sink_failure(
    new_manager: Any, mock_backend: Any
) -> None:
    reporter = FailureReporter()
    capture = CapturingSink()
    failing = CapturePlugin(FailingSink(["vram.allocated"]))  # a second, failing sink
    manager = new_manager(
        mock_backend, failing, reporter, sink=capture, audit="required", worker_id="w"
    )
    manager.seal_model(b"x" * 100, shard_id="s")
    assert reporter.seen == [("failing", "vram.allocated", "OSError")]
    # delivery went on: the capturing sink still got everything
    assert capture.types() == ["vram.allocated", "vram.sealed"]


def test_audit_failure_hook_that_raises_does_not_mask_the_failure(
    new_manager: Any, mock_backend: Any
) -> None:
    class Broken:
        @hookimpl
        def vramcore_audit_failure(self, sink_name: str, event: Any, error: Any) -> None:
            raise RuntimeError("reporter broke")

    from vramcore.testing import CapturePlugin

    manager = new_manager(mock_backend, Broken(), CapturePlugin(FailingSink(["vram.sealed"])))
    with pytest.raises(AuditError):
        manager.seal_model(b"x" * 100, shard_id="s")
    assert mock_backend.live_allocations == 0


class Narrator:
    def __init__(self) -> None:
        self.ops: list[tuple[str, str, dict[str, Any]]] = []
        self.depth = 0
        self.nesting: list[tuple[str, int]] = []
        self.correlations: list[str] = []

    @hookimpl(wrapper=True)
    def vramcore_operation(self, op: Operation) -> Any:
        self.nesting.append((op.name, self.depth))
        self.correlations.append(op.correlation_id)
        self.depth += 1
        try:
            return (yield)
        finally:
            self.depth -= 1
            self.ops.append((op.name, str(op.attributes.get("outcome")), dict(op.attributes)))


def test_operation_wrapper_sees_every_step_nested(new_manager: Any, mock_backend: Any) -> None:
    narrator = Narrator()
    manager = new_manager(mock_backend, narrator, audit="disabled")
    shard = manager.seal_model(b"y" * 70000, shard_id="n")
    manager.verify_sealed(shard)
    manager.deallocate(shard)
    assert narrator.nesting == [
        ("seal", 0),
        ("allocate", 1),
        ("copy", 1),
        ("digest", 1),
        ("verify", 0),
        ("digest", 1),
        ("deallocate", 0),
    ]
    names = {name for name, _, _ in narrator.ops}
    assert names == set(OPERATION_NAMES)
    assert all(outcome == "ok" for _, outcome, _ in narrator.ops)
    seal_attrs = next(a for n, _, a in narrator.ops if n == "seal")
    assert seal_attrs["shard_id"] == "n"
    assert seal_attrs["nbytes"] == 70000
    assert seal_attrs["leaf_count"] == 2
    for _, _, attributes in narrator.ops:
        assert TEST_TOKEN not in repr(attributes)
        assert all(isinstance(v, str | int | float | bool) for v in attributes.values())


def test_operation_wrapper_sees_errors_and_correlation(new_manager: Any, mock_backend: Any) -> None:
    import vramcore

    narrator = Narrator()
    manager = new_manager(mock_backend, narrator, audit="disabled")
    mock_backend.fail_next_allocation()
    with vramcore.correlate("req-9"), pytest.raises(VramError):
        manager.seal_model(b"y" * 100, shard_id="e")
    outcomes = {(n, o) for n, o, _ in narrator.ops}
    assert ("allocate", "error") in outcomes
    assert ("seal", "error") in outcomes
    allocate = next(a for n, _, a in narrator.ops if n == "allocate")
    assert allocate["error_type"] == "AllocationFailed"
    assert narrator.correlations == ["req-9", "req-9"]  # seal, allocate


def test_add_commands_hook_adds_a_cli_subcommand(make_plugin_manager: Any) -> None:
    ran: list[str] = []

    class Cmds:
        @hookimpl
        def vramcore_add_commands(self, commands: Commands) -> None:
            group = commands.group("audit", help="audit tools")
            parser = group.add("show", help="show the log", handler=self.show)
            parser.add_argument("path")

        def show(self, args: argparse.Namespace, console: Console) -> int:
            ran.append(args.path)
            console.result({"path": args.path}, text=f"showing {args.path}")
            return 0

    pm = make_plugin_manager(Cmds())
    parser = argparse.ArgumentParser(prog="vramcore")
    pm.hook.vramcore_add_commands(commands=Commands(parser.add_subparsers()))
    args = parser.parse_args(["audit", "show", "/tmp/log", "--json"])
    out = io.StringIO()
    assert args.handler(args, Console(json_mode=args.json, out=out)) == 0
    assert ran == ["/tmp/log"]
    assert '"path": "/tmp/log"' in out.getvalue()


def test_allocator_backends_hook_offers_the_mock(make_plugin_manager: Any) -> None:
    pm = make_plugin_manager()
    specs = [s for group in pm.hook.vramcore_allocator_backends() for s in group]
    assert [s.name for s in specs] == ["mock"]


def test_default_seal_key_is_the_token_derivation(make_plugin_manager: Any) -> None:
    from vramcore._keyproviders import seal_key

    pm = make_plugin_manager(KmsKey())  # installed but not named: not asked
    key = seal_key(pm, WorkerToken(TEST_TOKEN), "w", env={})
    assert key.export() == WorkerToken(TEST_TOKEN).derive(SEAL_KEY_INFO).export()
    assert seal_key(pm, WorkerToken(TEST_TOKEN), "w", "kms").export() == b"k" * 32
