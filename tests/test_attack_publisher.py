"""Attacks on the chain of trust from the publisher's signature to VRAM.

Someone who owns the worker's disk swaps a signed model's bytes after the signature was
checked, or drops in a look-alike model signed by the same publisher. The signed SHA-256 of
each file is checked against the bytes as they are copied, so neither gets sealed, and nothing
stays in VRAM. Signatures are real (``model_signing``, an EC key pair).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import vramcore_allocator_mock as mock_plugin

import vramcore._loading
from vramcore import VramManager
from vramcore.errors import IntegrityViolation
from vramcore.safetensors import write_safetensors
from vramcore.testing import (
    TEST_TOKEN,
    CapturePlugin,
    CapturingSink,
    publisher_keypair,
    sign_model_dir,
)

pytest.importorskip("model_signing")

SHARD = "model.safetensors"


def _publish(root: Path, weights: bytes) -> None:
    """One shard and a config, as a small hub repository holds them."""
    root.mkdir(parents=True)
    with (root / SHARD).open("wb") as fh:
        write_safetensors(fh, {"w": ("U8", [len(weights)], weights)})
    (root / "config.json").write_text("{}")


def _sign(model: Path, where: Path) -> tuple[Path, Path]:
    """``model_signing sign key`` with a fresh P-256 key: (signature, public key PEM)."""
    private, public = publisher_keypair(where, "publisher")
    signature = where / f"{model.name}.sig"
    sign_model_dir(model, private, signature)
    return signature, public


@pytest.fixture
def sink() -> CapturingSink:
    return CapturingSink()


@pytest.fixture
def manager(sink: CapturingSink, make_plugin_manager: Any) -> Iterator[VramManager]:
    pm = make_plugin_manager(mock_plugin, CapturePlugin(sink))
    with VramManager(TEST_TOKEN, allocator="mock", plugin_manager=pm, chunk_bytes=1 << 16) as m:
        yield m


def _assert_refused_and_gone(
    manager: VramManager, sink: CapturingSink, model: Path, signature: Path, public: Path
) -> str:
    with pytest.raises(IntegrityViolation) as caught:
        manager.seal_dir(model, signature=signature, public_key=public)
    assert manager.shards() == [] and manager.used_vram() == 0
    assert sink.of_type("vram.seal_refused"), "the refusal is audited"
    assert not sink.of_type("vram.sealed") and not sink.of_type("vram.model_sealed")
    return str(caught.value)


def test_a_shard_rewritten_after_the_signature_check_is_refused_as_it_is_copied(
    manager: VramManager, sink: CapturingSink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The manifest and each file's size are checked before the copy; the attacker rewrites a
    # tensor byte of the shard just as its copy starts (the header stays the same).
    model = tmp_path / "model"
    _publish(model, os.urandom(300_000))
    signature, public = _sign(model, tmp_path)
    load = vramcore._loading.FileLoad.run

    def rewrite_then_load(self: Any) -> None:
        path = self.source.path
        if path.name == SHARD:
            data = bytearray(path.read_bytes())
            data[-7] ^= 0x40
            path.write_bytes(bytes(data))
        load(self)

    monkeypatch.setattr(vramcore._loading.FileLoad, "run", rewrite_then_load)
    message = _assert_refused_and_gone(manager, sink, model, signature, public)
    assert "SHA-256" in message and "\n" not in message


def test_a_look_alike_model_under_the_same_names_is_refused(
    manager: VramManager, sink: CapturingSink, tmp_path: Path
) -> None:
    # Same file names, same header, other weights: the publisher's signature over the real
    # model is presented with the look-alike.
    real, fake = tmp_path / "real" / "model", tmp_path / "fake" / "model"
    _publish(real, os.urandom(4096))
    _publish(fake, os.urandom(4096))
    signature, public = _sign(real, tmp_path)
    message = _assert_refused_and_gone(manager, sink, fake, signature, public)
    assert SHARD in message and "SHA-256" in message
