"""The publisher's signature: an OpenSSF Model Signing bundle, verified with a public key.

``model_signing sign key --private_key key.pem MODEL_DIR`` (the OpenSSF Model Signing tool, a
sigstore project) writes ``model.sig``: a Sigstore bundle holding a DSSE envelope whose payload
is an in-toto statement listing every file of the model with its SHA-256 (the "files"
serialization), signed with an elliptic-curve key (P-256, P-384 or P-521).

:func:`verify_bundle` checks that envelope with ``cryptography`` alone and returns the signed
manifest: file name -> SHA-256, the manifest digest (the statement's subject, a SHA-256 over
the files' digests in order) and the signing key's fingerprint. It does not hash the files:
the seal checks each file's SHA-256 as its bytes are copied to VRAM, so every byte is read
once (:mod:`vramcore._sealdir`).

Why not call ``model_signing`` itself: its verifier hashes the whole directory before
returning (a second read of every byte, which the seal then repeats), and it brings the
sigstore client stack (TUF, Rekor, OIDC, protobuf models) into a security core whose only need
is one ECDSA check of one envelope. The envelope format is small and stable (DSSE v1, in-toto
Statement v1, model_signing predicate v1.0); the tests verify real bundles made by
``model_signing`` so any drift shows.

Every refusal is one line: :class:`~vramcore.errors.InvalidInput` for a file that is not a
bundle or a key at all (exit 2), :class:`~vramcore.errors.IntegrityViolation` (reason
``"signature"``) for a bundle that does not verify or does not describe a model (exit 1).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from vramcore.errors import IntegrityViolation, InvalidInput
from vramcore.validation import check_path, escape_text, safe_repr

__all__ = [
    "BUNDLE_MEDIA_TYPE",
    "MAX_BUNDLE_BYTES",
    "PAYLOAD_TYPE",
    "PREDICATE_TYPE",
    "STATEMENT_TYPE",
    "SignedManifest",
    "curve_hash",
    "key_fingerprint",
    "load_public_key",
    "manifest_digest",
    "pae",
    "path_is_under",
    "verify_bundle",
]

#: Larger bundles are refused before parsing.
MAX_BUNDLE_BYTES = 64 << 20
#: The DSSE payload type of an in-toto statement.
PAYLOAD_TYPE = "application/vnd.in-toto+json"
#: The in-toto statement type model_signing writes.
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
#: The model_signing predicate this verifier reads.
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
_BUNDLE_MEDIA_PREFIX = "application/vnd.dev.sigstore.bundle"
#: The bundle media type model_signing writes (any ``application/vnd.dev.sigstore.bundle*``
#: is read).
BUNDLE_MEDIA_TYPE = f"{_BUNDLE_MEDIA_PREFIX}.v0.3+json"
_CURVE_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "secp256r1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
    "secp521r1": hashes.SHA512,
}
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _refused(message: str) -> IntegrityViolation:
    return IntegrityViolation(f"publisher signature refused: {message}", reason="signature")


@attrs.frozen
class SignedManifest:
    """What a verified bundle says about the model.

    :attr model_name: the name the publisher signed (the model directory's name).
    :attr files: file name (relative, ``/``-separated) -> SHA-256 hex, in signed order.
    :attr ignored: paths the publisher excluded from signing (``model.sig``, ``.git``...).
    :attr manifest_digest: the statement subject's SHA-256 (over the files' digests), which
        names this exact set of files.
    :attr key_fingerprint: SHA-256 (hex) of the public key's PEM SubjectPublicKeyInfo, the
        same value ``model_signing`` writes as the bundle's key hint.
    """

    model_name: str
    files: Mapping[str, str]
    ignored: tuple[str, ...]
    manifest_digest: str
    key_fingerprint: str

    def is_ignored(self, name: str) -> bool:
        """Whether the publisher excluded ``name`` (or a directory above it) from signing."""
        return path_is_under(name, self.ignored)


def path_is_under(name: str, paths: Iterable[str]) -> bool:
    """Whether the relative ``/``-separated ``name`` is one of ``paths`` or lies below one
    (model_signing's ``ignore_paths`` rule: whole path components, ``.git`` is not ``.github``)."""
    parts = PurePosixPath(name).parts
    return any(
        PurePosixPath(path).parts == parts[: len(PurePosixPath(path).parts)] for path in paths
    )


def manifest_digest(digests: Iterable[str]) -> str:
    """The statement subject's SHA-256 (hex): over the files' SHA-256 digests (hex in, raw
    bytes hashed) in manifest order, as model_signing computes it."""
    combined = hashlib.sha256()
    for digest in digests:
        combined.update(bytes.fromhex(digest))
    return combined.hexdigest()


def pae(payload_type: str, payload: bytes) -> bytes:
    """The DSSE v1 pre-authentication encoding the signature covers."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def load_public_key(path: object) -> ec.EllipticCurvePublicKey:
    """Read a PEM public key as ``model_signing`` accepts it (EC P-256, P-384 or P-521).

    :raises InvalidInput: not a readable file, not a PEM public key, or another key type.
    """
    p = check_path(path, field="public key")
    try:
        key = serialization.load_pem_public_key(p.read_bytes())
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"{escape_text(str(p))} is not a PEM public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in _CURVE_HASHES:
        raise InvalidInput(
            f"{escape_text(str(p))} is not an EC P-256, P-384 or P-521 public key, the keys "
            "model_signing signs with"
        )
    return key


def curve_hash(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) -> ec.ECDSA:
    """The ECDSA algorithm model_signing uses with ``key``'s curve (SHA-256/384/512 for
    P-256/384/521)."""
    return ec.ECDSA(_CURVE_HASHES[key.curve.name]())


def key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 (hex) of the key's PEM SubjectPublicKeyInfo (``model_signing``'s key hint)."""
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(pem).hexdigest()


def verify_bundle(signature: object, public_key: object) -> SignedManifest:
    """Verify the model_signing bundle at ``signature`` with the PEM key at ``public_key``.

    :raises InvalidInput: either file is unreadable, or is not a bundle / a key at all.
    :raises IntegrityViolation: the signature does not verify with this key, or the signed
        statement is not a well-formed model_signing manifest.
    """
    key = load_public_key(public_key)
    envelope = _read_envelope(signature)
    return _Verification(key, envelope).run()


def _read_envelope(path: object) -> Mapping[str, Any]:
    p = check_path(path, field="signature")
    size = p.stat().st_size
    if size > MAX_BUNDLE_BYTES:
        raise InvalidInput(f"signature {escape_text(str(p))} is over {MAX_BUNDLE_BYTES} bytes")
    try:
        bundle = json.loads(p.read_bytes())
    except (ValueError, RecursionError):
        raise InvalidInput(
            f"signature {escape_text(str(p))} is not JSON (expected a model_signing bundle)"
        ) from None
    media = bundle.get("mediaType") if isinstance(bundle, dict) else None
    envelope = bundle.get("dsseEnvelope") if isinstance(bundle, dict) else None
    if not isinstance(media, str) or not media.startswith(_BUNDLE_MEDIA_PREFIX):
        raise InvalidInput(f"signature {escape_text(str(p))} is not a Sigstore bundle")
    if not isinstance(envelope, dict):
        raise InvalidInput(
            f"signature {escape_text(str(p))} holds no DSSE envelope (a model_signing bundle "
            "signed with a key has one)"
        )
    material = bundle.get("verificationMaterial")
    key = material.get("publicKey") if isinstance(material, dict) else None
    hint = key.get("hint") if isinstance(key, dict) else None
    return {**envelope, "_hint": hint}


class _Verification:
    """One bundle check: the key hint, the ECDSA signature, then the statement."""

    def __init__(self, key: ec.EllipticCurvePublicKey, envelope: Mapping[str, Any]) -> None:
        self.key = key
        self.envelope = envelope
        self.fingerprint = key_fingerprint(key)

    def run(self) -> SignedManifest:
        payload = self._verified_payload()
        return self._manifest(payload)

    def _verified_payload(self) -> bytes:
        hint = self.envelope.get("_hint")
        if isinstance(hint, str) and hint and hint != self.fingerprint:
            raise _refused("the bundle was signed with another key than this public key")
        payload_type = self.envelope.get("payloadType")
        if payload_type != PAYLOAD_TYPE:
            raise _refused(f"payload type {safe_repr(payload_type)}, not {PAYLOAD_TYPE}")
        try:
            payload = base64.b64decode(self.envelope.get("payload", ""), validate=True)
            sigs = [
                base64.b64decode(s["sig"], validate=True)
                for s in self.envelope.get("signatures", ())
            ]
        except (binascii.Error, TypeError, KeyError, ValueError):
            raise _refused("the envelope's payload or signature is not base64") from None
        if not sigs:
            raise _refused("the envelope holds no signature")
        message = pae(PAYLOAD_TYPE, payload)
        algorithm = curve_hash(self.key)
        for sig in sigs:
            try:
                self.key.verify(sig, message, algorithm)
            except InvalidSignature:
                continue
            return payload
        raise _refused("the signature does not verify with this public key")

    def _manifest(self, payload: bytes) -> SignedManifest:
        try:
            statement = json.loads(payload)
        except (ValueError, RecursionError):
            raise _refused("the signed payload is not JSON") from None
        if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE:
            raise _refused("the signed payload is not an in-toto v1 statement")
        if statement.get("predicateType") != PREDICATE_TYPE:
            raise _refused(
                f"predicate {safe_repr(statement.get('predicateType'))}: this vramcore reads "
                f"model_signing's {PREDICATE_TYPE}"
            )
        subjects = statement.get("subject")
        if (
            not isinstance(subjects, list)
            or len(subjects) != 1
            or not isinstance(subjects[0], dict)
        ):
            raise _refused("the statement must name exactly one model")
        subject = subjects[0]
        name = subject.get("name")
        digest = subject.get("digest")
        root = digest.get("sha256") if isinstance(digest, dict) else None
        if not isinstance(name, str) or not isinstance(root, str) or not _HEX64.fullmatch(root):
            raise _refused("the statement's subject lacks a name or a SHA-256")
        predicate = statement.get("predicate")
        if not isinstance(predicate, dict):
            raise _refused("the statement has no predicate")
        ignored = self._serialization(predicate.get("serialization"))
        files = self._resources(predicate.get("resources"), root)
        return SignedManifest(
            model_name=name,
            files=files,
            ignored=ignored,
            manifest_digest=root,
            key_fingerprint=self.fingerprint,
        )

    def _serialization(self, serialization: object) -> tuple[str, ...]:
        if not isinstance(serialization, dict):
            raise _refused("the predicate does not say how the model was serialized")
        method = serialization.get("method")
        if method != "files" or serialization.get("hash_type") != "sha256":
            raise _refused(
                f"serialization {safe_repr(method)} / {safe_repr(serialization.get('hash_type'))}"
                ": this vramcore checks model_signing's default, 'files' with 'sha256'"
            )
        ignored = serialization.get("ignore_paths", [])
        if not isinstance(ignored, list) or not all(isinstance(i, str) for i in ignored):
            raise _refused("ignore_paths must be a list of paths")
        return tuple(ignored)

    def _resources(self, resources: object, root: str) -> dict[str, str]:
        if not isinstance(resources, list) or not resources:
            raise _refused("the manifest lists no files")
        files: dict[str, str] = {}
        for item in resources:
            if not isinstance(item, dict):
                raise _refused("a manifest entry is not an object")
            name, algorithm, digest = item.get("name"), item.get("algorithm"), item.get("digest")
            if algorithm != "sha256" or not isinstance(digest, str) or not _HEX64.fullmatch(digest):
                raise _refused(f"manifest entry {safe_repr(name)} has no SHA-256")
            if not isinstance(name, str) or not _plain_relative(name):
                raise _refused(f"manifest entry {safe_repr(name)} is not a relative file name")
            if name in files:
                raise _refused(f"the manifest lists {safe_repr(name)} twice")
            files[name] = digest
        if manifest_digest(files.values()) != root:
            raise _refused("the manifest's files do not hash to its signed digest")
        return files


def _plain_relative(name: str) -> bool:
    pure = PurePosixPath(name)
    return (
        bool(name)
        and not pure.is_absolute()
        and ".." not in pure.parts
        and "\\" not in name
        and pure.as_posix() == name
        and name.isprintable()
    )


def signature_is_inside(signature: Path, root: Path) -> str | None:
    """The signature file's name relative to ``root`` when it lies inside it, else ``None``."""
    target = signature.resolve()
    return target.relative_to(root).as_posix() if target.is_relative_to(root) else None
