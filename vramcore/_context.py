"""Correlation ids: tie every event and span of one request together.

``with vramcore.correlate("req-42"): manager.verify_sealed(shard)`` makes every audit event
and narration :class:`~vramcore.hookspecs.Operation` produced inside the block carry
``correlation_id="req-42"``. Context variables follow threads started with
:func:`contextvars.copy_context` and asyncio tasks.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

__all__ = ["correlate", "current_correlation_id"]

_CORRELATION_ID: contextvars.ContextVar[str] = contextvars.ContextVar(
    "vramcore_correlation_id", default=""
)


def current_correlation_id() -> str:
    """The correlation id of the current context, or ``""``."""
    return _CORRELATION_ID.get()


@contextlib.contextmanager
def correlate(correlation_id: str) -> Iterator[str]:
    """Run the block with ``correlation_id`` attached to every event and operation."""
    from vramcore.validation import clean_text

    token = _CORRELATION_ID.set(clean_text(correlation_id, field="correlation_id", limit=128))
    try:
        yield correlation_id
    finally:
        _CORRELATION_ID.reset(token)
