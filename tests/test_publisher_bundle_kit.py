"""The test kit's own signer (``sign_model_dir(..., using="cryptography")``) writes what
``model_signing sign key`` writes: model_signing verifies it, its statement equals
model_signing's for the same directory, and seal_dir accepts and checks it. The GPU check
relies on it (the GPU machines have no model_signing)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from vramcore import VramManager
from vramcore._publisher import verify_bundle
from vramcore.errors import IntegrityViolation
from vramcore.testing import (
    TEST_TOKEN,
    publisher_keypair,
    sign_model_dir,
    write_model_dir,
    write_synthetic_model_dir,
)


def _statement(bundle: Path) -> Any:
    envelope = json.loads(bundle.read_text())["dsseEnvelope"]
    return json.loads(base64.b64decode(envelope["payload"]))


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A model with names whose order differs between a walk and a sort, a subdirectory,
    and paths model_signing leaves out."""
    root = write_model_dir(tmp_path / "model")
    (root / "a").mkdir()
    (root / "a" / "z.txt").write_text("deep")
    (root / "a.txt").write_text("shallow")
    (root / "a-b.json").write_text("{}")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main")
    (root / ".gitattributes").write_text("* binary")
    return root


def test_the_kit_bundle_states_what_model_signing_states(model: Path, tmp_path: Path) -> None:
    private, _ = publisher_keypair(tmp_path)
    sign_model_dir(model, private, tmp_path / "ours.sig", using="cryptography")
    sign_model_dir(model, private, tmp_path / "theirs.sig")
    ours, theirs = _statement(tmp_path / "ours.sig"), _statement(tmp_path / "theirs.sig")
    assert [r["name"] for r in ours["predicate"]["resources"]][:3] == [
        "a/z.txt",  # model_signing orders by path parts: "a" < "a-b.json"
        "a-b.json",
        "a.txt",
    ]
    ours["predicate"]["serialization"]["ignore_paths"].sort()
    theirs["predicate"]["serialization"]["ignore_paths"].sort()
    assert ours == theirs
    bundle = json.loads((tmp_path / "ours.sig").read_text())
    assert bundle["mediaType"] == json.loads((tmp_path / "theirs.sig").read_text())["mediaType"]


def test_model_signing_verifies_the_kit_bundle(model: Path, tmp_path: Path) -> None:
    import model_signing

    private, public = publisher_keypair(tmp_path)
    sign_model_dir(model, private, tmp_path / "ours.sig", using="cryptography")
    config = model_signing.verifying.Config().use_elliptic_key_verifier(public_key=public)
    config.verify(model, tmp_path / "ours.sig")  # raises when it does not verify
    (model / "a.txt").write_text("changed")
    with pytest.raises(ValueError, match=r"Hash mismatch for 'a\.txt'"):
        config.verify(model, tmp_path / "ours.sig")


def test_vramcore_verifies_the_kit_bundle_and_seals_with_it(
    model: Path, tmp_path: Path, mock_backend: Any
) -> None:
    private, public = publisher_keypair(tmp_path)
    signature = tmp_path / "ours.sig"
    sign_model_dir(model, private, signature, using="cryptography")
    manifest = verify_bundle(signature, public)
    assert manifest.model_name == "model" and "a/z.txt" in manifest.files
    assert ".git/HEAD" not in manifest.files and manifest.is_ignored(".git/HEAD")
    with VramManager(TEST_TOKEN, allocator=mock_backend, audit="disabled") as manager:
        sealed = manager.seal_dir(model, signature=signature, public_key=public)
        assert sealed.publisher is not None
        assert sealed.publisher.manifest_digest == manifest.manifest_digest
        for shard in sealed.shards:
            manager.deallocate(shard)
        other, _ = publisher_keypair(tmp_path, "other")
        sign_model_dir(model, other, signature, using="cryptography")
        with pytest.raises(IntegrityViolation, match="another key"):
            manager.seal_dir(model, signature=signature, public_key=public)
        assert manager.shards() == []


def test_a_signature_inside_the_model_is_left_out(model: Path, tmp_path: Path) -> None:
    private, public = publisher_keypair(tmp_path)
    sign_model_dir(model, private, model / "model.sig", using="cryptography")
    assert "model.sig" not in verify_bundle(model / "model.sig", public).files


def test_an_unknown_signer_is_refused(model: Path, tmp_path: Path) -> None:
    private, _ = publisher_keypair(tmp_path)
    with pytest.raises(ValueError, match="using must be"):
        sign_model_dir(model, private, tmp_path / "x.sig", using="gpg")  # type: ignore[arg-type]
    assert not (tmp_path / "x.sig").exists()


def test_a_synthetic_model_has_the_size_asked_and_seals(tmp_path: Path, mock_backend: Any) -> None:
    files = write_synthetic_model_dir(tmp_path / "big", 10 << 20, shards=3, tensor_bytes=1 << 20)
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    with VramManager(TEST_TOKEN, allocator=mock_backend, audit="disabled") as manager:
        sealed = manager.seal_dir(tmp_path / "big")
        per_shard = ((10 << 20) // 3) & ~3
        assert [sum(t.end - t.start for t in s.tensors) for s in sealed.shards] == [per_shard] * 3
        assert len(sealed.shards[0].tensors) == 4  # three whole 1 MiB tensors and the rest
        manager.verify_model(sealed)


@pytest.mark.parametrize(("nbytes", "shards"), [(7, 2), (1 << 20, 0)])
def test_a_synthetic_model_too_small_for_its_shards_is_refused(
    tmp_path: Path, nbytes: int, shards: int
) -> None:
    with pytest.raises(ValueError, match="leaves a shard without data"):
        write_synthetic_model_dir(tmp_path / "tiny", nbytes, shards=shards)
    assert not (tmp_path / "tiny").exists()
