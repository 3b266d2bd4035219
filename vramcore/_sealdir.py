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
4. **record** -- a :class:`SealedModel` (the directory's attestation, signed: an HMAC under a
   key derived from the seal key for this purpose, :data:`vramcore.seal.MODEL_KEY_INFO`, over
   the list of shards, the index and the publisher) and one critical audit event,
   ``vram.model_sealed`` (shards, index, key fingerprint, manifest digest).

:class:`ModelCheck` checks that signature again (``VramManager.verify_model`` and
``verify_attestation``): an attestation whose list of shards, files, index or publisher was
edited, or that another worker signed, fails with reason ``"signature"``, audited.

All or nothing: if any step fails, every shard this call sealed is deallocated and the error
(one line) is raised.

**Shards at once.** A file's SHA-256 is one sequential stream (about 1.7 GB/s on one core of
a current CPU), so a signed seal of one shard at a time cannot go faster than that, however
many cores hash the Merkle leaves. ``parallel`` shards are sealed at once, each on a thread of
its own with its own SHA-256 stream and staging ring, sharing the reader threads. The default,
:func:`default_parallel_shards`, is one shard per four usable CPUs (at most
:data:`DEFAULT_MAX_PARALLEL`), and at least two for a signed seal on a host with two CPUs or
more: unsigned, the leaves already keep every core of a small host busy, so a second shard
gains little and costs on small models; signed, a second SHA-256 stream uses the core the
first leaves idle. Measured on 2 CPUs from the page cache (``benchmarks/seal_dir_bench.py``,
two shards), one at a time against two at once: 1 GiB signed 1.04 s and 0.81 s, unsigned
0.55 s and 0.49 s; 64 MiB unsigned 0.039 s and 0.046 s.

Whatever the width, the result is the same: the attestation lists the shards in file order;
each shard's audit events keep their order (events of different shards may interleave) and
``vram.model_sealed`` comes last; once a shard fails no further shard starts,
the ones under way finish, everything sealed is deallocated, and the error raised is that of
the first failed shard in file order (not whichever failed first in time). A second interrupt
that ends the wait for the shards under way does not leave them behind: a shard whose seal
finishes after the call let go deallocates itself.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn, Protocol

import attrs

from vramcore._modeldir import ModelDir, ModelFile, bad_dir, scan_model_dir, walk_files
from vramcore._publisher import SignedManifest, signature_is_inside, verify_bundle
from vramcore.errors import IntegrityViolation, InvalidInput, SealVerificationFailed, VramError
from vramcore.events import VerificationReason
from vramcore.seal import MODEL_KEY_INFO, SecretKey, canonical_model_message
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
    """Where a sealed directory is audited (``vram.model_sealed``, a critical event) and a
    refused model attestation (``seal.verification_failed``, critical)."""

    def model_sealed(self, model: SealedModel) -> None: ...

    def verification_failed(self, shard_id: str, *, reason: str, detail: str) -> None: ...


class SealKeyHolder(Protocol):
    """What signs and checks a model attestation: the manager's seal key, while it is open."""

    def key(self) -> SecretKey: ...


__all__ = [
    "DEFAULT_MAX_PARALLEL",
    "MAX_PARALLEL",
    "MODEL_ATTESTATION_VERSION",
    "ModelCheck",
    "Publisher",
    "SealDir",
    "SealedModel",
    "check_parallel",
    "default_parallel_shards",
]

#: Version of :meth:`SealedModel.to_json`'s form (2: signed; 1 had no signature, refused).
MODEL_ATTESTATION_VERSION = 2
_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FIELDS = {"model_attestation_version", "model", "index", "publisher", "shards", "signature"}
#: The most shards :class:`SealDir` seals at once when asked (each holds a staging ring).
MAX_PARALLEL = 64
#: The most shards sealed at once by default (:func:`default_parallel_shards`).
DEFAULT_MAX_PARALLEL = 4


def default_parallel_shards(*, signed: bool = False) -> int:
    """Shards sealed at once when ``parallel`` is not given: one per four CPUs this process
    may run on, from 1 to :data:`DEFAULT_MAX_PARALLEL` (1 on a 2- or 3-CPU host); for a
    ``signed`` seal at least 2 where there are 2 CPUs, so that two SHA-256 streams run."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    width = max(1, min(DEFAULT_MAX_PARALLEL, cpus // 4))
    return max(width, min(2, cpus)) if signed else width


def check_parallel(value: object, *, field: str = "parallel") -> int:
    """A ``parallel`` argument: a whole number of shards from 1 to :data:`MAX_PARALLEL`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PARALLEL:
        raise InvalidInput(
            f"{field} must be a whole number of shards from 1 to {MAX_PARALLEL}, got "
            f"{safe_repr(value)}"
        )
    return value


def _signature_bytes(_instance: object, _attribute: object, value: object) -> None:
    if not isinstance(value, bytes):
        raise InvalidInput("a model attestation's signature must be bytes")


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
    :attr signature: HMAC-SHA256 over :meth:`signed_message` under the worker's model
        attestation key (never shown in repr/str).

    Each shard carries its own HMAC seal; a signed directory's shards also carry their file's
    SHA-256 (checked against the signed manifest while loading, and covered by the seal), so
    an auditor can trace each shard in VRAM to the publisher's manifest. The attestation's own
    signature covers which shards make up the model, under which file names, in which order,
    from which index and which publisher: dropping, adding or swapping a shard, or editing the
    key fingerprint or the manifest digest, breaks it.
    """

    model: str
    index: str | None
    files: Mapping[str, SealedShard]
    publisher: Publisher | None = None
    signature: bytes = attrs.field(default=b"", repr=False, validator=_signature_bytes)

    def signed_message(self) -> bytes:
        """The bytes the signature covers (:func:`vramcore.seal.canonical_model_message`)."""
        publisher = self.publisher
        return canonical_model_message(
            model=self.model,
            index=self.index,
            publisher=(
                None
                if publisher is None
                else (publisher.key_fingerprint, publisher.manifest_digest, publisher.model_name)
            ),
            shards=[
                (name, hashlib.sha256(shard.signed_message()).digest())
                for name, shard in self.files.items()
            ],
        )

    @property
    def event_id(self) -> str:
        """The id audit events give this model (its name, made a valid shard id)."""
        return (_ID_CHARS.sub("-", self.model).strip("-.") or "model")[:128]

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
        """The directory's attestation: every shard's attestation, by file, the publisher and
        (with ``include_signature``) its own signature and every shard's."""
        out: dict[str, Any] = {
            "model_attestation_version": MODEL_ATTESTATION_VERSION,
            "model": self.model,
            "index": self.index,
            "publisher": self.publisher.to_dict() if self.publisher else None,
            "shards": [
                {"file": name, "attestation": shard.to_dict(include_signature=include_signature)}
                for name, shard in self.files.items()
            ],
        }
        if include_signature:
            out["signature"] = self.signature.hex()
        return out

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

        Reading checks the form only: whether the signature is this worker's is for
        ``VramManager.verify_model`` / ``verify_attestation`` to say.

        :raises InvalidInput: malformed JSON, a missing or unknown field, a bad shard, an
            attestation without its signature (version 1, or written without signatures).
        """
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            raise InvalidInput("model attestation is not valid JSON") from None
        if isinstance(data, dict) and data.get("model_attestation_version") == 1:
            raise InvalidInput(
                "model attestation version 1 carries no signature of its own; seal the "
                "directory again"
            )
        if not isinstance(data, dict) or set(data) != _FIELDS:
            raise InvalidInput(
                "model attestation must hold exactly the fields to_json() writes, its "
                "signature included"
            )
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
        signature = data["signature"]
        if not isinstance(signature, str) or not _HEX64.fullmatch(signature):
            raise InvalidInput("model attestation field 'signature' must be 64 hex digits")
        if not isinstance(data["model"], str) or not (
            data["index"] is None or isinstance(data["index"], str)
        ):
            raise InvalidInput("model attestation fields 'model' and 'index' must be text")
        model = cls(data["model"], data["index"], files, publisher, bytes.fromhex(signature))
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
        parallel: object = None,
        signer: SealKeyHolder,
        emitter: ModelRecorder | None = None,
    ) -> None:
        if (signature is None) != (public_key is None):
            raise InvalidInput("a publisher signature needs both signature and public_key")
        self.parallel = (
            default_parallel_shards(signed=signature is not None)
            if parallel is None
            else check_parallel(parallel)
        )
        self.manager = manager
        self.signer = signer
        self.path = path
        self.signature = signature
        self.public_key = public_key
        self.shard_prefix = shard_prefix
        self.emitter = emitter
        self.model: ModelDir | None = None
        self.manifest: SignedManifest | None = None
        self.sealed: dict[str, SealedShard] = {}
        self._lock = threading.Lock()  # guards ``sealed`` while shards are sealed at once
        self._stop = threading.Event()  # set once a shard failed: start no more
        self._released = False  # set (under the lock) once the call failed and let go

    def run(self) -> SealedModel:
        """Scan, check the publisher's signature, seal every shard, record the result."""
        self.model = scan_model_dir(self.path)
        prefix = self._prefix(self.model)
        if self.signature is not None:
            self.manifest = verify_bundle(self.signature, self.public_key)
            self._check_coverage(self.model, self.manifest)
            self._check_other_files(self.model, self.manifest)
        try:
            if min(self.parallel, len(self.model.shards)) > 1:
                self._seal_at_once(prefix)
            else:
                for shard in self.model.shards:
                    self._seal(shard, prefix)
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

    def _seal_at_once(self, prefix: str) -> None:
        """Seal ``parallel`` shards at a time; the first failure in file order is raised once
        no shard is being sealed any more (the caller then releases what was sealed)."""
        assert self.model is not None
        shards = self.model.shards
        pool = concurrent.futures.ThreadPoolExecutor(
            min(self.parallel, len(shards)), thread_name_prefix="vramcore-seal-dir"
        )
        try:
            futures = [pool.submit(self._seal_unless_stopped, shard, prefix) for shard in shards]
            concurrent.futures.wait(futures)
        finally:
            self._stop.set()  # an interrupt while waiting: start nothing more ...
            pool.shutdown(wait=True, cancel_futures=True)  # ... and let the rest finish
        for future in futures:
            error = future.exception()
            if error is not None:
                raise error

    def _seal_unless_stopped(self, shard: ModelFile, prefix: str) -> None:
        if self._stop.is_set():
            return
        try:
            self._seal(shard, prefix)
        except BaseException:
            self._stop.set()
            raise

    def _seal(self, shard: ModelFile, prefix: str) -> None:
        name = shard.name
        expected = self.manifest.files[name] if self.manifest is not None else None
        shard_id = f"{prefix}:{name.replace('/', ':')}"
        try:
            sealed = self.manager.seal_file(shard.path, shard_id=shard_id, expected_sha256=expected)
        except IntegrityViolation as exc:
            if exc.reason == "sha256_mismatch":
                raise _tampered(name) from None
            raise
        with self._lock:
            released = self._released
            if not released:
                self.sealed[name] = sealed
        if released:  # the call already failed and let go (a second interrupt ended the wait)
            self._deallocate(sealed)
            return
        assert self.model is not None
        self.model.check_sealed(name, sealed.tensors)

    def _release(self) -> None:
        """Deallocate every shard sealed so far; a shard whose seal finishes later (a worker
        still running when a second interrupt ended the wait) deallocates itself."""
        with self._lock:
            self._released = True
            sealed = list(self.sealed.values())
        for shard in sealed:
            self._deallocate(shard)

    def _deallocate(self, shard: SealedShard) -> None:
        with contextlib.suppress(VramError):  # already gone (the manager closed)
            self.manager.deallocate(shard)

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
        files = {shard.name: self.sealed[shard.name] for shard in model.shards}  # file order
        unsigned = SealedModel(model.root.name, model.index, files, publisher)
        key = self.signer.key().derive(MODEL_KEY_INFO)
        try:
            return attrs.evolve(unsigned, signature=key.mac(unsigned.signed_message()))
        finally:
            key.wipe()


class ModelCheck:
    """One check of a model attestation's own signature (not of the shards' bytes).

    :param keys: the manager's seal key holder; :param recorder: where a refusal is audited.
    """

    def __init__(self, keys: SealKeyHolder, recorder: ModelRecorder, model: object) -> None:
        if not isinstance(model, SealedModel):
            raise InvalidInput(f"expected a SealedModel, got {type(model).__name__}")
        self.keys = keys
        self.recorder = recorder
        self.model = model

    def run(self) -> None:
        """Refuse (audited, :class:`~vramcore.errors.SealVerificationFailed`) an attestation
        this worker's key did not sign as it stands."""
        key = self.keys.key().derive(MODEL_KEY_INFO)
        try:
            good = key.mac_matches(self.model.signed_message(), self.model.signature)
        finally:
            key.wipe()
        if not good:
            self._refuse()

    def _refuse(self) -> NoReturn:
        name = escape_text(self.model.model[:256])
        why = (
            "its signature is not valid under this worker's key (the list of shards, a file "
            "name, the index or the publisher was edited, or another worker sealed it)"
        )
        model_id = self.model.event_id
        self.recorder.verification_failed(
            model_id,
            reason=VerificationReason.SIGNATURE,
            detail=f"attestation of model {name}: {why}",
        )
        raise SealVerificationFailed(
            f"attestation of model {name} failed verification: {why}",
            shard_id=model_id,
            reason=VerificationReason.SIGNATURE,
        )


def _tampered(name: str) -> IntegrityViolation:
    return IntegrityViolation(
        f"model directory refused: {escape_text(name)} does not match the SHA-256 the "
        "publisher signed",
        reason="sha256_mismatch",
    )
