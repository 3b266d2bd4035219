"""Loading a file into a device buffer: streamed, hashed on the way, bounded in host memory.

The file is read chunk by chunk into two reusable staging buffers; each chunk is copied to the
device and fed to a running SHA-256 on a worker thread while the next chunk is read, so the
whole-file hash (what model hubs publish) costs little extra time and host memory never
exceeds two chunks, whatever the file size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from vramcore.backend import AllocatorBackend, DeviceBuffer
from vramcore.digest import StagingPool, _pool
from vramcore.errors import IntegrityViolation
from vramcore.validation import check_sha256_hex

__all__ = ["check_expected_sha256", "device_reader", "stream_file"]


def stream_file(
    backend: AllocatorBackend,
    buf: DeviceBuffer,
    path: Path,
    nbytes: int,
    staging: StagingPool,
    progress: Callable[[int, int], None] | None = None,
) -> str:
    """Copy ``nbytes`` of ``path`` into ``buf``; return the file's SHA-256 (hex).

    :raises IntegrityViolation: the file shrank or grew while it was read.
    """
    chunk = staging.chunk_bytes
    sha = hashlib.sha256()
    pending: Future[None] | None = None
    offset = 0
    chunks = 0
    with staging.borrow(2) as buffers, path.open("rb", buffering=0) as fh:
        try:
            while offset < nbytes:
                view = memoryview(buffers[chunks % 2])
                chunks += 1
                n = fh.readinto(view[: min(chunk, nbytes - offset)])
                if not n:
                    raise IntegrityViolation(
                        f"{path} shrank while it was loaded ({offset} of {nbytes} bytes read)"
                    )
                backend.copy_in(buf, offset, view[:n])
                if pending is not None:
                    pending.result()  # the hash of the previous chunk, in order
                pending = _pool().submit(sha.update, view[:n])
                offset += n
                if progress is not None:
                    progress(offset, nbytes)
            if fh.read(1):
                raise IntegrityViolation(f"{path} grew while it was loaded")
        finally:
            # The staging buffers go back to the pool: no hash may still be reading them.
            if pending is not None:
                pending.result()
    return sha.hexdigest()


def device_reader(backend: AllocatorBackend, buf: DeviceBuffer) -> Callable[[int], bytes]:
    """A sequential ``read(n) -> bytes`` over ``buf``, from its start, copying from the device.

    Used to parse a safetensors header from the bytes actually in VRAM, so the tensor map
    describes what was sealed even if the file changed while it was loaded.
    """
    position = 0

    def read(n: int) -> bytes:
        nonlocal position
        n = max(0, min(n, buf.nbytes - position))
        out = bytearray(n)
        if n:
            backend.read_into(buf, position, memoryview(out))
        position += n
        return bytes(out)

    return read


def check_expected_sha256(actual: str, expected: str) -> str:
    """Return ``actual`` if it equals ``expected`` (any case), else raise.

    :raises IntegrityViolation: the hashes differ; the message gives both.
    """
    expected = check_sha256_hex(expected)
    if actual != expected:
        raise IntegrityViolation(
            f"SHA-256 mismatch: expected {expected}, the bytes have {actual}; "
            "the shard was not sealed"
        )
    return actual
