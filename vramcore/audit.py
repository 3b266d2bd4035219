"""Audit sinks: where events go, and how the manager fans them out.

A plugin returns sinks from :func:`~vramcore.hookspecs.vramcore_audit_sinks`. The manager
builds its sinks once when it starts and delivers every event to every sink, and the caller
waits for each: an operation returns only once its events are recorded.

Writing a sink: subclass :class:`AuditSink`, override :meth:`~AuditSink.emit` (return only
when the event is as durable as you promise; raise if it is not), set
:attr:`~AuditSink.durable`, and return instances from ``vramcore_audit_sinks`` (decorated
with :data:`vramcore.hookimpl`). ``emit`` is always called from one delivery thread per sink,
in event order, in a copy of the caller's context (so a tracing sink sees the caller's current
span): it need not be thread-safe (nor need :meth:`~AuditSink.emit_nowait`, which the core
never runs at the same time as another call into the sink). It must answer within the
manager's sink timeout (:data:`DEFAULT_SINK_TIMEOUT`, 10 s): a sink that raises (anything,
``SystemExit`` included) or does not answer in time on a
:attr:`critical <vramcore.events.AuditEvent.critical>` event fails the operation with
:class:`~vramcore.errors.AuditError` (fail closed); on other events the failure is logged,
reported through
:func:`~vramcore.hookspecs.vramcore_audit_failure` and delivery goes on.

Audit modes (:data:`AUDIT_MODES`, the manager's ``audit=``): ``required`` (the default) needs a
durable sink to start and fails closed as above; ``best_effort`` delivers every event to every
sink too, but no sink can stop an operation: a failure on a critical event is logged and
reported like any other (for telemetry-only deployments, whose tracing sink is not durable);
``disabled`` collects no sink at all.

The caller waits for every event, critical or not, so an operation returns only once each
sink has its events (and a tracing sink adds them inside the operation's span). The price of
bounding that wait is one thread hand-off per event and sink: about 0.1 ms on the 2-core
development VM, against about 0.02 ms for a verification with no sink at all. A sink that can
record an event without waiting (a log that queues it in memory for a writer thread) spares
that hand-off for non-critical events by overriding :meth:`~AuditSink.emit_nowait`, which the
core then calls in the caller's thread while the sink's delivery thread is idle; critical
events always go through the delivery thread and its time limit.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from concurrent.futures import Future
from typing import Any, Literal, NoReturn, get_args

from vramcore.errors import AuditError, ConfigError, InvalidInput
from vramcore.events import AuditEvent
from vramcore.seal import SecretKey, WorkerToken

__all__ = [
    "AUDIT_MODES",
    "DEFAULT_SINK_TIMEOUT",
    "PLUGIN_KEY_INFO_PREFIX",
    "PLUGIN_MASTER_INFO",
    "PLUGIN_PURPOSE_INFO_PREFIX",
    "AuditMode",
    "AuditSink",
    "AuditTrail",
    "AuditWitness",
    "PluginKeys",
    "SinkContext",
    "SinkTimeout",
    "deliver",
]

log = logging.getLogger("vramcore.audit")

#: How a manager audits: ``required`` (a durable sink, fail closed), ``best_effort`` (every
#: sink, never fatal) or ``disabled`` (no sink).
AuditMode = Literal["required", "best_effort", "disabled"]
#: The audit modes, in the order of :data:`AuditMode`.
AUDIT_MODES: tuple[str, ...] = get_args(AuditMode)


#: HKDF ``info`` of the plugin master key, derived from the worker token. Plugin keys are
#: derived from this master key, never from the token, so no purpose a plugin names can ever
#: produce the seal key (HKDF is one-way). The master key stays in the core.
PLUGIN_MASTER_INFO = b"vramcore/v1/plugin-master-key"
#: HKDF ``info`` prefix of a plugin's own key: followed by the length and text of the
#: plugin's identity (``distribution:entry-point``).
PLUGIN_KEY_INFO_PREFIX = b"vramcore/v2/plugin-key/"
#: HKDF ``info`` prefix of each key a plugin derives from its own key
#: (:meth:`SinkContext.derive_key`).
PLUGIN_PURPOSE_INFO_PREFIX = b"vramcore/v2/plugin-purpose/"
_PURPOSE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


def _plugin_key(master: SecretKey, identity: str) -> SecretKey:
    raw = identity.encode("utf-8")
    return master.derive(PLUGIN_KEY_INFO_PREFIX + len(raw).to_bytes(4, "big") + raw)


class SinkContext:
    """What a sink or witness factory may know about the manager it serves: a capability.

    It holds the worker id, the device, the token's public fingerprint and one secret: the
    plugin's own key, derived by the core from a plugin master key (itself derived one way
    from the token) and the plugin's identity, its distribution and entry-point name
    (``HKDF(HKDF(token, PLUGIN_MASTER_INFO), PLUGIN_KEY_INFO_PREFIX ‖ len ‖ identity)``).
    There is no field to re-point: a context made for one plugin can derive that plugin's
    keys and no other's, whatever a plugin changes or reads on it, and :meth:`wipe` wipes
    only this context's copy. The manager wipes every plugin key when it closes.

    Made by the core for each plugin; an auditor or a test re-derives a plugin's keys offline
    with :meth:`from_token`.

    :param worker_id: the worker's public id.
    :param device: the device index the manager runs on.
    :param token_fingerprint: the worker token's public fingerprint.
    :param scope: the plugin's identity (``distribution:entry-point``).
    :param key: the plugin's own key (taken over), or ``None`` for a context without keys.
    """

    __slots__ = ("__key", "device", "scope", "token_fingerprint", "worker_id")

    def __init__(
        self,
        *,
        worker_id: str,
        device: int,
        token_fingerprint: str = "",
        scope: str = "",
        key: SecretKey | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.device = device
        self.token_fingerprint = token_fingerprint
        self.scope = scope
        self.__key = key

    @classmethod
    def from_token(
        cls, token: WorkerToken, *, worker_id: str, device: int, scope: str = ""
    ) -> SinkContext:
        """A context holding the key of the plugin whose identity is ``scope``.

        An auditor or a test re-derives a plugin's keys offline this way, with the worker's
        token and the plugin's identity
        (:func:`vramcore.plugins.plugin_identity`, e.g. ``"vramcore-audit-chain:audit_chain"``).
        """
        master = token.derive(PLUGIN_MASTER_INFO)
        try:
            key = _plugin_key(master, scope)
        finally:
            master.wipe()
        return cls(
            worker_id=worker_id,
            device=device,
            token_fingerprint=token.fingerprint,
            scope=scope,
            key=key,
        )

    def wipe(self) -> None:
        """Wipe this context's key; :meth:`derive_key` fails afterwards. Other plugins'
        contexts are untouched."""
        if self.__key is not None:
            self.__key.wipe()

    def derive_key(self, purpose: str, length: int = 32) -> SecretKey:
        """A key of the plugin's own for ``purpose``, derived (HKDF-SHA256) from its key.

        The HKDF ``info`` is :data:`PLUGIN_PURPOSE_INFO_PREFIX` followed by ``purpose``, so a
        key derived here is independent of the seal key, of every other purpose and of every
        other plugin's keys. Name the purpose after your plugin (``"audit_chain/state"``); the
        same purpose gives the same key for the same token and plugin, across restarts.

        :param purpose: 1-128 characters of ``[A-Za-z0-9._:/-]``.
        :param length: key length in bytes (16-64).
        :raises InvalidInput: a malformed purpose or length, or the key was wiped.
        :raises ConfigError: the context carries no key material (made without a token).
        """
        if not isinstance(purpose, str) or not _PURPOSE.fullmatch(purpose):
            raise InvalidInput(
                "a plugin key purpose must be 1-128 characters of [A-Za-z0-9._:/-], "
                "e.g. 'my_plugin/state'"
            )
        if isinstance(length, bool) or not isinstance(length, int) or not 16 <= length <= 64:
            raise InvalidInput("a plugin key length must be an integer from 16 to 64 bytes")
        if self.__key is None:
            raise ConfigError("this SinkContext carries no key material (no worker token)")
        return self.__key.derive(PLUGIN_PURPOSE_INFO_PREFIX + purpose.encode("ascii"), length)

    def __repr__(self) -> str:
        return (
            f"SinkContext(worker_id={self.worker_id!r}, device={self.device!r}, "
            f"token_fingerprint={self.token_fingerprint!r}, scope={self.scope!r})"
        )

    def __reduce__(self) -> NoReturn:
        raise TypeError("a SinkContext cannot be pickled")


class PluginKeys:
    """The core's plugin master key: it mints one :class:`SinkContext` per plugin.

    Kept by the manager, never handed to a plugin. :meth:`wipe` wipes the master key and
    every plugin key it gave out.
    """

    __slots__ = ("_device", "_fingerprint", "_issued", "_master", "_worker_id")

    def __init__(self, token: WorkerToken, *, worker_id: str, device: int) -> None:
        self._master = token.derive(PLUGIN_MASTER_INFO)
        self._fingerprint = token.fingerprint
        self._worker_id = worker_id
        self._device = device
        self._issued: list[SecretKey] = []

    def context_for(self, identity: str) -> SinkContext:
        """A fresh context holding only the key of the plugin ``identity``."""
        key = _plugin_key(self._master, identity)
        self._issued.append(key)
        return SinkContext(
            worker_id=self._worker_id,
            device=self._device,
            token_fingerprint=self._fingerprint,
            scope=identity,
            key=key,
        )

    def wipe(self) -> None:
        """Wipe the master key and every plugin key made from it."""
        self._master.wipe()
        for key in self._issued:
            key.wipe()
        self._issued.clear()

    def __repr__(self) -> str:
        return f"<PluginKeys worker={self._worker_id} issued={len(self._issued)}>"


class AuditSink:
    """Base class of an audit sink. Subclasses override :meth:`emit` at least.

    :attr name: shown in errors and in ``vramcore plugins``.
    :attr durable: whether the sink keeps a lasting record (a log file, a remote store).
        ``audit="required"`` needs at least one durable sink; narration-only sinks (traces,
        logs) set this to ``False``.
    """

    name: str = "sink"
    durable: bool = True

    def emit(self, event: AuditEvent) -> None:
        """Record ``event``; return only when it is as durable as the sink promises."""
        raise NotImplementedError

    def emit_nowait(self, event: AuditEvent) -> bool:
        """Record a non-critical ``event`` now if that needs no waiting; return whether it did.

        An optional fast path that spares the delivery thread's hand-off (tens of µs per
        event). The core calls it, for non-critical events only, from the *caller's* thread,
        never at the same time as any other call into this sink and only while the sink's
        delivery thread has nothing queued, so the order of events and the one-call-at-a-time
        promise hold as for :meth:`emit`. It must not block: no I/O, no waiting on anything
        but a lock held for microseconds (it is not bounded by the sink timeout: a fast path
        that waits on its storage hangs the caller, which ``AuditSinkContract``'s hang test
        shows). Return
        ``True`` only when the event is recorded exactly as :meth:`emit` would have recorded
        it, durability included; return ``False`` having recorded *nothing* when that would
        take waiting, and the core then calls :meth:`emit` on the delivery thread. Raise as
        :meth:`emit` raises. The default records nothing and returns ``False``.
        """
        return False

    def flush(self) -> None:
        """Make everything emitted so far durable."""

    def close(self) -> None:
        """Flush and release resources; called once, when the manager closes."""

    def report(self) -> Mapping[str, Any] | None:
        """After :meth:`close`: a short summary for the CLI (records written, verified...)."""
        return None

    def attach_witnesses(self, witnesses: Sequence[AuditWitness]) -> None:
        """Receive the manager's witnesses (before the first event); a log sink publishes its
        head to them. The default ignores them."""


class AuditWitness:
    """Base class of a witness: a place off the worker's disk that keeps an audit log's heads.

    A log on one disk cannot prove its own completeness to whoever controls that disk; a
    witness keeps the log's heads where that person cannot rewrite them (another mount, a
    remote store, exported telemetry). A log sink calls :meth:`publish` with each head it
    commits: a JSON-ready mapping signed by the log (the audit chain's heads carry the log id,
    the sequence number, MAC and epoch of the last record, a time, a reason and an Ed25519
    signature; see its FORMAT.md). Heads arrive only once the record they name is durable,
    in sequence order, possibly from the sink's background thread: ``publish`` must be
    thread-safe. Later, an auditor checks the log against the heads the witness kept, and the
    sink asks :meth:`latest` on start to refuse a log that was cut back.

    :attr name: shown in errors and reports.
    :attr required: when ``True`` a failed publish of a head that covers a critical event
        fails that operation (fail closed), as a failing sink does, and a witness whose
        :meth:`latest` raises stops the log sink from starting.
    """

    name: str = "witness"
    required: bool = False

    def publish(self, head: Mapping[str, Any]) -> None:
        """Keep ``head``; return only when it is as durable as the witness promises.

        :raises Exception: any failure; the sink reports it (and fails closed if required).
        """
        raise NotImplementedError

    def latest(self, log_id: str) -> Mapping[str, Any] | None:
        """The newest head this witness holds for ``log_id``, if it can read it back.

        The log sink checks the head's signature itself; return what you hold. The default
        (``None``) is for witnesses that cannot read back (the auditor still can).
        """
        return None

    def close(self) -> None:
        """Release resources; called once, after the sinks are closed."""


#: Seconds a sink may take to record one event (or to close) before it counts as failed.
DEFAULT_SINK_TIMEOUT = 10.0


class _Lane:
    """One sink's delivery thread: its events in order, each within a time limit.

    A sink that blocks (a hung NFS mount, a full pipe) must not hang the operation that
    audits: the caller waits at most ``timeout`` seconds, then the event counts as not
    recorded (fail closed for critical events). Later events wait at most one more time limit
    for that call to end, then fail rather than queue behind it. The thread is a daemon so a
    stuck sink cannot keep the process from exiting. Events run in a copy of the caller's
    context, so a tracing sink still sees the caller's span.
    """

    def __init__(self, sink: AuditSink, timeout: float) -> None:
        self.sink = sink
        self.timeout = timeout
        self._queue: queue.SimpleQueue[
            tuple[Callable[..., Any], tuple[Any, ...], Future[Any]] | None
        ] = queue.SimpleQueue()
        self._stuck: Future[Any] | None = None
        # Held around every call into the sink, on the lane's thread or inline in a caller's
        # (emit_nowait), so the sink never runs two calls at once.
        self._busy = threading.Lock()
        self._queued = 0  # calls put on the queue and not finished yet
        self._count = threading.Lock()  # guards changes of _queued
        overridden = type(sink).emit_nowait is not AuditSink.emit_nowait
        self._nowait: Callable[[AuditEvent], bool] | None = sink.emit_nowait if overridden else None
        self._thread = threading.Thread(
            target=self._run, name=f"vramcore-sink-{sink.name}"[:60], daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, args, fut = item
            if fut.set_running_or_notify_cancel():
                with self._busy:
                    try:
                        result = fn(*args)
                    except BaseException as exc:  # reported to the caller, whatever it is
                        error: BaseException | None = exc
                    else:
                        error = None
                with self._count:
                    self._queued -= 1
                if error is None:
                    fut.set_result(result)
                else:
                    fut.set_exception(error)
                    del error
            else:
                with self._count:
                    self._queued -= 1

    def emit(self, event: AuditEvent) -> None:
        """Deliver ``event``: inline through the sink's :meth:`AuditSink.emit_nowait` when it
        offers one, the event is not critical and the lane is idle; else on the lane (see
        :meth:`call`). Raises what the sink raised, or :class:`SinkTimeout`."""
        nowait = self._nowait
        if (
            nowait is not None
            and not event.critical
            and self._stuck is None
            and self._queued == 0
            and self._busy.acquire(blocking=False)
        ):
            try:
                # Nothing queued ahead of this event, and the lane cannot start a call
                # while _busy is held: the sink sees events in order, one call at a time.
                done = self._queued == 0 and contextvars.copy_context().run(nowait, event)
            finally:
                self._busy.release()
            if done:
                return
        self.call(self.sink.emit, event)

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the lane; raise what it raised, or :class:`SinkTimeout`."""
        if self._stuck is not None:
            futures.wait([self._stuck], timeout=self.timeout)
            if not self._stuck.done():
                raise SinkTimeout(
                    f"audit sink {self.sink.name} is still blocked on an earlier call"
                )
            self._stuck = None
        fut: Future[Any] = Future()
        with self._count:
            self._queued += 1
        self._queue.put((contextvars.copy_context().run, (fn, *args), fut))
        try:
            fut.result(timeout=self.timeout)
        except TimeoutError:
            self._stuck = fut
            raise SinkTimeout(
                f"audit sink {self.sink.name} did not answer within {self.timeout:g} s"
            ) from None

    def stop(self) -> None:
        """Let the thread end after what is queued (it is a daemon if it is stuck)."""
        self._queue.put(None)


class SinkTimeout(AuditError):
    """An audit sink did not record an event (or close) within its time limit."""


def deliver(
    sinks: Sequence[AuditSink],
    event: AuditEvent,
    on_failure: Any = None,
    *,
    lanes: Mapping[int, _Lane] | None = None,
    fail_closed: bool = True,
) -> list[tuple[AuditSink, BaseException]]:
    """Give ``event`` to every sink; return the failures.

    Every sink is tried even when an earlier one fails. For a critical event any failure
    (an exception of any kind, or no answer within the sink's time limit) raises
    :class:`AuditError` after all sinks were tried, unless ``fail_closed`` is false (the
    ``best_effort`` mode), which logs it instead. ``on_failure(sink, event, exc)`` is called
    for each failure (the manager reports it through a hook). ``lanes`` (the manager's, by
    ``id(sink)``) bound each sink's time; without them sinks are called inline.
    """
    failures: list[tuple[AuditSink, BaseException]] = []
    for sink in sinks:
        lane = lanes.get(id(sink)) if lanes is not None else None
        try:
            if lane is not None:
                lane.emit(event)
            else:
                sink.emit(event)
        except BaseException as exc:
            if lane is None and not isinstance(exc, Exception):
                raise  # inline: a real interrupt of this thread, not the sink's answer
            failures.append((sink, exc))
            log.error(
                "audit sink %s failed on %s: %s", sink.name, event.event_type, type(exc).__name__
            )
            if on_failure is not None:
                on_failure(sink, event, exc)
    if failures and event.critical:
        names = ", ".join(sorted({s.name for s, _ in failures}))
        if not fail_closed:
            log.warning(
                "audit sink(s) %s could not record critical event %s; audit mode best_effort: "
                "the operation goes on",
                names,
                event.event_type,
            )
            return failures
        raise AuditError(
            f"audit sink(s) {names} could not record critical event {event.event_type}; "
            "the operation was refused (fail closed). Check the sink's storage and restart."
        ) from failures[0][1]
    return failures


class AuditTrail:
    """The audit sinks of one manager: collected from plugins, fed every event, closed once.

    Each sink gets a delivery lane (a thread of its own): its ``emit`` is called from that
    one thread, in event order, and the caller waits at most ``sink_timeout`` seconds.

    :param plugin_manager: the plugins (each is asked for its sinks with a context of its own).
    :param sink_timeout: seconds a sink may take per event (and to close).
    :param mode: one of :data:`AUDIT_MODES` (see the module docstring).
    :raises InvalidInput: an unknown mode.
    """

    def __init__(
        self,
        plugin_manager: Any,
        sink_timeout: float = DEFAULT_SINK_TIMEOUT,
        *,
        mode: AuditMode = "required",
    ) -> None:
        if not isinstance(mode, str) or mode not in AUDIT_MODES:
            raise InvalidInput(f"audit must be one of {', '.join(AUDIT_MODES)}, got {mode!r:.40}")
        self.mode: AuditMode = mode
        self._pm = plugin_manager
        self._hook = plugin_manager.hook
        self._sinks: list[AuditSink] = []
        self._witnesses: list[AuditWitness] = []
        self._lanes: dict[int, _Lane] = {}
        self._timeout = sink_timeout

    @property
    def sinks(self) -> tuple[AuditSink, ...]:
        """The sinks events go to."""
        return tuple(self._sinks)

    @property
    def witnesses(self) -> tuple[AuditWitness, ...]:
        """The witnesses the sinks publish to."""
        return tuple(self._witnesses)

    @property
    def enabled(self) -> bool:
        """Whether sinks are collected at all (every mode but ``disabled``)."""
        return self.mode != "disabled"

    def start(self, keys: PluginKeys) -> None:
        """Collect the sinks and witnesses as the mode asks (none when ``disabled``).

        :param keys: the core's plugin keys: each plugin gets a context holding its own key.
        :raises AuditError: ``required`` and no durable sink (see :meth:`require_durable`).
        :raises ConfigError: see :meth:`collect`.
        """
        if not self.enabled:
            return
        self.collect(keys)
        if self.mode == "required":
            self.require_durable()

    def collect(self, keys: PluginKeys) -> None:
        """Ask every plugin for its witnesses and sinks, and give the sinks the witnesses.

        Each plugin is called on its own, with a context of its own from ``keys`` holding only
        the key of its identity (distribution and entry-point name).

        :raises ConfigError: a plugin returned something that is not a sink or a witness.
        """
        for answer in self._call_each("vramcore_audit_witnesses", keys):
            self._witnesses.extend(_checked(answer, AuditWitness, "vramcore_audit_witnesses"))
        for answer in self._call_each("vramcore_audit_sinks", keys):
            self._sinks.extend(_checked(answer, AuditSink, "vramcore_audit_sinks"))
        for sink in self._sinks:
            sink.attach_witnesses(self.witnesses)
            self._lanes[id(sink)] = _Lane(sink, self._timeout)

    def _call_each(self, hook_name: str, keys: PluginKeys) -> list[object]:
        impls = getattr(self._hook, hook_name).get_hookimpls()
        identity = getattr(self._pm, "identity", lambda name: f":{name}")
        answers: list[object] = []
        for impl in reversed(impls):  # pluggy's own calling order
            others = [i.plugin for i in impls if i is not impl]
            caller = self._pm.subset_hook_caller(hook_name, remove_plugins=others)
            answers += caller(context=keys.context_for(identity(impl.plugin_name)))
        return answers

    def require_durable(self) -> None:
        """Raise unless at least one sink keeps a lasting record.

        :raises AuditError: (``configuration=True``) no durable sink was collected.
        """
        if any(sink.durable for sink in self._sinks):
            return
        names = ", ".join(sink.name for sink in self._sinks) or "none"
        raise AuditError(
            f"no durable audit sink is configured (sinks: {names}) and audit='required': "
            "install the audit chain plugin and set VRAMCORE_AUDIT_LOG=/path/to/dir, or pass "
            "audit='best_effort' to run with the sinks there are (telemetry only, never "
            "fatal), or audit='disabled' to run without an audit trail on purpose",
            configuration=True,
        )

    def emit(self, event: AuditEvent) -> None:
        """Deliver ``event`` to every sink (see :func:`deliver`); failures are reported."""
        deliver(
            self._sinks,
            event,
            on_failure=self._report_failure,
            lanes=self._lanes,
            fail_closed=self.mode == "required",
        )

    def _report_failure(self, sink: AuditSink, event: AuditEvent, exc: BaseException) -> None:
        try:
            self._hook.vramcore_audit_failure(sink_name=sink.name, event=event, error=exc)
        except Exception:  # a reporting plugin must not mask the original failure
            log.exception("vramcore_audit_failure hook raised")

    def close(self) -> list[BaseException]:
        """Close every sink (each flushes first), then every witness; return what failed."""
        errors: list[BaseException] = []
        parts: list[AuditSink | AuditWitness] = [*self._sinks, *self._witnesses]
        for part in parts:
            lane = self._lanes.pop(id(part), None)
            try:
                if lane is not None:
                    lane.call(part.close)
                    lane.stop()
                else:
                    part.close()
            except BaseException as exc:
                if lane is None and not isinstance(exc, Exception):
                    raise
                log.error("audit %s failed to close: %s", part.name, type(exc).__name__)
                errors.append(exc)
        return errors


def _checked(items: object, kind: type, hook: str) -> list[Any]:
    """``items`` as a list of ``kind`` instances, or a :class:`ConfigError` naming the hook."""
    if not isinstance(items, list | tuple):
        raise ConfigError(f"a {hook} implementation returned {type(items).__name__}, not a list")
    for item in items:
        if not isinstance(item, kind):
            raise ConfigError(
                f"a {hook} implementation returned {type(item).__name__}, not an {kind.__name__}"
            )
    return list(items)
