"""Seal keys, signatures, tampering, foreign seals and the JSON attestation."""

from __future__ import annotations

import json
import pickle
from datetime import timedelta
from typing import Any

import attrs
import pytest
import vramcore_allocator_mock

from vramcore import SealedShard, TensorRange
from vramcore.errors import InvalidInput, NotSealed, SealVerificationFailed
from vramcore.seal import (
    SEAL_KEY_INFO,
    SecretKey,
    WorkerToken,
    canonical_seal_message,
    derive_key,
)
from vramcore.testing import TEST_TOKEN, CapturingSink

OTHER_TOKEN = "geLR2tlN6L0VWqU2fh8SVqniYYdEewbf-Wv-5xvnG3w"


# -- keys -----------------------------------------------------------------------------------


def test_hkdf_key_differs_per_token_and_per_info() -> None:
    a = WorkerToken(TEST_TOKEN).derive(SEAL_KEY_INFO).export()
    assert len(a) == 32
    assert WorkerToken(TEST_TOKEN).derive(SEAL_KEY_INFO).export() == a  # deterministic
    assert WorkerToken(OTHER_TOKEN).derive(SEAL_KEY_INFO).export() != a
    assert WorkerToken(TEST_TOKEN).derive(b"vramcore/v1/audit-chain").export() != a
    assert WorkerToken(TEST_TOKEN).derive(SEAL_KEY_INFO, length=64).export()[:32] != b""
    assert a != TEST_TOKEN.encode()[:32]


def test_hkdf_is_rfc5869_with_vramcore_salt() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    expected = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=b"vramcore/v1/hkdf-salt", info=SEAL_KEY_INFO
    ).derive(TEST_TOKEN.encode())
    assert WorkerToken(TEST_TOKEN).derive(SEAL_KEY_INFO).export() == expected
    assert derive_key(TEST_TOKEN.encode(), SEAL_KEY_INFO).export() == expected


def test_token_and_key_wipe() -> None:
    token = WorkerToken(TEST_TOKEN)
    key = token.derive(SEAL_KEY_INFO)
    fingerprint = key.fingerprint
    token.wipe()
    with pytest.raises(InvalidInput):
        token.derive(SEAL_KEY_INFO)
    assert not key.wiped
    key.wipe()
    assert key.wiped
    assert "wiped" in repr(key)
    assert fingerprint not in repr(key)
    for call in (lambda: key.mac(b"m"), key.export, lambda: key.derive(b"x")):
        with pytest.raises(InvalidInput):
            call()


@pytest.mark.parametrize("bad", ["s3cr3t-tok", b"0123456789abcde", "", 12345, None])
def test_token_shorter_than_16_bytes_or_not_bytes_is_refused(bad: Any) -> None:
    with pytest.raises(InvalidInput) as info:
        WorkerToken(bad)
    if isinstance(bad, str | bytes) and bad:
        assert str(bad) not in str(info.value)


def test_token_and_key_cannot_be_pickled() -> None:
    with pytest.raises(TypeError):
        pickle.dumps(WorkerToken(TEST_TOKEN))
    with pytest.raises(TypeError):
        pickle.dumps(WorkerToken(TEST_TOKEN).derive(SEAL_KEY_INFO))


def test_mac_compares_tags() -> None:
    key = SecretKey(bytearray(b"k" * 32))
    tag = key.mac(b"message")
    assert key.mac_matches(b"message", tag)
    assert not key.mac_matches(b"messagf", tag)
    assert not key.mac_matches(b"message", tag[:-1] + bytes([tag[-1] ^ 1]))


def test_canonical_message_is_length_prefixed() -> None:
    base = dict(
        shard_id="ab",
        gpu_device=0,
        vram_bytes=1,
        digest_alg="rfc6962-sha256",
        leaf_size=4096,
        digest="0" * 64,
        sealed_at="2026-01-01T00:00:00.000000Z",
    )
    a = canonical_seal_message(**base)  # type: ignore[arg-type]
    b = canonical_seal_message(**{**base, "shard_id": "a", "digest_alg": "b" + "rfc6962-sha256"})  # type: ignore[arg-type]
    assert a != b
    assert a != canonical_seal_message(**base, tensors=[("t", 0, 1)])  # type: ignore[arg-type]


# -- tampering ------------------------------------------------------------------------------


def _tampered(shard: SealedShard) -> dict[str, SealedShard]:
    other_tensors = (TensorRange("x", 0, 8),)
    return {
        "shard_id": attrs.evolve(shard, shard_id=shard.shard_id + "x"),
        "gpu_device": attrs.evolve(shard, gpu_device=shard.gpu_device + 1),
        "vram_bytes": attrs.evolve(shard, vram_bytes=shard.vram_bytes - 1),
        "digest_alg": attrs.evolve(shard, digest_alg="rfc6962-sha512"),
        "leaf_size": attrs.evolve(shard, leaf_size=shard.leaf_size * 2),
        "digest": attrs.evolve(shard, digest="0" * 64),
        "sealed_at": attrs.evolve(shard, sealed_at=shard.sealed_at + timedelta(microseconds=1)),
        "tensors": attrs.evolve(shard, tensors=other_tensors),
        "tensors-renamed": attrs.evolve(
            shard, tensors=[attrs.evolve(t, name=t.name + "_") for t in shard.tensors]
        ),
        "signature": attrs.evolve(shard, signature=bytes(32)),
        "signature-bit": attrs.evolve(
            shard, signature=shard.signature[:-1] + bytes([shard.signature[-1] ^ 1])
        ),
        "file_sha256": attrs.evolve(shard, file_sha256="f" * 64),
    }


@pytest.fixture
def sealed_file_shard(mock_manager: Any, safetensors_file: Any) -> SealedShard:
    import hashlib

    sha = hashlib.sha256(safetensors_file.read_bytes()).hexdigest()
    return mock_manager.seal_file(safetensors_file, expected_sha256=sha)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "field",
    [
        "shard_id",
        "gpu_device",
        "vram_bytes",
        "digest_alg",
        "leaf_size",
        "digest",
        "sealed_at",
        "tensors",
        "tensors-renamed",
        "signature",
        "signature-bit",
        "file_sha256",
    ],
)
def test_tampering_with_any_field_fails_verification(
    mock_manager: Any, sealed_file_shard: SealedShard, audit_capture: CapturingSink, field: str
) -> None:
    assert sealed_file_shard.tensors  # the tensor map is part of what is signed
    tampered = _tampered(sealed_file_shard)[field]
    assert tampered != sealed_file_shard
    with pytest.raises(SealVerificationFailed) as info:
        mock_manager.verify_sealed(tampered)
    assert info.value.reason == "signature"
    (event,) = audit_capture.of_type("seal.verification_failed")
    assert event.reason == info.value.reason  # type: ignore[attr-defined]
    with pytest.raises(SealVerificationFailed), mock_manager.verified(tampered):
        pytest.fail("the block must not run")
    mock_manager.verify_sealed(sealed_file_shard)  # the genuine seal still verifies


def test_a_seal_signed_with_another_token_fails(
    mock_manager: Any, mock_backend: Any, new_manager: Any
) -> None:
    other = new_manager(mock_backend, token=OTHER_TOKEN, audit="disabled")
    foreign = other.seal_model(b"w" * 5000, shard_id="s")
    mock_manager.seal_model(b"w" * 5000, shard_id="s")
    with pytest.raises(SealVerificationFailed) as info:
        mock_manager.verify_sealed(foreign)
    assert info.value.reason == "signature"
    # Even when no shard of that id is resident, a forged seal is a verification failure.
    other.seal_model(b"v" * 100, shard_id="only-there")
    (only_there,) = [s for s in other.shards() if s.shard_id == "only-there"]
    with pytest.raises(SealVerificationFailed) as info:
        mock_manager.verify_sealed(only_there)
    assert info.value.reason == "signature"


def test_a_seal_from_another_manager_with_the_same_token_is_stale(
    mock_manager: Any, mock_backend: Any, new_manager: Any
) -> None:
    other = new_manager(mock_backend, audit="disabled")
    twin = other.seal_model(b"w" * 5000, shard_id="s")
    mine = mock_manager.seal_model(b"w" * 5000, shard_id="s")
    assert twin.digest == mine.digest
    with pytest.raises(SealVerificationFailed) as info:
        mock_manager.verify_sealed(twin)  # a replay of another seal of the same id
    assert info.value.reason == "stale"


def test_a_seal_from_another_device_fails(new_manager: Any) -> None:
    backend = vramcore_allocator_mock.MockBackend(devices=2, capacity=1 << 26)
    sink = CapturingSink()
    gpu0 = new_manager(backend, device=0, sink=sink)
    gpu1 = new_manager(backend, device=1, audit="disabled")
    on1 = gpu1.seal_model(b"z" * 70000, shard_id="s")
    with pytest.raises(SealVerificationFailed) as info:
        gpu0.verify_sealed(on1)  # nothing named "s" on GPU 0
    assert info.value.reason == "device"
    gpu0.seal_model(b"z" * 70000, shard_id="s")
    with pytest.raises(SealVerificationFailed) as info:
        gpu0.verify_sealed(on1)  # "s" is resident on GPU 0 too
    assert info.value.reason == "device"
    assert "GPU 1" in str(info.value)
    assert [e.reason for e in sink.of_type("seal.verification_failed")] == ["device", "device"]  # type: ignore[attr-defined]


def test_verify_after_deallocate_is_not_sealed(mock_manager: Any) -> None:
    shard = mock_manager.seal_model(b"q" * 10, shard_id="gone")
    mock_manager.deallocate(shard)
    with pytest.raises(NotSealed, match="gone"):
        mock_manager.verify_sealed(shard)
    with pytest.raises(NotSealed), mock_manager.verified(shard):
        pytest.fail("the block must not run")
    with pytest.raises(NotSealed):
        mock_manager.deallocate(shard)
    with pytest.raises(InvalidInput):
        mock_manager.verify_sealed("gone")


# -- attestation ----------------------------------------------------------------------------


def test_json_round_trip(mock_manager: Any, sealed_file_shard: SealedShard) -> None:
    text = sealed_file_shard.to_json()
    back = SealedShard.from_json(text)
    assert back == sealed_file_shard
    assert SealedShard.from_json(text.encode()) == sealed_file_shard
    mock_manager.verify_sealed(back)
    data = json.loads(text)
    assert data["signature"] == sealed_file_shard.signature.hex()
    assert data["digest_alg"] == "rfc6962-sha256"
    assert data["sealed_at"].endswith("Z")
    assert "signature" not in json.loads(sealed_file_shard.to_json(include_signature=False))
    assert text == back.to_json()  # stable bytes


def _attestation(shard: SealedShard, **changes: Any) -> str:
    data = shard.to_dict()
    for key, value in changes.items():
        if value is ...:
            del data[key]
        else:
            data[key] = value
    return json.dumps(data)


@pytest.mark.parametrize(
    "changes",
    [
        {"attestation_version": 2},
        {"attestation_version": ...},
        {"shard_id": ...},
        {"signature": ...},
        {"gpu_device": "0"},
        {"vram_bytes": True},
        {"leaf_size": 65536.0},
        {"digest": 5},
        {"digest": "ABC"},
        {"digest": "g" * 64},
        {"signature": "00"},
        {"signature": "zz" * 32},
        {"sealed_at": "yesterday"},
        {"sealed_at": 0},
        {"shard_id": "../etc/passwd"},
        {"shard_id": "x\x1b[31m"},
        {"tensors": [["a", 0]]},
        {"tensors": [[1, 0, 2]]},
        {"tensors": [["a", 0, True]]},
        {"file_sha256": "nope"},
    ],
    ids=repr,
)
def test_from_json_rejects_malformed_attestations(
    sealed_file_shard: SealedShard, changes: dict[str, Any]
) -> None:
    with pytest.raises(InvalidInput):
        SealedShard.from_json(_attestation(sealed_file_shard, **changes))


@pytest.mark.parametrize("text", ["", "{", "[]", "null", "42", '"x"', b"\xff\xfe", "{}"])
def test_from_json_rejects_non_attestations(text: str | bytes) -> None:
    with pytest.raises(InvalidInput):
        SealedShard.from_json(text)


def test_signature_is_not_in_repr_or_str(sealed_file_shard: SealedShard) -> None:
    sig = sealed_file_shard.signature
    for shown in (repr(sealed_file_shard), str(sealed_file_shard), f"{sealed_file_shard}"):
        assert sig.hex() not in shown
        assert repr(sig) not in shown
        assert "signature" not in shown
    assert sealed_file_shard.shard_id in repr(sealed_file_shard)
