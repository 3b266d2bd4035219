"""What a manager does once, when it starts: choose the backend, probe it, start the audit
sinks, check the VRAM-only policy, get the seal key (:mod:`vramcore._keyproviders`) and put
the flows' working parts together (:class:`Startup`).

Each answer a plugin gives here is checked before it is used; a wrong one is a
:class:`~vramcore.errors.ConfigError` naming the plugins that implement the hook.
"""

from __future__ import annotations

import logging
from typing import Any

from vramcore._core import Core, enforce
from vramcore._digests import DigestSource
from vramcore._emitter import Emitter
from vramcore._hookutil import implementers
from vramcore._keyproviders import seal_key
from vramcore._residency import Residency
from vramcore.audit import AuditTrail, PluginKeys
from vramcore.backend import AllocatorBackend, DeviceInfo
from vramcore.errors import ConfigError, InvalidInput
from vramcore.plugins import select_backend
from vramcore.policy import VramPolicy, host_memory_findings
from vramcore.seal import SecretKey, WorkerToken
from vramcore.validation import check_device_index

__all__ = ["Startup", "make_backend", "probe"]

log = logging.getLogger("vramcore")


def make_backend(pm: Any, allocator: str | AllocatorBackend | None) -> AllocatorBackend:
    """The backend ``allocator`` names (or is), else the selection's choice.

    :raises InvalidInput: ``allocator`` is neither a name nor a backend.
    :raises BackendUnavailable: no such backend, or it cannot run here.
    :raises ConfigError: the plugin's factory built something that is not a backend.
    """
    if isinstance(allocator, AllocatorBackend):
        return allocator
    if allocator is not None and not isinstance(allocator, str):
        raise InvalidInput("allocator must be a backend name or an AllocatorBackend")
    backend = select_backend(pm, allocator).factory()
    if not isinstance(backend, AllocatorBackend):
        raise ConfigError(
            f"the allocator plugin ({implementers(pm.hook.vramcore_allocator_backends)}) "
            f"built a {type(backend).__name__}, not an AllocatorBackend"
        )
    return backend


def probe(hook: Any, backend: AllocatorBackend, device: int) -> tuple[int, DeviceInfo]:
    """The checked device index and its probe record.

    :raises InvalidInput: there is no such device.
    :raises ConfigError: the probe answered with something other than ``DeviceInfo`` records.
    """
    devices = hook.vramcore_probe_devices(backend=backend)
    if not isinstance(devices, list | tuple) or not all(isinstance(d, DeviceInfo) for d in devices):
        raise ConfigError(
            f"the device probe ({implementers(hook.vramcore_probe_devices)}) returned "
            f"{type(devices).__name__}, not a list of DeviceInfo"
        )
    index = check_device_index(device, len(devices))
    return index, devices[index]


class Startup:
    """One manager's start on one backend; :meth:`run` returns the flows' :class:`Core`.

    The secrets it makes (the plugin keys, the seal key) stay on this object, so the
    manager wipes them on close, and after a start that failed half-way.
    """

    def __init__(
        self,
        pm: Any,
        audit: AuditTrail,
        token: WorkerToken,
        *,
        worker_id: str,
        policy: VramPolicy,
        key_provider: str | None,
    ) -> None:
        self._pm = pm
        self._audit = audit
        self._token = token
        self._worker_id = worker_id
        self._policy = policy
        self._key_provider = key_provider
        self.plugin_keys: PluginKeys | None = None
        self.key: SecretKey | None = None

    def run(
        self,
        backend: AllocatorBackend,
        device: int,
        *,
        leaf_size: int,
        staging: Any,
        workers: int,
        residency: Residency,
    ) -> Core:
        """Probe ``device``, start the sinks, enforce the policy, get the seal key.

        :raises PolicyViolation: the device or backend breaks the policy (audited first).
        """
        hook = self._pm.hook
        index, info = probe(hook, backend, device)
        if self._audit.enabled:
            self.plugin_keys = PluginKeys(self._token, worker_id=self._worker_id, device=index)
            self._audit.start(self.plugin_keys)
        emitter = Emitter(
            self._audit, worker_id=self._worker_id, device=index, backend=backend.name
        )
        enforce(emitter, self._policy.check_device(info))
        enforce(emitter, host_memory_findings(backend, self._policy))
        self.key = seal_key(self._pm, self._token, self._worker_id, self._key_provider)
        log.info(
            "vramcore manager started: backend=%s GPU %d (%s), worker=%s, token %s, %d sink(s)",
            *(backend.name, index, info.name, self._worker_id, self._token.fingerprint),
            len(self._audit.sinks),
        )
        digests = DigestSource(hook, backend, leaf_size, staging=staging, workers=workers)
        return Core(
            hook=hook,
            backend=backend,
            device_info=info,
            residency=residency,
            emitter=emitter,
            digests=digests,
            policy=self._policy,
            key=self.key,
        )
