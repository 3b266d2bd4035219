"""Model directories and publisher signatures, checked before anything is sealed, and sealing
a directory: one shard per file, all or nothing, each file's SHA-256 checked as it is copied.

Signatures are real: made by ``model_signing`` (the OpenSSF Model Signing library) with an EC
key pair, verified by vramcore's own DSSE check.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import vramcore_allocator_mock as mock_plugin
from cryptography.hazmat.primitives import serialization

from vramcore import VramManager
from vramcore._modeldir import scan_model_dir
from vramcore._publisher import key_fingerprint, load_public_key, verify_bundle
from vramcore._sealdir import SealedModel
from vramcore.errors import InsufficientVram, IntegrityViolation, InvalidInput
from vramcore.safetensors import write_safetensors
from vramcore.testing import (
    TEST_TOKEN,
    CapturePlugin,
    CapturingSink,
    publisher_keypair,
    sign_model_dir,
    write_model_dir,
)

INDEX = "model.safetensors.index.json"


# -- the directory ------------------------------------------------------------------------


def test_an_indexed_directory_scans_to_its_shards(tmp_path: Path) -> None:
    model = scan_model_dir(write_model_dir(tmp_path / "m"))
    assert model.index == INDEX
    assert [s.name for s in model.shards] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert model.tensor_maps["model-00002-of-00002.safetensors"].names == (
        "layers.1.weight",
        "head.weight",
    )


def test_without_an_index_every_safetensors_file_is_a_shard(tmp_path: Path) -> None:
    model = scan_model_dir(write_model_dir(tmp_path / "m", index=False))
    assert model.index is None and len(model.shards) == 2


def _rewrite_index(root: Path, change: dict[str, object]) -> None:
    index = json.loads((root / INDEX).read_text())
    index["weight_map"].update(change)
    (root / INDEX).write_text(json.dumps(index))


def _case_missing_shard(root: Path) -> None:
    (root / "model-00002-of-00002.safetensors").unlink()


def _case_extra_tensor(root: Path) -> None:
    _rewrite_index(root, {})
    index = json.loads((root / INDEX).read_text())
    del index["weight_map"]["head.weight"]
    (root / INDEX).write_text(json.dumps(index))


def _case_index_names_a_missing_tensor(root: Path) -> None:
    _rewrite_index(root, {"ghost.weight": "model-00001-of-00002.safetensors"})


def _case_duplicate_tensor(root: Path) -> None:
    with (root / "model-00002-of-00002.safetensors").open("wb") as fh:
        write_safetensors(fh, {"embed.weight": ("U8", [1], b"x"), "head.weight": ("U8", [1], b"y")})


def _case_outside(root: Path) -> None:
    (root.parent / "evil.safetensors").write_bytes(
        (root / "model-00002-of-00002.safetensors").read_bytes()
    )
    _rewrite_index(root, {"layers.1.weight": "../evil.safetensors"})


def _case_absolute(root: Path) -> None:
    _rewrite_index(root, {"layers.1.weight": str(root / "model-00002-of-00002.safetensors")})


def _case_symlink_escape(root: Path) -> None:
    outside = root.parent / "elsewhere.safetensors"
    (root / "model-00002-of-00002.safetensors").rename(outside)
    os.symlink(outside, root / "model-00002-of-00002.safetensors")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_case_missing_shard, "the index names model-00002-of-00002.safetensors, which is missing"),
        (_case_extra_tensor, "holds tensor 'head.weight' but the index does not list it"),
        (_case_index_names_a_missing_tensor, "the index puts tensor 'ghost.weight' in"),
        (
            _case_duplicate_tensor,
            "tensor 'embed.weight' is in model-00001-of-00002.safetensors and in",
        ),
        (_case_outside, "the index names ../evil.safetensors, a file outside the directory"),
        (_case_absolute, "a file outside the directory"),
        (_case_symlink_escape, "is a symlink leading outside the directory"),
    ],
)
def test_bad_directories_are_refused_with_one_line(damage, message: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = write_model_dir(tmp_path / "m")
    damage(root)
    with pytest.raises(IntegrityViolation) as caught:
        scan_model_dir(root)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value) and caught.value.reason == "model_dir"


def test_a_duplicate_tensor_without_an_index_is_refused(tmp_path: Path) -> None:
    root = write_model_dir(tmp_path / "m", index=False)
    _case_duplicate_tensor(root)
    with pytest.raises(IntegrityViolation, match=r"'embed\.weight' is in"):
        scan_model_dir(root)


def test_a_symlink_inside_the_directory_is_followed(tmp_path: Path) -> None:
    root = write_model_dir(tmp_path / "m", index=False)
    (root / "blobs").mkdir()
    (root / "model-00002-of-00002.safetensors").rename(root / "blobs" / "b2")
    os.symlink(root / "blobs" / "b2", root / "model-00002-of-00002.safetensors")
    assert len(scan_model_dir(root).shards) == 2


def test_not_a_model_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="is not a directory"):
        scan_model_dir(write_model_dir(tmp_path / "m") / "config.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match=r"holds no \*.safetensors file"):
        scan_model_dir(tmp_path / "empty")
    with pytest.raises(InvalidInput, match="No such file"):
        scan_model_dir(tmp_path / "nope")


# -- the publisher's signature -------------------------------------------------------------


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A model signed with ``model_signing``: (model dir, its signature inside it, public key)."""
    where = tmp_path_factory.mktemp("signed")
    model = write_model_dir(where / "tiny-model")
    private, public = publisher_keypair(where)
    sign_model_dir(model, private, model / "model.sig")
    return model, model / "model.sig", public


@pytest.mark.slow
def test_a_model_signing_bundle_verifies(signed: tuple[Path, Path, Path]) -> None:
    model, signature, public = signed
    manifest = verify_bundle(signature, public)
    assert set(manifest.files) == {
        "config.json",
        INDEX,
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    }
    import hashlib

    for name, digest in manifest.files.items():
        assert hashlib.sha256((model / name).read_bytes()).hexdigest() == digest
    assert manifest.model_name == "tiny-model"
    assert manifest.key_fingerprint == key_fingerprint(load_public_key(public))
    bundle = json.loads(signature.read_text())
    assert bundle["verificationMaterial"]["publicKey"]["hint"] == manifest.key_fingerprint
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    assert statement["subject"][0]["digest"]["sha256"] == manifest.manifest_digest


@pytest.mark.slow
def test_a_wrong_key_is_refused(signed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _model, signature, _public = signed
    _private, other = publisher_keypair(tmp_path, "other")
    with pytest.raises(IntegrityViolation, match="signed with another key"):
        verify_bundle(signature, other)
    # Without the key hint, the ECDSA check itself refuses it.
    bundle = json.loads(signature.read_text())
    del bundle["verificationMaterial"]["publicKey"]["hint"]
    stripped = tmp_path / "nohint.sig"
    stripped.write_text(json.dumps(bundle))
    with pytest.raises(IntegrityViolation, match="does not verify with this public key"):
        verify_bundle(stripped, other)


@pytest.mark.slow
def test_a_rewritten_manifest_is_refused(signed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _model, signature, public = signed
    bundle = json.loads(signature.read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    statement["predicate"]["resources"][0]["digest"] = "0" * 64
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    forged = tmp_path / "forged.sig"
    forged.write_text(json.dumps(bundle))
    with pytest.raises(IntegrityViolation, match="does not verify with this public key"):
        verify_bundle(forged, public)


def test_not_a_bundle_or_not_a_key_is_a_usage_error(tmp_path: Path) -> None:
    _private, public = publisher_keypair(tmp_path)
    junk = tmp_path / "junk.sig"
    junk.write_text("not json")
    with pytest.raises(InvalidInput, match="is not JSON"):
        verify_bundle(junk, public)
    junk.write_text('{"mediaType": "text/plain"}')
    with pytest.raises(InvalidInput, match="not a Sigstore bundle"):
        verify_bundle(junk, public)
    with pytest.raises(InvalidInput, match="not a PEM public key"):
        verify_bundle(junk, junk)
    rsa_free = tmp_path / "ed.pem"
    from cryptography.hazmat.primitives.asymmetric import ed25519

    rsa_free.write_bytes(
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(InvalidInput, match="P-256, P-384 or P-521"):
        verify_bundle(junk, rsa_free)


# -- sealing a directory ----------------------------------------------------------------


@pytest.fixture
def manager() -> Iterator[VramManager]:
    with VramManager(TEST_TOKEN, allocator=mock_plugin.MockBackend(), audit="disabled") as m:
        yield m


@pytest.fixture(scope="module")
def publisher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(signed model dir, signature outside it, public key)."""
    where = tmp_path_factory.mktemp("publisher")
    model = write_model_dir(where / "tiny-model")
    private, public = publisher_keypair(where)
    sign_model_dir(model, private, where / "tiny-model.sig")
    return model, where / "tiny-model.sig", public


def _copy(publisher: tuple[Path, Path, Path], tmp_path: Path) -> tuple[Path, Path, Path]:
    model, signature, public = publisher
    target = tmp_path / model.name
    shutil.copytree(model, target)
    return target, signature, public


def test_an_unsigned_directory_seals_one_shard_per_file(
    manager: VramManager, tmp_path: Path
) -> None:
    sealed = manager.seal_dir(write_model_dir(tmp_path / "tiny-model"))
    assert sealed.index == INDEX and sealed.publisher is None
    assert list(sealed.files) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert [s.shard_id for s in sealed.shards] == [
        "tiny-model:model-00001-of-00002.safetensors",
        "tiny-model:model-00002-of-00002.safetensors",
    ]
    for shard in sealed.shards:
        manager.verify_sealed(shard)
    with manager.verified(sealed.files["model-00001-of-00002.safetensors"]) as buf:
        assert buf.tensors()["layers.0.weight"].dtype == "BF16"
    assert sealed.summary() == (
        "sealed model tiny-model: 2 shard(s), 4 tensors, "
        f"{sealed.vram_bytes} bytes, no publisher signature"
    )
    assert SealedModel.from_json(sealed.to_json()) == sealed


@pytest.mark.slow
def test_a_signed_directory_records_the_publisher(
    manager: VramManager, publisher: tuple[Path, Path, Path]
) -> None:
    model, signature, public = publisher
    sealed = manager.seal_dir(model, signature=signature, public_key=public)
    assert sealed.publisher is not None
    from vramcore._publisher import verify_bundle

    manifest = verify_bundle(signature, public)
    assert sealed.publisher.key_fingerprint == manifest.key_fingerprint
    assert sealed.publisher.manifest_digest == manifest.manifest_digest
    for name, shard in sealed.files.items():
        assert shard.file_sha256 == manifest.files[name]  # signed by the seal too
    data = json.loads(sealed.to_json())
    assert data["publisher"]["manifest_digest"] == manifest.manifest_digest
    assert "signed by key " + manifest.key_fingerprint[:16] in sealed.summary()


@pytest.mark.slow
def test_a_signature_inside_the_directory_is_not_an_unsigned_file(
    manager: VramManager, publisher: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    model, signature, public = _copy(publisher, tmp_path)
    inside = model / "model.sig"
    shutil.copy(signature, inside)
    assert len(manager.seal_dir(model, signature=inside, public_key=public).shards) == 2


def _refused(manager: VramManager, model: Path, signature: Path, public: Path) -> str:
    with pytest.raises(IntegrityViolation) as caught:
        manager.seal_dir(model, signature=signature, public_key=public)
    assert manager.shards() == [] and manager.used_vram() == 0  # all or nothing
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.slow
def test_an_unsigned_file_is_refused(
    manager: VramManager, publisher: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    model, signature, public = _copy(publisher, tmp_path)
    (model / "extra.py").write_text("print('hello')")
    assert "extra.py is not covered by the publisher's signature" in _refused(
        manager, model, signature, public
    )


@pytest.mark.slow
def test_a_signature_over_another_model_is_refused(
    manager: VramManager, publisher: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    _model, _signature, public = publisher
    other = write_model_dir(tmp_path / "other", index=False)
    private = public.parent / "key.pem"
    sign_model_dir(other, private, tmp_path / "other.sig")
    model, _, _ = _copy(publisher, tmp_path)
    message = _refused(manager, model, tmp_path / "other.sig", public)
    assert "is not covered by the publisher's signature" in message


@pytest.mark.slow
def test_a_directory_signed_with_another_key_is_refused(
    manager: VramManager, publisher: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    model, signature, _public = publisher
    _private, other = publisher_keypair(tmp_path, "other")
    assert "signed with another key" in _refused(manager, model, signature, other)


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["model-00002-of-00002.safetensors", "config.json"])
def test_a_tampered_file_is_refused(
    manager: VramManager, publisher: tuple[Path, Path, Path], tmp_path: Path, victim: str
) -> None:
    model, signature, public = _copy(publisher, tmp_path)
    data = bytearray((model / victim).read_bytes())
    data[-1] ^= 0x01  # a tensor byte: the header (and so the index check) is unchanged
    (model / victim).write_bytes(bytes(data))
    message = _refused(manager, model, signature, public)
    assert f"{victim} does not match the SHA-256 the publisher signed" in message


def test_signature_and_key_go_together(manager: VramManager, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="needs both signature and public_key"):
        manager.seal_dir(tmp_path, signature=tmp_path / "x.sig")


def test_a_failed_shard_releases_the_shards_sealed_before_it(
    manager: VramManager, tmp_path: Path
) -> None:
    root = write_model_dir(tmp_path / "m", index=False)
    with pytest.raises(InvalidInput, match="shard_prefix"):
        manager.seal_dir(root, shard_prefix="bad/prefix")
    sizes = [p.stat().st_size for p in sorted(root.glob("*.safetensors"))]
    backend = mock_plugin.MockBackend(capacity=sum(sizes) - 1)  # room for the first only
    with VramManager(TEST_TOKEN, allocator=backend, audit="disabled") as small:
        with pytest.raises(InsufficientVram):
            small.seal_dir(root)
        assert small.shards() == [] and backend.live_allocations == 0


def _mutations(bundle: dict[str, object]) -> list[object]:
    envelope = bundle["dsseEnvelope"]
    assert isinstance(envelope, dict)
    return [
        [],
        {**bundle, "dsseEnvelope": []},
        {**bundle, "dsseEnvelope": {**envelope, "payload": 7}},
        {**bundle, "dsseEnvelope": {**envelope, "payload": "!!"}},
        {**bundle, "dsseEnvelope": {**envelope, "signatures": 5}},
        {**bundle, "dsseEnvelope": {**envelope, "signatures": ["x"]}},
        {**bundle, "dsseEnvelope": {**envelope, "signatures": [{"sig": None}]}},
        {**bundle, "dsseEnvelope": {**envelope, "signatures": []}},
        {**bundle, "dsseEnvelope": {**envelope, "payloadType": "text/plain"}},
    ]


@pytest.mark.slow
def test_malformed_bundles_fail_with_one_line(
    signed: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    _model, signature, public = signed
    bundle = json.loads(signature.read_text())
    # The key hint is advisory: without it (or garbled) the ECDSA check alone decides.
    for material in ("x", {"publicKey": 3}):
        path = tmp_path / "hint.sig"
        path.write_text(json.dumps({**bundle, "verificationMaterial": material}))
        assert verify_bundle(path, public).files
    for i, mutated in enumerate(_mutations(bundle)):
        path = tmp_path / f"m{i}.sig"
        path.write_text(json.dumps(mutated))
        with pytest.raises((InvalidInput, IntegrityViolation)) as caught:
            verify_bundle(path, public)
        assert "\n" not in str(caught.value), i


# -- the manager's seal_dir and the audit event ---------------------------------------------


def _captured_manager(make_plugin_manager: Any) -> tuple[VramManager, CapturingSink]:
    sink = CapturingSink()
    pm = make_plugin_manager(mock_plugin, CapturePlugin(sink))
    return VramManager(TEST_TOKEN, allocator="mock", plugin_manager=pm), sink


@pytest.mark.slow
def test_seal_dir_audits_the_directory_with_its_publisher(
    publisher: tuple[Path, Path, Path], make_plugin_manager: Any
) -> None:
    model, signature, public = publisher
    manager, sink = _captured_manager(make_plugin_manager)
    with manager:
        sealed = manager.seal_dir(model, signature=signature, public_key=public)
    (event,) = [e for e in sink.events if e.event_type == "vram.model_sealed"]
    assert sealed.publisher is not None
    assert event.model == "tiny-model" and event.index == INDEX
    assert event.shard_ids == tuple(s.shard_id for s in sealed.shards)
    assert event.publisher_key == sealed.publisher.key_fingerprint
    assert event.manifest_digest == sealed.publisher.manifest_digest
    assert event.nbytes == sealed.vram_bytes
    # shards may be sealed at once (a signed seal on 2+ CPUs): their events may interleave
    sealed_events = {e.shard_id: e for e in sink.events if e.event_type == "vram.sealed"}
    assert {k: e.file_sha256 for k, e in sealed_events.items()} == {
        s.shard_id: s.file_sha256 for s in sealed.shards
    }
    assert all(s.file_sha256 is not None for s in sealed.shards)


def test_seal_dir_unsigned_is_audited_without_a_publisher(
    tmp_path: Path, make_plugin_manager: Any
) -> None:
    manager, sink = _captured_manager(make_plugin_manager)
    with manager:
        sealed = manager.seal_dir(write_model_dir(tmp_path / "m", index=False), shard_prefix="p")
        assert [s.shard_id for s in manager.shards()] == [s.shard_id for s in sealed.shards]
    (event,) = [e for e in sink.events if e.event_type == "vram.model_sealed"]
    assert (event.index, event.publisher_key, event.manifest_digest) == ("", "", "")
    assert event.shard_ids[0] == "p:model-00001-of-00002.safetensors"


# -- vramcore seal DIR ----------------------------------------------------------------------


def _one_error(err: str) -> str:
    """The one error line (a progress line may precede it on stderr)."""
    (line,) = [x for x in err.splitlines() if x.startswith("vramcore: error")]
    return line


def test_cli_seals_a_directory_and_verifies_the_set(cli: Any, tmp_path: Path) -> None:
    root = write_model_dir(tmp_path / "tiny-model")
    code, out, _ = cli("seal", str(root))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("sealed model tiny-model: 2 shard(s), 4 tensors")
    assert sum("verified from VRAM" in line for line in lines) == 2
    code, out, _ = cli("seal", str(root), "--json")
    data = json.loads(out)
    assert code == 0
    assert [s["file"] for s in data["model_attestation"]["shards"]] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert [v["file"] for v in data["verified"]] == [
        s["file"] for s in data["model_attestation"]["shards"]
    ]
    assert "signature" not in json.dumps(data["model_attestation"]["shards"])


@pytest.mark.slow
def test_cli_seals_a_signed_directory(cli: Any, publisher: tuple[Path, Path, Path]) -> None:
    model, signature, public = publisher
    code, out, _ = cli(
        "seal", str(model), "--signature", str(signature), "--public-key", str(public), "--json"
    )
    assert code == 0
    publisher_data = json.loads(out)["model_attestation"]["publisher"]
    assert publisher_data["model_name"] == "tiny-model"


@pytest.mark.slow
def test_cli_exit_codes_for_a_tampered_or_unsigned_directory(
    cli: Any, publisher: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    model, signature, public = _copy(publisher, tmp_path)
    (model / "notes.txt").write_text("unsigned")
    code, _, err = cli(
        "seal", str(model), "--signature", str(signature), "--public-key", str(public)
    )
    assert code == 1 and _one_error(err).endswith(
        "notes.txt is not covered by the publisher's signature"
    )
    (model / "notes.txt").unlink()
    victim = model / "model-00001-of-00002.safetensors"
    victim.write_bytes(victim.read_bytes()[:-1] + b"\xff")
    code, _, err = cli(
        "seal", str(model), "--signature", str(signature), "--public-key", str(public)
    )
    assert code == 1 and "does not match the SHA-256 the publisher signed" in _one_error(err)


def test_cli_refuses_bad_directories_and_bad_usage(cli: Any, tmp_path: Path) -> None:
    root = write_model_dir(tmp_path / "m")
    _case_duplicate_tensor(root)
    code, _, err = cli("seal", str(root))
    assert code == 1 and "model directory refused: tensor" in _one_error(err)
    (tmp_path / "empty").mkdir()
    code, _, err = cli("seal", str(tmp_path / "empty"))
    assert code == 2 and "holds no *.safetensors file" in err
    good = write_model_dir(tmp_path / "good")
    code, _, err = cli("seal", str(good), "--signature", str(good / "config.json"))
    assert code == 2 and "--signature and --public-key go together" in err
    code, _, err = cli(
        "seal",
        str(good),
        "--signature",
        str(good / "config.json"),
        "--public-key",
        str(good / INDEX),
    )
    assert code == 2 and "not a PEM public key" in err
    shard = good / "model-00001-of-00002.safetensors"
    code, _, err = cli("seal", str(shard), "--signature", str(shard), "--public-key", str(shard))
    assert code == 2 and "need a model directory" in err


@pytest.mark.parametrize(
    "damage",
    [
        _case_missing_shard,
        _case_extra_tensor,
        _case_index_names_a_missing_tensor,
        _case_duplicate_tensor,
        _case_outside,
        _case_absolute,
        _case_symlink_escape,
    ],
    ids=lambda f: f.__name__.removeprefix("_case_"),
)
def test_cli_refuses_every_bad_directory_with_one_line_and_exit_1(
    cli: Any, tmp_path: Path, damage: Any
) -> None:
    root = write_model_dir(tmp_path / "m")
    damage(root)
    code, out, err = cli("seal", str(root))
    assert code == 1 and out == ""
    assert "model directory refused: " in _one_error(err)
    code, out, _ = cli("seal", str(root), "--json")
    error = json.loads(out)["error"]
    assert code == 1 and error["exit_code"] == 1 and "\n" not in error["message"]


@pytest.mark.slow
def test_cli_exit_codes_for_a_wrong_key_or_another_models_signature(
    cli: Any, publisher: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    model, signature, public = publisher
    _private, other_key = publisher_keypair(tmp_path, "other")
    code, _, err = cli(
        "seal", str(model), "--signature", str(signature), "--public-key", str(other_key)
    )
    assert code == 1 and "signed with another key" in _one_error(err)
    other = write_model_dir(tmp_path / "other", index=False)
    sign_model_dir(other, public.parent / "key.pem", tmp_path / "other.sig")
    code, _, err = cli(
        "seal", str(model), "--signature", str(tmp_path / "other.sig"), "--public-key", str(public)
    )
    assert code == 1 and "is not covered by the publisher's signature" in _one_error(err)
    # The same file names, other bytes: the signed SHA-256s are not the files'.
    lookalike = write_model_dir(tmp_path / "lookalike" / "tiny-model")
    (lookalike / "config.json").write_text('{"hidden_size": 3}')
    sign_model_dir(lookalike, public.parent / "key.pem", tmp_path / "lookalike.sig")
    code, _, err = cli(
        "seal",
        str(model),
        "--signature",
        str(tmp_path / "lookalike.sig"),
        "--public-key",
        str(public),
    )
    assert code == 1 and "config.json does not match the SHA-256" in _one_error(err)
    junk = tmp_path / "junk.sig"
    junk.write_text("not a bundle")
    code, _, err = cli("seal", str(model), "--signature", str(junk), "--public-key", str(public))
    assert code == 2 and "is not JSON" in _one_error(err)


def test_cli_saves_the_signed_attestation_privately(cli: Any, tmp_path: Path) -> None:
    root = write_model_dir(tmp_path / "tiny-model")
    saved = tmp_path / "saved.json"
    assert cli("seal", str(root), "--attestation", str(saved))[0] == 0
    assert saved.stat().st_mode & 0o777 == 0o600
    sealed = SealedModel.from_json(saved.read_bytes())
    assert list(sealed.files) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    code, _, err = cli("seal", str(root), "--attestation", str(tmp_path / "no" / "such.json"))
    assert code == 2 and "No such file or directory" in _one_error(err)
    os.symlink(tmp_path / "elsewhere.json", tmp_path / "link.json")
    code, _, err = cli("seal", str(root), "--attestation", str(tmp_path / "link.json"))
    assert code == 2 and not (tmp_path / "elsewhere.json").exists()
    code, _, err = cli("verify", str(tmp_path / "missing.json"))
    assert code == 2 and "missing.json: no such file" in _one_error(err)
