"""Sealing a model directory with and without the publisher's signature (mock backend).

The signed seal checks each file's SHA-256 against the signed manifest as its bytes are
copied (one read of each byte); the target is at most 1.15x the unsigned seal's time. Run::

    uv run python benchmarks/seal_dir_bench.py [--mib 256] [--repeat 3] [--json]

It writes a synthetic two-shard model (random F32 tensors) with an index, signs it with
``model_signing`` (an EC key made on the spot), and times ``VramManager.seal_dir`` on the mock
backend, best of ``--repeat``, each seal deallocated before the next.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from vramcore import VramManager
from vramcore.safetensors import write_safetensors
from vramcore.testing import publisher_keypair

_TOKEN = "Bn4Qw8Ez2Rt6Yu0Io3Pa7Sd1Fg5Hj9KlXc"


def make_model(root: Path, mib: int) -> None:
    """Two shards of ``mib / 2`` MiB each, an index and a config."""
    root.mkdir(parents=True)
    half = (mib << 20) // 2
    weight_map = {}
    for i in (1, 2):
        name = f"model-0000{i}-of-00002.safetensors"
        data = os.urandom(half)
        with (root / name).open("wb") as fh:
            write_safetensors(fh, {f"layer.{i}.weight": ("F32", [half // 4], data)})
        weight_map[f"layer.{i}.weight"] = name
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (root / "config.json").write_text("{}")


def best_seal(manager: VramManager, model: Path, repeat: int, **signed: Path) -> float:
    """Best wall time of ``repeat`` seals of ``model``."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        sealed = manager.seal_dir(model, **signed)
        best = min(best, time.perf_counter() - t0)
        for shard in sealed.shards:
            manager.deallocate(shard)
    return best


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--hash-workers", type=int, default=None, help="Merkle hashing threads (default: all)"
    )
    args = parser.parse_args()
    import model_signing

    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        model = where / "bench-model"
        make_model(model, args.mib)
        private, public = publisher_keypair(where)
        signature = where / "model.sig"
        model_signing.signing.Config().use_elliptic_key_signer(private_key=private).sign(
            model, signature
        )
        with VramManager(
            _TOKEN, allocator="mock", audit="disabled", hash_workers=args.hash_workers
        ) as manager:
            unsigned = best_seal(manager, model, args.repeat)
            signed = best_seal(manager, model, args.repeat, signature=signature, public_key=public)
    result = {
        "model_mib": args.mib,
        "unsigned_s": round(unsigned, 4),
        "signed_s": round(signed, 4),
        "ratio": round(signed / unsigned, 3),
        "cpus": os.cpu_count(),
        "hash_workers": args.hash_workers,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"seal_dir of {args.mib} MiB on the mock: unsigned {unsigned:.3f} s, signed "
            f"{signed:.3f} s, ratio {signed / unsigned:.3f} (target <= 1.15) on "
            f"{os.cpu_count()} CPUs"
        )


if __name__ == "__main__":
    main()
