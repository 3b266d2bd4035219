"""Model directories on disk, and a publisher's key pair to sign them, for tests and
benchmarks of ``seal_dir``."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from vramcore._modeldir import INDEX_SUFFIX, walk_files
from vramcore._publisher import (
    BUNDLE_MEDIA_TYPE,
    PAYLOAD_TYPE,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    curve_hash,
    key_fingerprint,
    manifest_digest,
    pae,
    path_is_under,
)
from vramcore.safetensors import write_safetensors

__all__ = ["publisher_keypair", "sign_model_dir", "write_model_dir", "write_synthetic_model_dir"]

#: The paths ``model_signing sign`` leaves out of a model by default.
_MODEL_SIGNING_IGNORE_PATHS = (".git", ".github", ".gitignore", ".gitattributes")


def publisher_keypair(where: Path, name: str = "key") -> tuple[Path, Path]:
    """A fresh EC P-256 key pair written to ``where`` as PEM files: ``(private, public)``
    (``NAME.pem`` unencrypted PKCS#8 for ``model_signing sign key``, ``NAME.pub.pem``
    SubjectPublicKeyInfo for ``vramcore seal DIR --public-key``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = where / f"{name}.pem", where / f"{name}.pub.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def write_model_dir(root: Path, *, index: bool = True) -> Path:
    """A two-shard model like a hub repository's, written to ``root`` (created if missing):
    ``model-0000N-of-00002.safetensors`` with four small tensors (F32, BF16, F16, U8), the
    index (unless ``index=False``) and a ``config.json``. Returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    shards = {
        "model-00001-of-00002.safetensors": {
            "embed.weight": ("F32", [4, 2], bytes(range(32))),
            "layers.0.weight": ("BF16", [2, 2], bytes(range(8))),
        },
        "model-00002-of-00002.safetensors": {
            "layers.1.weight": ("F16", [3], bytes(range(6))),
            "head.weight": ("U8", [5], b"abcde"),
        },
    }
    weight_map = {}
    for file, tensors in shards.items():
        with (root / file).open("wb") as fh:
            write_safetensors(fh, tensors)
        weight_map.update(dict.fromkeys(tensors, file))
    if index:
        (root / f"model{INDEX_SUFFIX}").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    (root / "config.json").write_text('{"hidden_size": 2}')
    return root


def write_synthetic_model_dir(
    root: Path, nbytes: int, *, shards: int = 2, tensor_bytes: int = 64 << 20
) -> list[Path]:
    """A model of about ``nbytes`` of tensor data for benchmarks, written to ``root`` (which
    must not exist): ``shards`` files of F32 tensors of at most ``tensor_bytes`` each (one
    random block, reused: the memory held is one block, not the model), the index and a
    ``config.json``. Every file is flushed to disk (so a benchmark can drop it from the page
    cache). Returns the shard files in order.

    :raises ValueError: a shard would hold less than one F32 value.
    """
    per_shard = (nbytes // shards) & ~3 if shards >= 1 else 0
    if per_shard < 4 or tensor_bytes < 4:
        raise ValueError(f"{nbytes} bytes in {shards} shards leaves a shard without data")
    block = os.urandom(min(per_shard, tensor_bytes) & ~3)
    root.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    files = []
    for i in range(1, shards + 1):
        name = f"model-{i:05d}-of-{shards:05d}.safetensors"
        tensors: dict[str, tuple[str, list[int], bytes]] = {}
        left = per_shard
        while left:
            size = min(left, len(block))
            tensors[f"layers.{i}.part{len(tensors)}.weight"] = ("F32", [size // 4], block[:size])
            left -= size
        with (root / name).open("wb") as fh:
            write_safetensors(fh, tensors)
            fh.flush()
            os.fsync(fh.fileno())
        weight_map.update(dict.fromkeys(tensors, name))
        files.append(root / name)
    (root / f"model{INDEX_SUFFIX}").write_text(json.dumps({"weight_map": weight_map}))
    (root / "config.json").write_text("{}")
    return files


def sign_model_dir(
    model: Path,
    private_key: Path,
    signature: Path,
    *,
    using: Literal["model_signing", "cryptography"] = "model_signing",
) -> None:
    """Sign ``model`` as a publisher does with ``model_signing sign key``, writing the bundle
    to ``signature``.

    ``using="model_signing"`` (the default) calls the OpenSSF Model Signing library, which
    must be installed. ``using="cryptography"`` writes a bundle of the same form (DSSE
    envelope, in-toto statement, ``files`` serialization, the key hint) with ``cryptography``
    alone, for hosts without model_signing and its sigstore stack (the GPU machines); the
    tests check that model_signing verifies it and that its statement equals
    model_signing's for the same directory.

    :raises ValueError: ``using`` names neither.
    """
    if using == "model_signing":
        import model_signing  # type: ignore[import-not-found, unused-ignore]

        config = model_signing.signing.Config()  # type: ignore[no-untyped-call, unused-ignore]
        config.use_elliptic_key_signer(private_key=private_key).sign(model, signature)
    elif using == "cryptography":
        signature.write_text(json.dumps(_bundle(Path(model), Path(private_key), signature)))
    else:
        raise ValueError(f"using must be 'model_signing' or 'cryptography', got {using!r}")


def _bundle(model: Path, private_key: Path, signature: Path) -> dict[str, object]:
    key = serialization.load_pem_private_key(private_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{private_key} is not an EC private key (model_signing signs with one)")
    root = model.resolve()
    skip = signature.resolve()
    resources = []
    for found in walk_files(root):
        if found.path.resolve() == skip or path_is_under(found.name, _MODEL_SIGNING_IGNORE_PATHS):
            continue
        with found.path.open("rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        resources.append({"name": found.name, "algorithm": "sha256", "digest": digest})
    resources.sort(key=lambda r: PurePosixPath(r["name"]).parts)  # as model_signing orders
    subject = manifest_digest(r["digest"] for r in resources)
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": root.name, "digest": {"sha256": subject}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "serialization": {
                "method": "files",
                "hash_type": "sha256",
                "allow_symlinks": False,
                "ignore_paths": list(_MODEL_SIGNING_IGNORE_PATHS),
            },
            "resources": resources,
        },
    }
    payload = json.dumps(statement, indent=2).encode()
    sig = key.sign(pae(PAYLOAD_TYPE, payload), curve_hash(key))
    return {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {
            "publicKey": {"hint": key_fingerprint(key.public_key())},
            "tlogEntries": [],
        },
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode(),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": base64.b64encode(sig).decode(), "keyid": ""}],
        },
    }
