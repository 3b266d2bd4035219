"""Attacks on a model directory's attestation: the list of shards, the publisher's key
fingerprint and the manifest digest are signed under the worker's key (a key derived from
the seal key for this one purpose), so an edited attestation is refused by every path that
verifies one: ``verify_model``, ``verify_attestation``, ``vramcore.torch`` and
``vramcore verify``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import vramcore_allocator_mock as mock_plugin

from vramcore import SealedModel, VramManager
from vramcore.errors import InvalidInput, SealVerificationFailed
from vramcore.testing import (
    TEST_TOKEN,
    CapturePlugin,
    CapturingSink,
    publisher_keypair,
    sign_model_dir,
    write_model_dir,
)
from vramcore.torch import bind, verify_before_forward

OTHER_TOKEN = "pR7wQ2zK9vN4xT1mB8cL5yF3hJ6dS0gA"  # another worker's (random) token
INDEX = "model.safetensors.index.json"


@pytest.fixture
def manager() -> Iterator[VramManager]:
    with VramManager(TEST_TOKEN, allocator=mock_plugin.MockBackend(), audit="disabled") as m:
        yield m


def _edited(model: SealedModel, edit: Callable[[dict[str, Any]], None]) -> SealedModel:
    """``model``'s attestation edited as an attacker would, then read back (canonical form)."""
    data = json.loads(model.to_json())
    edit(data)
    return SealedModel.from_json(json.dumps(data, sort_keys=True, separators=(",", ":")))


def _drop_a_shard(data: dict[str, Any]) -> None:
    data["shards"] = data["shards"][:1]


def _reorder_the_shards(data: dict[str, Any]) -> None:
    data["shards"] = data["shards"][::-1]


def _rename_a_file(data: dict[str, Any]) -> None:
    data["shards"][0]["file"] = "model-00009-of-00009.safetensors"


def _claim_a_publisher(data: dict[str, Any]) -> None:
    data["publisher"] = {
        "key_fingerprint": "ab" * 32,
        "manifest_digest": "cd" * 32,
        "model_name": "tiny-model",
    }


def _rename_the_model(data: dict[str, Any]) -> None:
    data["model"] = "another-model"


def _drop_the_index(data: dict[str, Any]) -> None:
    data["index"] = None


EDITS = [
    _drop_a_shard,
    _reorder_the_shards,
    _rename_a_file,
    _claim_a_publisher,
    _rename_the_model,
    _drop_the_index,
]


def _refused_by_verify_model(manager: VramManager, model: SealedModel) -> SealVerificationFailed:
    with pytest.raises(SealVerificationFailed) as caught:
        manager.verify_model(model)
    assert caught.value.reason == "signature"
    assert "\n" not in str(caught.value)
    return caught.value


@pytest.mark.parametrize("edit", EDITS, ids=lambda f: f.__name__.strip("_"))
def test_an_edited_model_attestation_is_refused(
    manager: VramManager, tmp_path: Path, edit: Callable[[dict[str, Any]], None]
) -> None:
    sealed = manager.seal_dir(write_model_dir(tmp_path / "tiny-model"))
    manager.verify_model(sealed)  # the attestation as sealed verifies
    manager.verify_model(SealedModel.from_json(sealed.to_json()))
    edited = _edited(sealed, edit)
    # Every shard it still lists is intact and resident: only the attestation's own
    # signature can tell that the list, the files or the publisher were changed.
    for shard in edited.shards:
        manager.verify_sealed(shard)
    error = _refused_by_verify_model(manager, edited)
    assert "attestation of model" in str(error)
    with pytest.raises(SealVerificationFailed):
        manager.verify_attestation(edited)


def test_a_shard_swapped_in_from_another_sealed_model_is_refused(
    manager: VramManager, tmp_path: Path
) -> None:
    first = manager.seal_dir(write_model_dir(tmp_path / "tiny-model"), shard_prefix="a")
    second = manager.seal_dir(write_model_dir(tmp_path / "tiny-model-2"), shard_prefix="b")
    replaced = second.to_dict()["shards"][1]["attestation"]

    def swap(data: dict[str, Any]) -> None:
        data["shards"][1]["attestation"] = replaced

    edited = _edited(first, swap)
    manager.verify_sealed(edited.shards[1])  # a good seal of a resident shard, on its own
    _refused_by_verify_model(manager, edited)


@pytest.mark.slow
def test_a_swapped_publisher_fingerprint_or_manifest_digest_is_refused(
    manager: VramManager, tmp_path: Path
) -> None:
    model = write_model_dir(tmp_path / "tiny-model")
    private, public = publisher_keypair(tmp_path)
    sign_model_dir(model, private, tmp_path / "model.sig")
    sealed = manager.seal_dir(model, signature=tmp_path / "model.sig", public_key=public)
    manager.verify_model(sealed)
    _other_private, other_public = publisher_keypair(tmp_path, "other")
    from vramcore._publisher import key_fingerprint, load_public_key

    other = key_fingerprint(load_public_key(other_public))

    def swap_key(data: dict[str, Any]) -> None:
        data["publisher"]["key_fingerprint"] = other

    def swap_manifest(data: dict[str, Any]) -> None:
        data["publisher"]["manifest_digest"] = "0" * 64

    def strip_publisher(data: dict[str, Any]) -> None:
        data["publisher"] = None

    for edit in (swap_key, swap_manifest, strip_publisher):
        _refused_by_verify_model(manager, _edited(sealed, edit))


def test_a_model_attestation_of_another_worker_is_refused(tmp_path: Path) -> None:
    with VramManager(TEST_TOKEN, allocator=mock_plugin.MockBackend(), audit="disabled") as m:
        sealed = m.seal_dir(write_model_dir(tmp_path / "tiny-model"))
    with VramManager(OTHER_TOKEN, allocator=mock_plugin.MockBackend(), audit="disabled") as m:
        _refused_by_verify_model(m, sealed)


def test_a_refused_model_attestation_is_audited(make_plugin_manager: Any, tmp_path: Path) -> None:
    sink = CapturingSink()
    pm = make_plugin_manager(mock_plugin, CapturePlugin(sink))
    with VramManager(TEST_TOKEN, allocator="mock", plugin_manager=pm) as m:
        sealed = m.seal_dir(write_model_dir(tmp_path / "tiny-model"))
        _refused_by_verify_model(m, _edited(sealed, _drop_a_shard))
    (event,) = [e for e in sink.events if e.event_type == "seal.verification_failed"]
    assert event.reason == "signature" and "attestation of model" in event.detail


def test_an_unsigned_or_garbled_model_attestation_is_not_read(
    manager: VramManager, tmp_path: Path
) -> None:
    sealed = manager.seal_dir(write_model_dir(tmp_path / "tiny-model"))
    data = json.loads(sealed.to_json())
    del data["signature"]
    with pytest.raises(InvalidInput):
        SealedModel.from_json(json.dumps(data, sort_keys=True, separators=(",", ":")))
    data["signature"] = "zz"
    with pytest.raises(InvalidInput, match="signature"):
        SealedModel.from_json(json.dumps(data, sort_keys=True, separators=(",", ":")))
    assert sealed.signature.hex() not in repr(sealed) + str(sealed) + sealed.summary()
    assert "signature" not in sealed.to_json(include_signature=False)


# -- vramcore.torch refuses an edited attestation ------------------------------------------


class _Tiny(torch.nn.Module):
    """A module whose buffers are the tensors ``write_model_dir`` writes."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("embed_weight", torch.zeros(4, 2))
        self.register_buffer("head_weight", torch.zeros(5, dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.embed_weight.T


def test_torch_refuses_an_edited_model_attestation(manager: VramManager, tmp_path: Path) -> None:
    sealed = manager.seal_dir(write_model_dir(tmp_path / "tiny-model"))
    edited = _edited(sealed, _claim_a_publisher)
    with pytest.raises(SealVerificationFailed):
        bind(_Tiny(), manager, edited, strict=False)
    module = torch.nn.Linear(2, 2)
    verify_before_forward(module, manager, sealed)
    module(torch.zeros(1, 2))  # the attestation as sealed: the pass runs
    tampered = torch.nn.Linear(2, 2)
    verify_before_forward(tampered, manager, edited)
    with pytest.raises(SealVerificationFailed):
        tampered(torch.zeros(1, 2))


# -- vramcore verify ------------------------------------------------------------------------


@pytest.fixture
def cli(cli: Any) -> Any:
    """The shared CLI runner (tests/conftest.py), also checking for the other worker's token."""
    cli.secrets.append(OTHER_TOKEN)
    return cli


def test_vramcore_verify_refuses_an_edited_attestation(cli: Any, tmp_path: Path) -> None:
    root = write_model_dir(tmp_path / "tiny-model")
    saved = tmp_path / "tiny-model.attestation.json"
    code, _, _ = cli("seal", str(root), "--attestation", str(saved))
    assert code == 0
    signed_text = saved.read_text()
    signed = SealedModel.from_json(signed_text)
    secrets = [signed.signature.hex(), *(s.signature.hex() for s in signed.shards)]
    code, out, err = cli("verify", str(saved))
    assert code == 0 and "attestation of model tiny-model: signed by this worker" in out
    code, json_out, json_err = cli("verify", str(saved), "--json")
    assert code == 0 and json.loads(json_out)["model"] == "tiny-model"
    assert not any(s in out + err + json_out + json_err for s in secrets)  # the file only
    for edit in EDITS:
        saved.write_text(_edited(SealedModel.from_json(signed_text), edit).to_json())
        code, _, err = cli("verify", str(saved))
        assert code == 1, edit.__name__
        (line,) = [x for x in err.splitlines() if x.startswith("vramcore: error")]
        assert "attestation of model" in line and "not valid under this worker's key" in line
    saved.write_text("{not json")
    code, _, err = cli("verify", str(saved))
    assert code == 2 and "not valid JSON" in err


def test_vramcore_verify_refuses_an_attestation_of_another_worker(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_model_dir(tmp_path / "tiny-model")
    single = tmp_path / "single.json"
    saved = tmp_path / "model.json"
    assert cli("seal", str(root), "--attestation", str(saved))[0] == 0
    shard = root / "model-00001-of-00002.safetensors"
    assert cli("seal", str(shard), "--attestation", str(single))[0] == 0
    assert cli("verify", str(single))[0] == 0
    monkeypatch.setenv("VRAMCORE_WORKER_TOKEN", OTHER_TOKEN)
    monkeypatch.setenv("VRAMCORE_AUDIT_LOG", str(tmp_path / "another-workers-audit"))
    for path in (saved, single):
        code, _, err = cli("verify", str(path))
        assert code == 1 and "not valid under this worker's key" in err
