"""Hook specifications: every way a plugin extends vramcore.

Plugins implement these with ``@vramcore.hookimpl`` (pluggy project name ``"vramcore"``;
every hook starts with ``vramcore_`` and a plugin defining an unknown ``vramcore_*`` hook is
rejected). A plugin is a module or object registered under the ``vramcore`` entry-point group,
or passed to :func:`vramcore.plugins.get_plugin_manager` directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from vramcore._cli.commands import Commands
    from vramcore._config import Setting
    from vramcore.audit import AuditSink, AuditWitness, SinkContext
    from vramcore.backend import (
        AllocatorBackend,
        BackendSpec,
        DeviceBuffer,
        DeviceDigest,
        DeviceInfo,
    )
    from vramcore.events import AuditEvent
    from vramcore.narration import Operation
    from vramcore.seal import SecretKey

PROJECT_NAME = "vramcore"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

# -------------------------------------------------------------------------
# Allocation backends
# -------------------------------------------------------------------------


@hookspec
def vramcore_allocator_backends() -> Sequence[BackendSpec]:
    """Offer allocator backends.

    Each :class:`~vramcore.backend.BackendSpec` names a backend, its priority, a viability
    probe that says why it cannot run, and a factory. The results of all plugins are
    flattened; two backends with one name are a configuration error.

    :return: the backends this plugin offers (may be empty).

    Not firstresult: every plugin's backends are collected. Called when a manager selects its
    backend and by ``vramcore plugins``.
    """
    raise NotImplementedError


# -------------------------------------------------------------------------
# Device probing
# -------------------------------------------------------------------------


@hookspec(firstresult=True)
def vramcore_probe_devices(backend: AllocatorBackend) -> Sequence[DeviceInfo] | None:
    """Describe the devices ``backend`` drives, with the flags the VRAM-only policy reads.

    The core's default implementation (``trylast``) returns ``backend.devices()``. A plugin
    that knows more (NVML for ECC counts, a site inventory) may return richer records for the
    backends it recognises and ``None`` for the rest.

    :param backend: the selected backend.
    :return: one :class:`~vramcore.backend.DeviceInfo` per device, or ``None`` to defer.

    firstresult: the first non-``None`` result wins. Called when a manager starts (the policy
    check) and by ``vramcore devices``.
    """
    raise NotImplementedError


# -------------------------------------------------------------------------
# Sealing
# -------------------------------------------------------------------------


@hookspec(firstresult=True)
def vramcore_seal_key(worker_id: str) -> SecretKey | None:
    """Provide the key that signs and verifies seals (a KMS or HSM, for example).

    Asked only when the operator names this plugin as the seal key provider
    (``VramManager(seal_key_provider="NAME")`` or ``VRAMCORE_SEAL_KEY_PROVIDER=NAME``, where
    NAME is the plugin's entry-point name or ``distribution:entry-point``). The core then
    calls it through a hook caller that holds this plugin alone: no other plugin's wrapper
    runs around it or sees the key. Without a named provider the core
    derives the key from the worker token itself (HKDF-SHA256,
    :data:`vramcore.seal.SEAL_KEY_INFO`) and asks no plugin. A provider is never handed the
    worker token (an implementation asking for a ``token`` argument is refused when it is
    registered). The manager wipes the returned key when it closes.

    :param worker_id: the worker's public id.
    :return: a :class:`~vramcore.seal.SecretKey`; anything else stops the manager with a
        :class:`~vramcore.errors.ConfigError` naming the plugin.

    firstresult (only the named plugin is called). Called once when a manager starts.
    """
    raise NotImplementedError


@hookspec(firstresult=True)
def vramcore_device_digest(
    backend: AllocatorBackend,
    buffer: DeviceBuffer,
    leaf_size: int,
    leaf_range: tuple[int, int] | None,
    leaf_indices: Sequence[int] | None,
) -> DeviceDigest | None:
    """Compute the ``rfc6962-sha256`` digest of ``buffer`` on the device itself.

    The core asks one of three questions; at most one of ``leaf_range`` and ``leaf_indices``
    is not ``None``:

    * **the whole buffer** (both ``None``): return the Merkle root and every packed leaf hash
      (``SHA-256(0x00 || leaf)``, 32 bytes each, the last leaf possibly shorter), with
      ``first_leaf=0`` and ``leaf_indices=None``;
    * **a leaf range** ``(first, stop)``: return the packed hashes of leaves ``first`` to
      ``stop - 1`` (``root=None``, ``first_leaf=first``, ``leaf_indices=None``); the core uses
      ranges to localise a mismatch;
    * **a list of leaf indices** (a sampled check): a non-empty, strictly increasing sequence
      of valid leaf indices. Return the packed hashes of exactly those leaves, in that order
      (``32 * len(leaf_indices)`` bytes), with ``root=None``, ``first_leaf=0`` and
      ``leaf_indices`` set to the same indices (as a tuple). How they are computed is the
      plugin's choice (one launch over just those leaves, or the whole buffer when that is
      cheaper on the device); the answer is the same either way.

    An implementation may omit the ``leaf_indices`` parameter (pluggy passes an implementation
    only the arguments it names, so plugins written before it existed keep working). Such an
    implementation sees an index request as a **whole-buffer** request (``leaf_range`` is
    ``None``) and answers with the root and every leaf; the core accepts a whole-buffer answer
    (``leaf_indices=None``, a 32-byte root, every leaf) to an index request and takes the
    sampled leaves from it. Any other answer to an index request (indices other than those
    asked for, a leaf count that is neither) is a malformed answer.

    The core never rebuilds the tree on the host when the device did; it checks only the
    shape of the answer (a wrong shape is an error naming the plugin). Return ``None`` when
    this plugin cannot digest this backend's buffers at all: the core then reads the buffer
    back and hashes it on the host. Raise
    :class:`~vramcore.errors.DeviceDigestUnavailable` (or a subclass, such as a plugin's
    typed CUDA error) when it can but this time cannot (a compile or launch failure, no
    scratch memory): the core hashes on the host, emits an audited warning and still
    cross-checks. Any other exception is a typed, audited failure, never a silent pass.

    :param backend: the backend that owns ``buffer``.
    :param buffer: the allocation to digest.
    :param leaf_size: leaf size in bytes.
    :param leaf_range: ``None``, or ``(first, stop)`` leaf indices.
    :param leaf_indices: ``None``, or the sorted, distinct leaf indices of a sampled check.
    :return: a :class:`~vramcore.backend.DeviceDigest`, or ``None`` to defer.

    firstresult. Called on every seal and every verification.
    """
    raise NotImplementedError


# -------------------------------------------------------------------------
# Audit sinks
# -------------------------------------------------------------------------


@hookspec
def vramcore_audit_sinks(context: SinkContext) -> Sequence[AuditSink]:
    """Create the audit sinks for a starting manager.

    Every sink receives every event; the manager flushes and closes them when it closes.

    :param context: the worker id and device, and :meth:`~vramcore.audit.SinkContext.derive_key`
        for keys of the sink's own. It holds only this plugin's key, derived by the core from
        the plugin's identity (distribution and entry-point name): a sink never sees the
        worker token, anything that can sign a seal, or another plugin's keys. Each plugin is
        called on its own, with a context of its own.
    :return: the sinks this plugin provides (may be empty, e.g. when not configured).

    Not firstresult: all sinks are collected. Called once when a manager starts.
    """
    raise NotImplementedError


@hookspec
def vramcore_audit_witnesses(context: SinkContext) -> Sequence[AuditWitness]:
    """Create witnesses: places off the worker's disk where an audit log publishes its head.

    A tamper-evident log on one disk cannot prove its own completeness to someone who
    controls that disk. A log sink (the audit chain) hands each head it commits (log id,
    sequence, MAC of the last record, epoch, time, signature) to every witness once that
    record is durable; an auditor later checks that the log still reaches the heads the
    witnesses hold (``vramcore audit verify --anchor``), and the sink asks each witness for
    the newest head it can read back (:meth:`~vramcore.audit.AuditWitness.latest`) before it
    continues a log, refusing one that was cut back. A ``required`` witness that fails makes
    critical events fail closed.

    :param context: as for :func:`vramcore_audit_sinks`.
    :return: the witnesses this plugin provides (may be empty, e.g. when not configured).

    Not firstresult: all witnesses are collected. Called once when a manager starts, before
    the sinks; the manager gives them to every sink through
    :meth:`~vramcore.audit.AuditSink.attach_witnesses` and closes them after the sinks.
    """
    raise NotImplementedError


@hookspec
def vramcore_audit_failure(sink_name: str, event: AuditEvent, error: BaseException) -> None:
    """Be told that an audit sink failed to record an event.

    :param sink_name: the failing sink's name.
    :param event: the event it failed on.
    :param error: what it raised (may carry a path, never a secret from vramcore).
    :return: nothing (the return value is ignored).

    Not firstresult. Called after each sink failure, before the manager fails the operation
    (critical events) or goes on (others). Must not raise.
    """


# -------------------------------------------------------------------------
# Narration
# -------------------------------------------------------------------------


@hookspec(firstresult=True)
def vramcore_operation(op: Operation) -> object:
    """Run one manager step; wrap it to narrate it.

    The core's implementation (``trylast``) calls ``op.run()`` and returns its result.
    Plugins implement this hook with ``@hookimpl(wrapper=True)`` and ``yield`` to time, trace
    or log the step, reading ``op.name`` and ``op.attributes`` (which the step fills in with
    its results). A wrapper must re-raise what the step raised and must not change the result.

    :param op: the step (seal, verify, allocate, copy, digest, deallocate).
    :return: the step's result.

    firstresult. Called for every manager operation; nested steps call it again inside.
    """
    raise NotImplementedError


# -------------------------------------------------------------------------
# Configuration
# -------------------------------------------------------------------------


@hookspec
def vramcore_settings() -> Sequence[Setting]:
    """Declare the settings this plugin reads.

    Each :class:`vramcore.Setting` has a key in ``vramcore.toml`` and the environment variable
    derived from it (``audit_log`` -> ``VRAMCORE_AUDIT_LOG``). Declared settings may be set in a
    configuration file (a value there reaches the plugin as that variable), are listed with
    their source by ``vramcore config``, and a setting that ``activates`` a sink or a witness
    lets ``vramcore doctor`` say what turns it on. A key in a file that no plugin declares is
    an error.

    :return: the settings (may be empty); a key declared twice is a configuration error.

    Not firstresult: every plugin's settings are collected. Called by the CLI before a command
    runs and by ``vramcore config`` / ``vramcore doctor``.
    """
    raise NotImplementedError


# -------------------------------------------------------------------------
# Commands
# -------------------------------------------------------------------------


@hookspec
def vramcore_add_commands(commands: Commands) -> None:
    """Add subcommands to the ``vramcore`` CLI.

    :param commands: call ``commands.add(name, help=..., handler=...)`` or
        ``commands.group(name, help=...)`` (see :class:`vramcore.Commands`).
    :return: nothing (the return value is ignored).

    Not firstresult. Called once when the CLI builds its parser.
    """
