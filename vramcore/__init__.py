"""vramcore: keep model weights resident in GPU memory, and prove it.

Seal each shard as it lands in VRAM (an RFC 6962 Merkle digest signed with HMAC-SHA256 under a
key derived from the worker token), verify the seal from VRAM before every inference, refuse
devices where weights could live in host memory, and audit everything through plugins.

>>> with VramManager(token, allocator="mock") as vram:         # doctest: +SKIP
...     shard = vram.seal_file("model.safetensors")
...     with vram.verified(shard) as buffer:
...         run_inference(buffer.native)
"""

from vramcore._cli.commands import (
    EXIT_FAILURE,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_USAGE,
    Commands,
    Console,
    UsageError,
)
from vramcore._config import Setting
from vramcore._context import correlate
from vramcore._keyproviders import read_worker_token
from vramcore._sealdir import Publisher, SealedModel
from vramcore._tensors import TensorView
from vramcore.audit import AuditSink, AuditWitness, SinkContext
from vramcore.backend import (
    AllocatorBackend,
    BackendSpec,
    CopyHandle,
    DeviceBuffer,
    DeviceDigest,
    DeviceInfo,
    MemoryKind,
    TensorSource,
)
from vramcore.digest import DEFAULT_LEAF_SIZE, DIGEST_ALG
from vramcore.hookspecs import hookimpl, hookspec
from vramcore.manager import VramManager
from vramcore.plugins import get_plugin_manager
from vramcore.policy import VramPolicy
from vramcore.seal import WorkerToken
from vramcore.shard import SealedShard, TensorMap, TensorRange

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_LEAF_SIZE",
    "DIGEST_ALG",
    "EXIT_FAILURE",
    "EXIT_INTERNAL",
    "EXIT_OK",
    "EXIT_USAGE",
    "AllocatorBackend",
    "AuditSink",
    "AuditWitness",
    "BackendSpec",
    "Commands",
    "Console",
    "CopyHandle",
    "DeviceBuffer",
    "DeviceDigest",
    "DeviceInfo",
    "MemoryKind",
    "Publisher",
    "SealedModel",
    "SealedShard",
    "Setting",
    "SinkContext",
    "TensorMap",
    "TensorRange",
    "TensorSource",
    "TensorView",
    "UsageError",
    "VramManager",
    "VramPolicy",
    "WorkerToken",
    "__version__",
    "correlate",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "read_worker_token",
]
