"""Strict safetensors headers, the compact tensor map, canonical attestations, typed seals,
tokens with no entropy, typed API arguments and plugin hygiene (issue 8; issue 7 item 9)."""

from __future__ import annotations

import io
import json
import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import pytest

from vramcore import SealedShard, TensorRange, VramPolicy, WorkerToken, hookimpl
from vramcore.errors import ConfigError, IntegrityViolation, InvalidInput
from vramcore.plugins import get_plugin_manager
from vramcore.policy import check_policy
from vramcore.safetensors import parse_tensor_map, read_header, read_tensor_map
from vramcore.seal import canonical_seal_message
from vramcore.shard import TensorMap
from vramcore.testing import TEST_TOKEN
from vramcore.validation import check_leaf_size, check_path, escape_text


def _file(header: bytes | dict[str, Any], data: bytes) -> bytes:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def _parse(raw: bytes) -> TensorMap:
    return read_tensor_map(io.BytesIO(raw), len(raw))


def _t(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


GOOD = {"a": _t("F16", [2, 2], 0, 8), "b": _t("U8", [4], 8, 12)}


def test_a_good_header_parses_to_file_offsets() -> None:
    raw = _file(GOOD, bytes(12))
    tensors = _parse(raw)
    base = len(raw) - 12
    assert list(tensors) == [
        TensorRange("a", base, base + 8, "F16", (2, 2)),
        TensorRange("b", base + 8, base + 12, "U8", (4,)),
    ]


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"a": _t("U8", [8], 0, 8), "b": _t("U8", [4], 4, 8)}, bytes(8), "overlaps"),
        ({"a": _t("U8", [4], 0, 4), "b": _t("U8", [4], 6, 10)}, bytes(10), "gap"),
        ({"a": _t("U8", [4], 0, 4)}, bytes(8), "cover 4 data bytes"),  # bytes after the last
        ({"a": _t("F32", [4], 0, 4)}, bytes(4), "needs 16"),  # shape x dtype != size
        ({"a": _t("Q7", [4], 0, 4)}, bytes(4), "unknown dtype"),
        ({"a": _t("U8", [4], 4, 0)}, bytes(4), "ends before"),
        ({"a": {**_t("U8", [4], 0, 4), "extra": 1}}, bytes(4), "exactly dtype"),
        ({"a": _t("U8", [4], 0, 4), "__metadata__": {"k": 1}}, bytes(4), "__metadata__"),
        ({"a": _t("U8", [1] * 65, 0, 1)}, bytes(1), "dimensions"),
        ({"a": _t("U8", [2**70], 0, 4)}, bytes(4), "needs"),
        ({"a": _t("U8", [4], 0, 2**70)}, bytes(4), "past the end"),
        (
            b'{"a":'
            + json.dumps(_t("U8", [4], 0, 4)).encode()
            + b',"a":'
            + json.dumps(_t("U8", [4], 0, 4)).encode()
            + b"}",
            bytes(4),
            "twice",
        ),
        (
            b'{"a":{"dtype":"U8","dtype":"U8","shape":[4],"data_offsets":[0,4]}}',
            bytes(4),
            "duplicate key",
        ),
        (b'{"a":{"dtype":"U8","shape":[NaN],"data_offsets":[0,4]}}', bytes(4), "JSON"),
        (b'\xff{"a":1}', bytes(4), "UTF-8"),
        (b' {"a":' + json.dumps(_t("U8", [4], 0, 4)).encode() + b"}", bytes(4), "start with"),
        (b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}", bytes(4), "nested too deeply"),
        (b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}} x', bytes(4), "follow"),
        (b'{"a\\u001b[2J":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}', bytes(4), "name"),
    ],
)
def test_headers_the_reference_parser_rejects_are_refused(
    header: bytes | dict[str, Any], data: bytes, message: str
) -> None:
    with pytest.raises(IntegrityViolation, match="not a valid safetensors file") as info:
        _parse(_file(header, data))
    assert message in str(info.value)
    assert "\x1b" not in str(info.value)


def test_a_header_is_refused_before_the_rest_of_the_file_is_read() -> None:
    raw = _file({"a": _t("U8", [4], 0, 4)}, bytes(8))
    reads: list[int] = []
    stream = io.BytesIO(raw)

    def read(n: int) -> bytes:
        reads.append(n)
        return stream.read(n)

    with pytest.raises(IntegrityViolation):
        parse_tensor_map(read, len(raw))
    assert sum(reads) == len(raw) - 8  # the length and the header: no data byte


def test_zero_sized_tensors_metadata_and_any_order() -> None:
    header = {
        "__metadata__": {"format": "pt"},
        "z": _t("F32", [0, 3], 4, 4),
        "b": _t("U8", [4], 0, 4),
        "s": _t("F16", [], 4, 6),
        "f4": _t("F4", [4], 6, 8),
    }
    raw = _file(header, bytes(8))
    names = [t.name for t in _parse(raw)]
    assert names == ["b", "z", "s", "f4"]


def test_the_reference_layout_and_the_general_path_agree() -> None:
    compact = json.dumps(GOOD, separators=(",", ":")).encode()
    spaced = json.dumps(GOOD, indent=3).encode().replace(b"{", b"{", 1)
    assert _parse(_file(compact, bytes(12))).names == _parse(_file(spaced, bytes(12))).names


def test_read_header_returns_the_bytes_it_checked() -> None:
    raw = _file(GOOD, bytes(12))
    header, tensors = read_header(io.BytesIO(raw), len(raw))
    assert header == raw[: len(raw) - 12]
    assert len(tensors) == 2


# -- the compact tensor map -------------------------------------------------------------------


def _big_map(n: int) -> TensorMap:
    return TensorMap([f"t{i}" for i in range(n)], range(0, 2 * n, 2), range(2, 2 * n + 2, 2))


def test_tensor_map_is_a_sequence_with_bisected_lookup() -> None:
    tensors = _big_map(1000)
    assert len(tensors) == 1000 and tensors[3] == TensorRange("t3", 6, 8)
    assert tensors.overlapping([(7, 10)]) == ["t3", "t4"]
    assert tensors.overlapping([(0, 1), (1999, 2000)]) == ["t0", "t999"]
    assert tensors == _big_map(1000) and hash(tensors) == hash(_big_map(1000))
    assert tensors != _big_map(999)
    assert "t999" not in repr(tensors)  # the repr is bounded


def test_tensor_map_refuses_bad_ranges() -> None:
    with pytest.raises(InvalidInput, match="twice"):
        TensorMap.from_ranges([("a", 0, 1), ("a", 1, 2)])
    with pytest.raises(InvalidInput, match="ends before"):
        TensorMap.from_ranges([("a", 5, 1)])
    with pytest.raises(InvalidInput):
        TensorMap.from_ranges([("a", -1, 1)])
    with pytest.raises(InvalidInput):
        TensorMap.from_ranges([("a\x1b", 0, 1)])


def _shard(**changes: Any) -> SealedShard:
    base: dict[str, Any] = {
        "shard_id": "s",
        "gpu_device": 0,
        "vram_bytes": 2_000_000,
        "digest": "ab" * 32,
        "leaf_size": 65536,
        "sealed_at": datetime(2026, 1, 1, tzinfo=UTC),
        "signature": bytes(32),
        "tensors": _big_map(10),
    }
    return SealedShard(**{**base, **changes})


def test_signed_message_is_computed_once_per_shard() -> None:
    shard = _shard(tensors=_big_map(100_000))
    first = shard.signed_message()
    assert shard.signed_message() is first
    assert _shard(tensors=_big_map(100_000)).signed_message() == first


def test_a_million_tensor_shard_compares_without_rebuilding_its_map() -> None:
    tensors = _big_map(1_000_000)
    a, b = _shard(tensors=tensors), _shard(tensors=tensors)
    assert a == b  # the same map object: one identity check
    assert a.tensors.digest == tensors.digest


# -- canonical attestations, typed encoding ----------------------------------------------------


def test_attestation_round_trips_only_in_canonical_form() -> None:
    shard = _shard()
    text = shard.to_json()
    assert SealedShard.from_json(text) == shard
    data = json.loads(text)
    rewrites = {
        "pretty": json.dumps(data, indent=1, sort_keys=True),
        "unsorted": json.dumps(dict(reversed(list(data.items()))), separators=(",", ":")),
        "version true": text.replace('"attestation_version":1', '"attestation_version":true'),
        "version 1.0": text.replace('"attestation_version":1', '"attestation_version":1.0'),
        "unknown field": text[:-1] + ',"zz":1}',
        "tensors null": text.replace(
            '"tensors":' + json.dumps(data["tensors"], separators=(",", ":")), '"tensors":null'
        ),
        "timestamp": text.replace(
            "2026-01-01T00:00:00.000000Z", "2026-01-01T00:00:00.000000+00:00"
        ),
        "nested": '{"a":' + "[" * 100_000 + "]" * 100_000 + "}",
    }
    for name, rewritten in rewrites.items():
        assert rewritten != text, name
        with pytest.raises(InvalidInput):
            SealedShard.from_json(rewritten)


def test_signed_encoding_is_typed() -> None:
    fields: dict[str, Any] = {
        "shard_id": "s",
        "gpu_device": 0,
        "vram_bytes": 1,
        "digest_alg": "rfc6962-sha256",
        "leaf_size": 4096,
        "digest": "ab" * 32,
        "sealed_at": "2026-01-01T00:00:00.000000Z",
    }
    assert canonical_seal_message(**fields) != canonical_seal_message(
        **{**fields, "gpu_device": "0"}
    )
    with pytest.raises(InvalidInput):
        _shard(gpu_device="0")
    with pytest.raises(InvalidInput):
        _shard(vram_bytes=True)


# -- tokens, typed arguments ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (" " * 20, "whitespace"),
        ("a" * 40, "one character"),
        ("\t \n" * 8, "whitespace"),
        ("x" * 15, "too short"),
        ("  bbbbbbbbbbbbbbbbbbbb  ", "one character"),
    ],
)
def test_tokens_with_no_entropy_are_refused_with_advice(token: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as info:
        WorkerToken(token)
    assert "secrets.token_urlsafe" in str(info.value)
    assert token.strip() not in str(info.value) or not token.strip()


def test_the_test_token_stays_valid() -> None:
    assert WorkerToken(TEST_TOKEN).fingerprint


@pytest.mark.parametrize("bad", ["false", 1, None, "True"])
def test_policy_flags_must_be_booleans(bad: object) -> None:
    with pytest.raises(InvalidInput, match="strict_host_isolation must be True or False"):
        VramPolicy(strict_host_isolation=bad)  # type: ignore[arg-type]


def test_typed_argument_checks() -> None:
    for bad in ("x", 4096.0, True, 0, 1000, 1 << 31):
        with pytest.raises(InvalidInput, match="leaf_size"):
            check_leaf_size(bad)
    assert check_leaf_size(65536) == 65536
    with pytest.raises(InvalidInput, match="VramPolicy"):
        check_policy("strict")
    assert check_policy(None) == VramPolicy()
    for bad_path in (123, b"/etc/passwd", None):
        with pytest.raises(InvalidInput, match="path"):
            check_path(bad_path)


def test_check_path_names_each_problem(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    assert check_path(tmp_path / "f") == tmp_path / "f"
    cases = {
        str(tmp_path / "missing"): "no such file",
        str(tmp_path): "is a directory",
        "/dev/null": "not a regular file",
        str(tmp_path / "a\0b"): "NUL",
        str(tmp_path / ("é" * 200)): "at most 255 bytes",
    }
    for path, message in cases.items():
        with pytest.raises(InvalidInput, match=message):
            check_path(path, field="PATH")


def test_escape_text_keeps_printable_text_and_escapes_the_rest() -> None:
    assert escape_text("modèle.safetensors") == "modèle.safetensors"
    assert escape_text("a\x1b[2Jb\u202ec\nd") == "a\\x1b[2Jb\\u202ec\\x0ad"


# -- plugin hygiene (issue 7 item 9): check_pending, collisions, distribution:entry-point -----


class _Misspelt:
    @hookimpl
    def vramcore_allocator_backend(self) -> list[Any]:  # missing the final s
        return []


class _Unmarked:
    def vramcore_audit_sink(self, context: Any) -> list[Any]:  # no marker, misspelt
        return []


@pytest.mark.parametrize("plugin", [_Misspelt(), _Unmarked()])
def test_misspelt_hooks_are_found_by_check_pending(plugin: object) -> None:
    with pytest.raises(ConfigError, match="did you mean vramcore_") as info:
        get_plugin_manager([plugin], load_entrypoints=False)
    assert "unknown hook" in str(info.value)


class _FakeDist:
    def __init__(self, name: str) -> None:
        self.name = name
        self.version = "1.0"


class _FakeEntryPoint:
    def __init__(self, name: str, dist: str, plugin: object) -> None:
        self.name, self.value, self.group = name, f"{dist}_module", "vramcore"
        self.dist = _FakeDist(dist)
        self._plugin = plugin

    def load(self) -> object:
        return self._plugin


class _Named:
    def __init__(self, label: str) -> None:
        self.label = label

    @hookimpl
    def vramcore_allocator_backends(self) -> list[Any]:
        return []


def _collision(monkeypatch: pytest.MonkeyPatch) -> tuple[_Named, _Named]:
    import vramcore.plugins

    first, second = _Named("first"), _Named("second")
    eps = [
        _FakeEntryPoint("mock", "vramcore-allocator-mock", first),
        _FakeEntryPoint("mock", "evil-mock", second),
    ]
    monkeypatch.setattr(
        vramcore.plugins.importlib.metadata, "entry_points", lambda **_kw: list(eps)
    )
    return first, second


def test_entry_point_name_collisions_are_reported_not_resolved_silently(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _collision(monkeypatch)
    with pytest.warns(RuntimeWarning, match="registered by 2 distributions"):
        pm = get_plugin_manager(env={})
    assert not pm.has_plugin("mock")
    (failure,) = pm.failures
    assert "VRAMCORE_PLUGINS=evil-mock:mock" in failure.error
    with pytest.raises(ConfigError, match="registered by 2"):
        get_plugin_manager(env={}, strict=True)


def test_distribution_colon_entry_point_picks_one(monkeypatch: pytest.MonkeyPatch) -> None:
    first, _second = _collision(monkeypatch)
    pm = get_plugin_manager(env={"VRAMCORE_PLUGINS": "vramcore_allocator_mock:mock"})
    assert pm.get_plugin("mock") is first
    assert pm.failures == []
    pm = get_plugin_manager(env={"VRAMCORE_DISABLE_PLUGINS": "evil-mock:mock"})
    assert pm.get_plugin("mock") is first


def test_attrs_evolve_keeps_the_map_checked() -> None:
    shard = _shard()
    with pytest.raises(InvalidInput):
        attrs.evolve(shard, tensors=[("a", 0, 1), ("a", 2, 3)])
