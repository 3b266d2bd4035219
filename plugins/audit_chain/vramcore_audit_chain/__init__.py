"""vramcore-audit-chain: a tamper-evident, crash-safe, forward-secure audit log for vramcore.

Every event becomes one NDJSON record carrying a sequence number, the previous record's MAC
and an HMAC-SHA256 under a key that evolves one way at every checkpoint; Ed25519-signed
checkpoints let anyone with the public key detect truncation. ``vramcore audit verify``
proves a log intact offline. See FORMAT.md and README.md next to this package.

The plugin is enabled by setting ``VRAMCORE_AUDIT_LOG`` to a directory; its heads go to a
witness file with ``VRAMCORE_AUDIT_WITNESS`` (and to any other plugin's witnesses), so that the
log's completeness can be proven off the host: ``vramcore audit verify DIR --anchor FILE``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from vramcore import Commands, Setting
from vramcore._heads import Head
from vramcore.audit import AuditSink, AuditWitness, SinkContext
from vramcore.hookspecs import hookimpl
from vramcore_audit_chain._cli import add_commands
from vramcore_audit_chain._config import ChainConfig, Durability
from vramcore_audit_chain._head import TELEMETRY_HEAD_ATTRIBUTE, Anchor, AnchorSet, load_anchors
from vramcore_audit_chain._keys import AuditorKey, load_key_file, load_public_key
from vramcore_audit_chain._sink import ChainSink
from vramcore_audit_chain._verify import REASONS, VerifyResult, verify_log
from vramcore_audit_chain._witness import FileWitness, witnesses_from_env
from vramcore_audit_chain._writer import ChainWriter

__all__ = [
    "REASONS",
    "TELEMETRY_HEAD_ATTRIBUTE",
    "Anchor",
    "AnchorSet",
    "AuditorKey",
    "ChainConfig",
    "ChainSink",
    "ChainWriter",
    "Durability",
    "FileWitness",
    "Head",
    "VerifyResult",
    "load_anchors",
    "load_key_file",
    "load_public_key",
    "verify_log",
]


@hookimpl
def vramcore_audit_sinks(context: SinkContext) -> Sequence[AuditSink]:
    """A :class:`ChainSink` when ``VRAMCORE_AUDIT_LOG`` is set, else none."""
    config = ChainConfig.from_env(os.environ)
    if config is None:
        return []
    # The writer starts once the manager attaches the witnesses (attach_witnesses), so it
    # can check the log against them before it writes anything.
    return [ChainSink(config, context, witnesses=None)]


@hookimpl
def vramcore_audit_witnesses(context: SinkContext) -> Sequence[AuditWitness]:
    """A :class:`FileWitness` when ``VRAMCORE_AUDIT_WITNESS`` is set (and the chain is on)."""
    config = ChainConfig.from_env(os.environ)
    if config is None:
        return []
    return witnesses_from_env(os.environ, config.directory)


@hookimpl
def vramcore_add_commands(commands: Commands) -> None:
    """Add ``vramcore audit verify``, ``audit show`` and ``audit public-key``."""
    add_commands(commands)


@hookimpl
def vramcore_settings() -> Sequence[Setting]:
    """The audit chain's ``VRAMCORE_AUDIT_*`` settings (see README.md)."""
    return [
        Setting(
            key="audit_log",
            help="directory of the audit log (bound to the worker token)",
            kind="path",
            activates="sink",
            default="unset: no audit chain",
        ),
        Setting(
            key="audit_witness",
            help="file the chain appends its signed heads to (keep it off the log's disk)",
            kind="path",
            activates="witness",
            default="unset",
        ),
        Setting(
            key="audit_witness_required",
            help="a failing witness fails critical events closed",
            kind="bool",
            default="false",
        ),
        Setting(
            key="audit_durability",
            help="when an event counts as recorded",
            kind="choice",
            choices=("immediate", "batched", "mixed"),
            default="mixed",
        ),
        Setting(
            key="audit_flush_ms",
            help="batched mode: longest wait for a record's fsync (ms)",
            kind="int",
            minimum=1,
            maximum=60_000,
            default="50",
        ),
        Setting(
            key="audit_max_bytes",
            help="rotate to the next file at this size (bytes)",
            kind="int",
            minimum=1,
            default="67108864 (64 MiB)",
        ),
        Setting(
            key="audit_checkpoint_records",
            help="records per checkpoint and key epoch",
            kind="int",
            minimum=1,
            default="10000",
        ),
        Setting(
            key="audit_checkpoint_seconds",
            help="seconds per checkpoint and key epoch",
            kind="int",
            minimum=1,
            default="300",
        ),
        Setting(
            key="audit_initial_key_file",
            help="where setup writes the auditor's initial key",
            kind="path",
            default="auditor-initial.key in the log directory",
        ),
        Setting(
            key="audit_thin_verified_seconds",
            help="one record per shard per interval for successful verifications, with a "
            "count (never a failure, violation or seal); 0 records each",
            kind="int",
            minimum=0,
            default="0 (every verification recorded)",
        ),
        Setting(
            key="audit_key_file",
            help="the auditor's key file for audit verify",
            kind="path",
            default="--key-file",
        ),
    ]
