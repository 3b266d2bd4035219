"""Model directories on disk, and a publisher's key pair to sign them, for tests and
benchmarks of ``seal_dir``."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from vramcore._modeldir import INDEX_SUFFIX
from vramcore.safetensors import write_safetensors

__all__ = ["publisher_keypair", "sign_model_dir", "write_model_dir"]


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


def sign_model_dir(model: Path, private_key: Path, signature: Path) -> None:
    """Sign ``model`` as a publisher does with ``model_signing sign key`` (the OpenSSF Model
    Signing library must be installed), writing the bundle to ``signature``."""
    import model_signing  # type: ignore[import-not-found, unused-ignore]

    config = model_signing.signing.Config()  # type: ignore[no-untyped-call, unused-ignore]
    config.use_elliptic_key_signer(private_key=private_key).sign(model, signature)
