"""Thinning of successful verifications: one record per shard per interval, carrying a count.

A worker that verifies each shard before every request writes one ``seal.verified`` record per
request (about 480 bytes; at 100 requests/s about 4 GB a day). With thinning on
(``VRAMCORE_AUDIT_THIN_VERIFIED_SECONDS``), a successful verification of a shard is written
only when the previous record of that shard is at least the interval old; the ones in between
are counted, and the next record written for that shard carries the count as ``thinned`` (how
many successful verifications of this shard since its previous record were not written). Any
other event of the shard (a failed verification, a seal, a deallocation) and the closing of the
log first write the pending count as an ``audit.thinned`` record, so the count always lands
before what follows it. Nothing but a successful verification is ever thinned: failures,
policy violations and seals are always written, one record each.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import attrs

from vramcore.events import AuditEvent
from vramcore_audit_chain._format import canonical_json, utc_now_text

__all__ = ["THINNABLE", "THINNED_EVENT", "Thinning"]

#: The only event type that is ever thinned.
THINNABLE = "seal.verified"
#: ``event_type`` of the record that carries a pending count on its own.
THINNED_EVENT = "audit.thinned"


@attrs.define
class _Shard:
    written_at: float
    pending: int = 0
    first_pending: str = ""
    last_pending: str = ""

    def clear(self) -> None:
        self.pending = 0
        self.first_pending = self.last_pending = ""


class Thinning:
    """Decides, event by event, what the chain writes (one object per log).

    :param interval: seconds between two records of one shard's successful verifications.
    :param clock: monotonic seconds (tests pass their own).
    """

    def __init__(self, interval: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._shards: dict[tuple[str, int], _Shard] = {}
        #: successful verifications not written so far (over the log's life in this process).
        self.thinned = 0

    def drop(self, event: AuditEvent) -> bool:
        """Count ``event`` as thinned, if it is a successful verification of a shard whose
        last record is younger than the interval; return whether it did (else nothing
        changed)."""
        if event.event_type != THINNABLE or event.critical:
            return False
        shard_id = getattr(event, "shard_id", None)
        if not isinstance(shard_id, str):
            return False
        state = self._shards.get((shard_id, int(getattr(event, "device", -1))))
        if state is None or self._clock() - state.written_at >= self.interval:
            return False
        state.pending += 1
        self.thinned += 1
        stamp = event.timestamp.isoformat(timespec="microseconds")
        state.first_pending = state.first_pending or stamp
        state.last_pending = stamp
        return True

    def records(self, event: AuditEvent, encoded: str) -> Iterator[str]:
        """The records (canonical JSON) to write for ``event``, whose JSON is ``encoded``:
        none when it is thinned (see :meth:`drop`); a pending count first when one is due."""
        if self.drop(event):
            return
        shard_id = getattr(event, "shard_id", None)
        if not isinstance(shard_id, str):
            yield encoded
            return
        key = (shard_id, int(getattr(event, "device", -1)))
        now = self._clock()
        state = self._shards.get(key)
        if event.event_type == THINNABLE and not event.critical:
            if state is not None and state.pending:
                data = json.loads(encoded)
                data["thinned"] = state.pending
                encoded = canonical_json(data)
            self._shards[key] = _Shard(written_at=now)
            yield encoded
            return
        if state is not None:
            if state.pending:
                yield self._summary(key, state, event.worker_id)
            if event.event_type == "vram.deallocated":
                del self._shards[key]
            else:
                state.clear()
        yield encoded

    def pending(self, worker_id: str) -> Iterator[str]:
        """Records for every count not yet written (when the log closes)."""
        for key, state in list(self._shards.items()):
            if state.pending:
                yield self._summary(key, state, worker_id)
                state.clear()

    @staticmethod
    def _summary(key: tuple[str, int], state: _Shard, worker_id: str) -> str:
        return canonical_json(
            {
                "event_type": THINNED_EVENT,
                "thinned_event_type": THINNABLE,
                "shard_id": key[0],
                "device": key[1],
                "count": state.pending,
                "first": state.first_pending,
                "last": state.last_pending,
                "timestamp": utc_now_text(),
                "worker_id": worker_id,
                "severity": "info",
            }
        )
