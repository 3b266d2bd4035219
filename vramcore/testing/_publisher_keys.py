"""A publisher's key pair on disk, for tests and benchmarks of signed model directories."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["publisher_keypair"]


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
