"""Sealing a whole model directory: one flow object, one shard per file, one attestation.

:meth:`vramcore.VramManager.seal_dir` is a facade over :class:`SealDir`:

1. **scan** -- :func:`vramcore._modeldir.scan_model_dir` finds the shards (the index's files,
   or every ``*.safetensors``) and checks the index against the shards' headers;
2. **publisher** (with ``signature`` and ``public_key``) -- :func:`vramcore._publisher.
   verify_bundle` checks the OpenSSF Model Signing bundle; every file of the directory must be
   in the signed manifest and every signed file present (the signature itself and the paths
   the publisher excluded aside); files that are not shards are hashed and compared;
3. **seal** -- each shard is sealed with ``seal_file(expected_sha256=<signed SHA-256>)``: its
   SHA-256 is computed from the very bytes copied to VRAM, each byte read once, and a
   mismatch leaves nothing allocated. Its sealed tensor map must be the one scanned;
4. **record** -- a :class:`SealedModel` (the directory's attestation) and one critical audit
   event, ``vram.model_sealed`` (shards, index, key fingerprint, manifest digest).

All or nothing: if any step fails, every shard this call sealed is deallocated and the error
(one line) is raised.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import attrs

from vramcore._modeldir import ModelDir, bad_dir, scan_model_dir, walk_files
from vramcore._publisher import SignedManifest, signature_is_inside, verify_bundle
from vramcore.errors import IntegrityViolation, InvalidInput, VramError
from vramcore.shard import SealedShard
from vramcore.validation import check_shard_id, escape_text, safe_repr


class ShardSealer(Protocol):
    """What a directory seal needs of the manager: seal one file, free one shard."""

    def seal_file(
        self,
        path: str | os.PathLike[str],
        *,
        shard_id: str | None = None,
        expected_sha256: str | None = None,
    ) -> SealedShard: ...

    def deallocate(self, shard: SealedShard) -> None: ...


class ModelRecorder(Protocol):
    """Where a sealed directory is audited (``vram.model_sealed``, a critical event)."""

    def model_sealed(self, model: SealedModel) -> None: ...


__all__ = ["MODEL_ATTESTATION_VERSION", "Publisher", "SealDir", "SealedModel"]

#: Version of :meth:`SealedModel.to_json`'s form.
MODEL_ATTESTATION_VERSION = 1
_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


@attrs.frozen
class Publisher:
    """The publisher signature a directory was sealed against.

    :attr key_fingerprint: SHA-256 of the public key's PEM (``model_signing``'s key hint).
    :attr manifest_digest: the signed manifest's digest (names this exact set of files).
    :attr model_name: the model name the publisher signed.
    """

    key_fingerprint: str
    manifest_digest: str
    model_name: str

    def to_dict(self) -> dict[str, str]:
        """Plain JSON types."""
        return attrs.asdict(self)


@attrs.frozen
class SealedModel:
    """A model directory sealed in VRAM: one :class:`~vramcore.SealedShard` per file.

    :attr model: the directory's name.
    :attr index: the index file's name, ``None`` without an index.
    :attr files: shard file name (relative to the directory) -> its sealed shard, in order.
    :attr publisher: the verified publisher signature, ``None`` when sealed without one.

    Each shard carries its own HMAC seal; a signed directory's shards also carry their file's
    SHA-256 (checked against the signed manifest while loading, and covered by the seal), so
    an auditor can trace each shard in VRAM to the publisher's manifest.
    """

    model: str
    index: str | None
    files: Mapping[str, SealedShard]
    publisher: Publisher | None = None

    @property
    def shards(self) -> tuple[SealedShard, ...]:
        """The sealed shards, in file order (what ``bind`` and ``verify_sealed`` take)."""
        return tuple(self.files.values())

    @property
    def vram_bytes(self) -> int:
        """Bytes held in VRAM by all the shards."""
        return sum(s.vram_bytes for s in self.files.values())

    def summary(self) -> str:
        """One line: the model, its shards and size, and who signed it."""
        signed = (
            f"signed by key {self.publisher.key_fingerprint[:16]}, manifest "
            f"{self.publisher.manifest_digest[:16]}"
            if self.publisher
            else "no publisher signature"
        )
        tensors = sum(len(s.tensors) for s in self.files.values())
        return (
            f"sealed model {escape_text(self.model)}: {len(self.files)} shard(s), {tensors} "
            f"tensors, {self.vram_bytes} bytes, {signed}"
        )

    def to_dict(self, *, include_signature: bool = True) -> dict[str, Any]:
        """The directory's attestation: every shard's attestation, by file, and the publisher."""
        return {
            "model_attestation_version": MODEL_ATTESTATION_VERSION,
            "model": self.model,
            "index": self.index,
            "publisher": self.publisher.to_dict() if self.publisher else None,
            "shards": [
                {"file": name, "attestation": shard.to_dict(include_signature=include_signature)}
                for name, shard in self.files.items()
            ],
        }

    def to_json(self, *, include_signature: bool = True) -> str:
        """Compact JSON with sorted keys (its one canonical form)."""
        return json.dumps(
            self.to_dict(include_signature=include_signature),
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> SealedModel:
        """Read what :meth:`to_json` wrote (with signatures); only the canonical form.

        :raises InvalidInput: malformed JSON, a missing or unknown field, a bad shard.
        """
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            raise InvalidInput("model attestation is not valid JSON") from None
        if not isinstance(data, dict) or set(data) != {
            "model_attestation_version",
            "model",
            "index",
            "publisher",
            "shards",
        }:
            raise InvalidInput("model attestation must hold exactly the fields to_json() writes")
        if data["model_attestation_version"] != MODEL_ATTESTATION_VERSION:
            raise InvalidInput(
                f"unsupported model_attestation_version "
                f"{safe_repr(data['model_attestation_version'])}"
            )
        publisher = data["publisher"]
        if publisher is not None:
            if not isinstance(publisher, dict) or set(publisher) != {
                "key_fingerprint",
                "manifest_digest",
                "model_name",
            }:
                raise InvalidInput("model attestation field 'publisher' is malformed")
            publisher = Publisher(**publisher)
        shards = data["shards"]
        if not isinstance(shards, list) or not all(
            isinstance(s, dict) and set(s) == {"file", "attestation"} for s in shards
        ):
            raise InvalidInput("model attestation field 'shards' is malformed")
        files = {
            s["file"]: SealedShard.from_json(
                json.dumps(s["attestation"], sort_keys=True, separators=(",", ":"))
            )
            for s in shards
        }
        model = cls(data["model"], data["index"], files, publisher)
        raw = text.encode() if isinstance(text, str) else bytes(text)
        if model.to_json().encode() != raw:
            raise InvalidInput("model attestation is not in canonical form; refusing it")
        return model


class SealDir:
    """One seal of one model directory (see the module docstring); :meth:`run` does it."""

    def __init__(
        self,
        manager: ShardSealer,
        path: object,
        *,
        signature: object = None,
        public_key: object = None,
        shard_prefix: str | None = None,
        emitter: ModelRecorder | None = None,
    ) -> None:
        if (signature is None) != (public_key is None):
            raise InvalidInput("a publisher signature needs both signature and public_key")
        self.manager = manager
        self.path = path
        self.signature = signature
        self.public_key = public_key
        self.shard_prefix = shard_prefix
        self.emitter = emitter
        self.model: ModelDir | None = None
        self.manifest: SignedManifest | None = None
        self.sealed: dict[str, SealedShard] = {}

    def run(self) -> SealedModel:
        """Scan, check the publisher's signature, seal every shard, record the result."""
        self.model = scan_model_dir(self.path)
        prefix = self._prefix(self.model)
        if self.signature is not None:
            self.manifest = verify_bundle(self.signature, self.public_key)
            self._check_coverage(self.model, self.manifest)
            self._check_other_files(self.model, self.manifest)
        try:
            for shard in self.model.shards:
                self._seal(shard.name, shard.path, f"{prefix}:{shard.name.replace('/', ':')}")
            result = self._result(self.model)
            if self.emitter is not None:
                self.emitter.model_sealed(result)  # critical: a sink failure undoes the seal
        except BaseException:
            self._release()
            raise
        return result

    def _prefix(self, model: ModelDir) -> str:
        if self.shard_prefix is not None:
            return check_shard_id(self.shard_prefix, field="shard_prefix")
        name = _ID_CHARS.sub("-", model.root.name).strip("-.") or "model"
        return check_shard_id(name[:128], field="shard_prefix")

    def _check_coverage(self, model: ModelDir, manifest: SignedManifest) -> None:
        own = signature_is_inside(Path(str(self.signature)), model.root)
        present = {
            f.name
            for f in walk_files(model.root)
            if f.name != own and not manifest.is_ignored(f.name)
        }
        for name in sorted(present):
            if name not in manifest.files:
                raise bad_dir(f"{escape_text(name)} is not covered by the publisher's signature")
        for name in manifest.files:
            if name not in present:
                raise bad_dir(f"{escape_text(name)} is signed by the publisher but missing")

    def _check_other_files(self, model: ModelDir, manifest: SignedManifest) -> None:
        shards = {s.name for s in model.shards}
        for name, expected in manifest.files.items():
            if name in shards:
                continue  # checked as its bytes are copied to VRAM
            with (model.root / name).open("rb") as fh:
                actual = hashlib.file_digest(fh, "sha256").hexdigest()
            if actual != expected:
                raise _tampered(name)

    def _seal(self, name: str, path: Path, shard_id: str) -> None:
        expected = self.manifest.files[name] if self.manifest is not None else None
        try:
            shard = self.manager.seal_file(path, shard_id=shard_id, expected_sha256=expected)
        except IntegrityViolation as exc:
            if exc.reason == "sha256_mismatch":
                raise _tampered(name) from None
            raise
        self.sealed[name] = shard
        assert self.model is not None
        self.model.check_sealed(name, shard.tensors)

    def _release(self) -> None:
        for shard in self.sealed.values():
            try:
                self.manager.deallocate(shard)
            except VramError:
                continue  # already gone (the manager closed): nothing left to free

    def _result(self, model: ModelDir) -> SealedModel:
        publisher = (
            Publisher(
                key_fingerprint=self.manifest.key_fingerprint,
                manifest_digest=self.manifest.manifest_digest,
                model_name=self.manifest.model_name,
            )
            if self.manifest is not None
            else None
        )
        return SealedModel(model.root.name, model.index, dict(self.sealed), publisher)


def _tampered(name: str) -> IntegrityViolation:
    return IntegrityViolation(
        f"model directory refused: {escape_text(name)} does not match the SHA-256 the "
        "publisher signed",
        reason="sha256_mismatch",
    )
