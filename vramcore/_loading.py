"""What is being sealed, and how its bytes get into a device buffer.

A source (:class:`MemorySource`, :class:`FileSource`) knows its size and tensor map before
anything is allocated, then :meth:`~Source.load` copies its bytes into a device buffer, one
copy chunk at a time. On the way, each byte is read once: the Merkle leaves the digest source
asked for (every leaf when the host computes the digest, a sample of every copy chunk to
cross-check a device digest; see :class:`vramcore._digests.StagedLeaves`) are hashed from the
very bytes handed to the device, and the whole-file SHA-256 is computed only when asked for,
on a thread of its own, concurrently with the copy.

The copy contract (see :mod:`vramcore.backend`) is kept here: a staging buffer is reused, and
the caller's ``data`` released, only after the copy's completion handle, the leaf hashing and
the file hashing of that buffer have all finished.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import hashlib
import itertools
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, Protocol

import attrs

from vramcore.backend import AllocatorBackend, CopyHandle, DeviceBuffer
from vramcore.errors import AllocationFailed, ConfigError, IntegrityViolation, InvalidInput
from vramcore.safetensors import read_header
from vramcore.shard import TensorMap
from vramcore.validation import check_sha256_hex, check_size, safe_repr

__all__ = [
    "DEFAULT_MAX_READERS",
    "MAX_READERS",
    "FileLoad",
    "FileSource",
    "MemorySource",
    "Progress",
    "Source",
    "StagingFactory",
    "StagingPool",
    "Timeline",
    "as_bytes_view",
    "check_expected_sha256",
    "check_readers",
    "default_readers",
    "staging_for",
]

#: ``progress(bytes_loaded, total_bytes)``, called after each chunk of a file.
Progress = Callable[[int, int], None]
#: Most reader threads of one file load (each holds a staging buffer of ``chunk_bytes``).
MAX_READERS = 64
#: Most reader threads by default (:func:`default_readers`): eight 8 MiB staging buffers.
DEFAULT_MAX_READERS = 8
#: A transparent huge page (x86-64); smaller staging buffers stay plain.
_HUGE_PAGE = 2 << 20
#: Lends two staging buffers for the duration of a ``with`` block.
StagingFactory = Callable[[], contextlib.AbstractContextManager[list[memoryview]]]


class StagedHasher(Protocol):
    """Hashes leaves of the bytes as they are staged (:class:`vramcore._digests.StagedLeaves`)."""

    def feed(self, offset: int, chunk: memoryview) -> Callable[[], None]:
        """Hash what it wants of one copy chunk; the returned waiter says when it is done."""
        ...

    def hash_here(self, offset: int, chunk: memoryview) -> None:
        """Hash what it wants of one copy chunk on the calling thread."""
        ...


class _Pipeline:
    """The in-flight work on one staging buffer (or one slice of the caller's data)."""

    def __init__(self) -> None:
        self.handles: list[CopyHandle] = []
        self.waiters: list[Callable[[], None]] = []

    def drain(self) -> None:
        """Wait for every copy and hash still reading this buffer; raise the first error."""
        errors: list[BaseException] = []
        for wait in [*(h.wait for h in self.handles), *self.waiters]:
            try:
                wait()
            except BaseException as exc:  # every reader must finish before the memory is reused
                errors.append(exc)
        self.handles.clear()
        self.waiters.clear()
        if errors:
            raise errors[0]


def _copy(
    backend: AllocatorBackend, buf: DeviceBuffer, offset: int, data: memoryview, pipe: _Pipeline
) -> None:
    handle = backend.copy_in(buf, offset, data)
    if handle is None:
        return
    if not callable(getattr(handle, "wait", None)):
        raise AllocationFailed(
            f"backend {backend.name} returned {type(handle).__name__} from copy_in, not a "
            "CopyHandle or None; the seal was refused"
        )
    pipe.handles.append(handle)


class _FileHash:
    """A SHA-256 fed in order on a thread of its own, so it overlaps the copy and the leaves."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="vramcore-sha256")

    def feed(self, data: memoryview) -> Callable[[], None]:
        fut: Future[None] = self._thread.submit(self._sha.update, data)
        return fut.result

    def hexdigest(self) -> str:
        self._thread.shutdown(wait=True)
        return self._sha.hexdigest()

    def close(self) -> None:
        self._thread.shutdown(wait=True)


class Source(abc.ABC):
    """Bytes to seal: their size, tensor map and origin, known before anything is allocated.

    :attr nbytes: the size in bytes.
    :attr tensors: the safetensors tensor map (empty for other data).
    :attr kind: ``"memory"`` or ``"file"``, for narration.
    :attr expected_sha256: the SHA-256 the bytes must have, or ``None``.
    :attr want_sha256: whether the whole-byte SHA-256 is computed (asked for, or expected).
    """

    nbytes: int
    tensors: TensorMap | tuple[()] = ()
    kind: str = "memory"
    expected_sha256: str | None = None
    want_sha256: bool = False

    @abc.abstractmethod
    def load(
        self,
        backend: AllocatorBackend,
        buf: DeviceBuffer,
        *,
        staging: StagingFactory,
        staged: StagedHasher,
    ) -> str | None:
        """Copy every byte into ``buf``, feeding each copy chunk to ``staged`` first.

        Returns only when no copy still reads host memory of this call.
        :return: the bytes' SHA-256 (hex) when it was computed, else ``None``.
        :raises IntegrityViolation: the bytes are not what was promised.
        """

    def _finish(self, file_hash: _FileHash | None) -> str | None:
        digest = file_hash.hexdigest() if file_hash is not None else None
        if self.expected_sha256 is not None and digest is not None:
            check_expected_sha256(digest, self.expected_sha256)
        return digest


def as_bytes_view(data: object) -> memoryview:
    """``data`` as a flat byte view, without a copy.

    :raises InvalidInput: ``data`` is not a C-contiguous buffer.
    """
    try:
        return memoryview(data).cast("B")  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidInput(
            "data must be bytes or a C-contiguous buffer (bytes, bytearray, memoryview, "
            f"numpy array), got {type(data).__name__}"
        ) from None


@attrs.define
class MemorySource(Source):
    """Bytes already in host memory; they must not change until the seal returns."""

    view: memoryview
    chunk_bytes: int
    expected_sha256: str | None = None
    want_sha256: bool = False
    nbytes: int = attrs.field(init=False)
    kind: str = attrs.field(init=False, default="memory")

    def __attrs_post_init__(self) -> None:
        self.nbytes = check_size(self.view.nbytes, field="data size")
        if self.expected_sha256 is not None:
            self.expected_sha256 = check_sha256_hex(self.expected_sha256)
            self.want_sha256 = True

    def load(
        self,
        backend: AllocatorBackend,
        buf: DeviceBuffer,
        *,
        staging: StagingFactory,
        staged: StagedHasher,
    ) -> str | None:
        """Copy the bytes in chunks; hash leaves and the SHA-256 straight from them meanwhile."""
        pipe = _Pipeline()
        file_hash = _FileHash() if self.want_sha256 else None
        try:
            with _draining(pipe):  # the caller's data is theirs again only when nothing reads it
                # Hashing threads start first; they release the GIL while the copies run.
                if file_hash is not None:
                    pipe.waiters.append(file_hash.feed(self.view))
                for offset in range(0, self.nbytes, self.chunk_bytes):
                    view = self.view[offset : offset + self.chunk_bytes]
                    pipe.waiters.append(staged.feed(offset, view))
                    _copy(backend, buf, offset, view, pipe)
        finally:
            if file_hash is not None:
                file_hash.close()
        return self._finish(file_hash)


@attrs.define
class FileSource(Source):
    """A regular file, streamed through a ring of staging buffers, sealed byte for byte.

    The header of a ``.safetensors`` file is checked and its tensor map read before loading;
    the same header bytes must then be found in VRAM (one comparison, not a second parse).
    ``readers`` threads read the file (default :func:`default_readers`); after a load,
    :attr:`timeline` says where its time went.
    """

    path: Path
    chunk_bytes: int
    expected_sha256: str | None = None
    want_sha256: bool = False
    progress: Progress | None = None
    readers: int = attrs.field(factory=lambda: default_readers())
    nbytes: int = attrs.field(init=False)
    kind: str = attrs.field(init=False, default="file")
    timeline: Timeline | None = attrs.field(init=False, default=None, repr=False)
    _header: bytes = attrs.field(init=False, default=b"", repr=False)

    def __attrs_post_init__(self) -> None:
        p = self.path
        try:
            st = p.stat()
        except OSError as exc:
            raise InvalidInput(f"cannot read {p}: {exc.strerror or exc}") from None
        if not p.is_file():
            raise InvalidInput(f"{p} is not a regular file")
        self.nbytes = check_size(st.st_size, field=f"size of {p}")
        if self.expected_sha256 is not None:
            self.expected_sha256 = check_sha256_hex(self.expected_sha256)
            self.want_sha256 = True
        if p.suffix == ".safetensors":
            with _open(p) as fh:
                self._header, self.tensors = read_header(fh, self.nbytes)

    def load(
        self,
        backend: AllocatorBackend,
        buf: DeviceBuffer,
        *,
        staging: StagingFactory,
        staged: StagedHasher,
    ) -> str | None:
        """Read (on :attr:`readers` threads), copy and hash chunk by chunk through a ring of
        staging buffers (see :class:`FileLoad`)."""
        file_hash = _FileHash() if self.want_sha256 else None
        try:
            with contextlib.ExitStack() as stack:
                buffers: list[memoryview] = []
                while len(buffers) < self.readers + 2:  # the factory lends them in pairs
                    buffers += stack.enter_context(staging())
                fh = stack.enter_context(_open(self.path, buffering=0))
                load = FileLoad(self, backend, buf, fh.fileno(), buffers, staged, file_hash)
                self.timeline = load.timeline
                load.run()
        finally:
            if file_hash is not None:
                file_hash.close()
        result = self._finish(file_hash)
        if self._header and device_reader(backend, buf)(len(self._header)) != self._header:
            # The header checked before loading must be the one in VRAM, byte for byte: without
            # expected_sha256 nothing else notices a header rewritten mid-load.
            raise IntegrityViolation(
                f"{self.path} changed while it was loaded (safetensors header)",
                reason="changed_while_loading",
            )
        return result


def default_readers(hash_workers: int = 2) -> int:
    """Threads reading (and hashing) a file when none are configured:
    ``VRAMCORE_READ_THREADS``, else ``hash_workers`` up to :data:`DEFAULT_MAX_READERS`.

    Each reader thread hashes the leaves of the chunk it has just read, so on the host they
    are the seal's hashing threads too; a GPU host feeding pinned memory at PCIe speed wants
    several (one thread reads the page cache at 6-12 GB/s). Each holds one staging buffer.
    """
    text = os.environ.get("VRAMCORE_READ_THREADS", "").strip()
    if not text:
        return max(1, min(hash_workers, DEFAULT_MAX_READERS))
    if not text.isdigit() or not 1 <= int(text) <= MAX_READERS:
        raise ConfigError(
            f"VRAMCORE_READ_THREADS={text[:20]!r} must be a whole number from 1 to {MAX_READERS}"
        )
    return int(text)


def check_readers(value: object) -> int:
    """A ``read_threads`` argument: an integer from 1 to :data:`MAX_READERS`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_READERS:
        raise InvalidInput(
            f"read_threads must be an integer from 1 to {MAX_READERS}, got {safe_repr(value)}"
        )
    return value


@functools.cache
def _reader_pool(readers: int) -> ThreadPoolExecutor:
    """Reader threads shared by every load with this count (idle ones cost nothing); each
    is numbered within the pool as it starts (:func:`_reader_slot`)."""
    return ThreadPoolExecutor(
        max_workers=readers,
        thread_name_prefix="vramcore-read",
        initializer=_take_slot,
        initargs=(itertools.count(),),
    )


def _take_slot(numbers: Iterator[int]) -> None:
    _slots.slot = next(numbers)  # next() on a count is atomic under the GIL


class Timeline:
    """Where one load's time went, per stage (summed over the threads doing it).

    :attr wall: the load, start to end.
    :attr cpu: CPU seconds of the whole process meanwhile (every thread).
    :attr read: CPU seconds of the reader threads in ``preadv`` (the kernel copying from
        the page cache).
    :attr hash: CPU seconds of the reader threads hashing the leaves of what they read.
    :attr copy: CPU seconds of the loading thread issuing copies to the device.
    :attr stall: seconds the loading thread waited for a chunk to be read or a buffer to be
        free (its copy and hashes done).
    """

    def __init__(self) -> None:
        self.wall = self.cpu = self.read = self.hash = self.copy = self.stall = 0.0

    def busy(self, cores: int) -> dict[str, float]:
        """Each stage's share of the wall time (1.0: one core for the whole load), and the
        cores' use overall. ``other`` is the process's CPU time beyond reading, hashing and
        copying (the file SHA-256, Python overhead, other work)."""
        wall = self.wall or 1e-9
        return {
            "read": self.read / wall,
            "hash": self.hash / wall,
            "copy": self.copy / wall,
            "other": max(0.0, self.cpu - self.read - self.hash - self.copy) / wall,
            "stall": self.stall / wall,
            "cores_used": self.cpu / wall / max(1, cores),
        }

    #: Each stage's attribute on the narrated ``copy`` operation (microseconds).
    ATTRIBUTES: ClassVar[Mapping[str, str]] = {
        "read": "read_cpu_us",
        "hash": "hash_cpu_us",
        "copy": "copy_cpu_us",
        "stall": "stall_us",
        "cpu": "cpu_us",
        "wall": "wall_us",
    }

    @classmethod
    def from_attributes(cls, attributes: Mapping[str, Any]) -> Timeline:
        """The timeline a narrated ``copy`` operation carries (see :meth:`attributes`)."""
        timeline = cls()
        for stage, key in cls.ATTRIBUTES.items():
            setattr(timeline, stage, int(attributes.get(key, 0)) / 1e6)
        return timeline

    def attributes(self, readers: int) -> dict[str, int]:
        """The timeline as attributes of the narrated ``copy`` operation (microseconds)."""
        stages = {key: round(getattr(self, stage) * 1e6) for stage, key in self.ATTRIBUTES.items()}
        return {"read_threads": readers, **stages}


class _Chunk:
    """One chunk of a file load in flight: read, then hashed, by one reader thread.

    :attr read: resolves (to the read's CPU seconds) once the bytes are in the buffer, so
        the loading thread can copy them while the reader goes on to hash them.
    """

    def __init__(self, view: memoryview, offset: int) -> None:
        self.view = view
        self.offset = offset
        self.read: Future[float] = Future()


class FileLoad:
    """One file streamed into a device buffer through a ring of staging buffers.

    Reader threads fill the ring ahead of use, each chunk at its own offset (``preadv``: no
    shared file position, and the GIL is released while the kernel copies), and each then
    hashes the leaves of the chunk it has just read (while its bytes are in cache, with no
    hand-off to another thread). This thread takes the chunks in file order, as each is
    read, feeds the file SHA-256 and issues the chunk's copy to the device. A buffer is
    refilled only once its copy and hashes are done, and :meth:`run` returns only when no
    thread reads or writes any of them.

    :param buffers: the ring (at least three): reads run up to ``len(buffers) - 2`` chunks
        ahead while two chunks are hashed and copied.
    """

    def __init__(
        self,
        source: FileSource,
        backend: AllocatorBackend,
        buf: DeviceBuffer,
        fd: int,
        buffers: list[memoryview],
        staged: StagedHasher,
        file_hash: _FileHash | None,
    ) -> None:
        self.source = source
        self.backend = backend
        self.buf = buf
        self.fd = fd
        self.buffers = buffers
        self.staged = staged
        self.file_hash = file_hash
        self.chunk = min(len(b) for b in buffers)
        self.count = -(-source.nbytes // self.chunk)
        self.ahead = max(1, len(buffers) - 2)
        self.pipes = [_Pipeline() for _ in buffers]
        self.reads: dict[int, tuple[_Chunk, Future[float]]] = {}
        self.timeline = Timeline()
        self._lock = threading.Lock()  # guards the readers' sums in the timeline
        # The CPUs reader threads are spread over, chunk by chunk (see :meth:`_on_cpu`): the
        # process's own set, when it has a CPU for each reader; else the scheduler decides.
        self.allowed: set[int] = _allowed_cpus()
        self.cpus = sorted(self.allowed) if 2 <= source.readers <= len(self.allowed) else []

    def run(self) -> None:
        """Load every chunk (see the class docstring).

        :raises IntegrityViolation: the file shrank or grew while it was read.
        """
        started, cpu = time.perf_counter(), time.process_time()
        try:
            with _draining(*self.pipes):
                try:
                    self._load()
                finally:
                    for _, done in self.reads.values():  # readers may still use a buffer
                        done.exception()
        finally:
            self.timeline.wall = time.perf_counter() - started
            self.timeline.cpu = time.process_time() - cpu

    def _load(self) -> None:
        source, nbytes, timeline = self.source, self.source.nbytes, self.timeline
        pool = _reader_pool(source.readers) if self.count > 1 else None
        for index in range(min(self.ahead, self.count)):
            self._read(index, pool)
        for index in range(self.count):
            chunk, done = self.reads.pop(index)
            waited = time.perf_counter()
            chunk.read.result()
            timeline.stall += time.perf_counter() - waited
            pipe = self.pipes[index % len(self.buffers)]
            pipe.waiters.append(functools.partial(_settled, done))  # it may still be hashing
            if self.file_hash is not None:
                pipe.waiters.append(self.file_hash.feed(chunk.view))
            copying = time.thread_time()
            _copy(self.backend, self.buf, chunk.offset, chunk.view, pipe)
            timeline.copy += time.thread_time() - copying
            if source.progress is not None:
                source.progress(chunk.offset + len(chunk.view), nbytes)
            if index + self.ahead < self.count:
                self._read(index + self.ahead, pool)
        if os.pread(self.fd, 1, nbytes):
            raise IntegrityViolation(
                f"{source.path} grew while it was loaded", reason="changed_while_loading"
            )

    def _read(self, index: int, pool: ThreadPoolExecutor | None) -> None:
        """Start reading (then hashing) chunk ``index`` into its ring slot, once it is free."""
        slot = index % len(self.buffers)
        waited = time.perf_counter()
        self.pipes[slot].drain()  # the slot's previous chunk is copied and hashed
        self.timeline.stall += time.perf_counter() - waited
        offset = index * self.chunk
        chunk = _Chunk(self.buffers[slot][: min(self.chunk, self.source.nbytes - offset)], offset)
        if pool is not None:
            self.reads[index] = (chunk, pool.submit(self._on_cpu, chunk))
            return
        done: Future[float] = Future()  # one chunk: read and hash it here, no hand-off
        try:
            done.set_result(self._fill_and_hash(chunk))
        except BaseException as exc:
            done.set_exception(exc)
        self.reads[index] = (chunk, done)

    def _on_cpu(self, chunk: _Chunk) -> float:
        """:meth:`_fill_and_hash` on this reader thread's own CPU, its affinity given back
        after.

        Each reader thread has a CPU of its own (:func:`_reader_slot`): left alone, the
        scheduler often stacks the readers on one CPU (each wakes the next where it runs: GIL
        hand-offs, futures) while another idles, which cost a 2-CPU host up to a fifth of a
        seal's time. Only while the thread works on a chunk; an idle reader runs anywhere.
        """
        if not self.cpus:
            return self._fill_and_hash(chunk)
        cpu = self.cpus[_reader_slot() % len(self.cpus)]
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError:  # the CPU went away from the process's set: run anywhere
            return self._fill_and_hash(chunk)
        try:
            return self._fill_and_hash(chunk)
        finally:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, self.allowed)

    def _fill_and_hash(self, chunk: _Chunk) -> float:
        """Read ``chunk``, let the loading thread have it, then hash its leaves."""
        try:
            read = self._fill(chunk.view, chunk.offset)
        except BaseException as exc:
            chunk.read.set_exception(exc)
            raise
        chunk.read.set_result(read)
        started = time.thread_time()
        self.staged.hash_here(chunk.offset, chunk.view)
        hashed = time.thread_time() - started
        with self._lock:
            self.timeline.read += read
            self.timeline.hash += hashed
        return hashed

    def _fill(self, view: memoryview, offset: int) -> float:
        """Read ``len(view)`` bytes at ``offset`` into ``view``; return this thread's CPU
        seconds for it."""
        started = time.thread_time()
        got = 0
        while got < len(view):
            try:
                n = os.preadv(self.fd, [view[got:]], offset + got)
            except OSError as exc:
                raise InvalidInput(
                    f"cannot read {self.source.path}: {exc.strerror or exc}"
                ) from None
            if not n:
                raise IntegrityViolation(
                    f"{self.source.path} shrank while it was loaded ({offset + got} of "
                    f"{self.source.nbytes} bytes read)",
                    reason="changed_while_loading",
                )
            got += n
        return time.thread_time() - started


_slots = threading.local()


def _reader_slot() -> int:
    """This reader thread's number within its pool (0 up to the pool's size)."""
    slot: int = getattr(_slots, "slot", 0)
    return slot


def _allowed_cpus() -> set[int]:
    """The CPUs this process may run on (empty where the platform cannot say or pin)."""
    if not hasattr(os, "sched_getaffinity") or not hasattr(os, "sched_setaffinity"):
        return set()
    try:
        return set(os.sched_getaffinity(0))
    except OSError:
        return set()


def _settled(done: Future[Any]) -> None:
    """Wait for ``done``; raise its error."""
    done.result()


@contextlib.contextmanager
def _draining(*pipes: _Pipeline) -> Iterator[None]:
    """Drain ``pipes`` on leaving, whatever happened; their first error fails a clean exit."""
    ok = False
    try:
        yield
        ok = True
    finally:
        errors: list[BaseException] = []
        for pipe in pipes:
            try:
                pipe.drain()
            except BaseException as exc:
                errors.append(exc)
        if ok and errors:
            raise errors[0]


def _open(path: Path, buffering: int = -1) -> Any:
    try:
        return path.open("rb", buffering=buffering)
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror or exc}") from None


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
            "the shard was not sealed",
            reason="sha256_mismatch",
        )
    return actual


class StagingPool:
    """Reusable host staging buffers of one size, for backends that lend none of their own.

    Fresh host memory is expensive to touch the first time (a page fault per 4 KiB page, which
    costs more than the copy itself on many VMs), so staging buffers are kept and reused
    rather than allocated per call. At most ``keep`` idle buffers are retained.
    """

    def __init__(self, chunk_bytes: int, keep: int = 8) -> None:
        self.chunk_bytes = chunk_bytes
        self._keep = keep
        self._idle: list[bytearray | mmap.mmap] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def borrow(self, count: int = 2) -> Iterator[list[memoryview]]:
        """Lend ``count`` buffers of :attr:`chunk_bytes` for the duration of the block."""
        with self._lock:
            taken = [self._idle.pop() for _ in range(min(count, len(self._idle)))]
        taken += [_host_buffer(self.chunk_bytes) for _ in range(count - len(taken))]
        try:
            yield [memoryview(b) for b in taken]
        finally:
            with self._lock:
                self._idle.extend(taken[: max(0, self._keep - len(self._idle))])


def _host_buffer(nbytes: int) -> bytearray | mmap.mmap:
    """A host staging buffer: anonymous memory in huge pages where the kernel offers them
    (fewer TLB misses while the kernel copies the page cache into it and the hashes read it),
    else a plain ``bytearray``."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or nbytes < _HUGE_PAGE:
        return bytearray(nbytes)
    try:
        buffer = mmap.mmap(-1, nbytes)
    except OSError:
        return bytearray(nbytes)
    with contextlib.suppress(OSError):
        buffer.madvise(advice)
    return buffer


class _BackendStaging:
    """Two of the backend's own (pinned) staging buffers per ``with`` block."""

    def __init__(self, backend: AllocatorBackend, chunk_bytes: int) -> None:
        self._backend = backend
        self._chunk_bytes = chunk_bytes

    def __call__(self) -> contextlib.AbstractContextManager[list[memoryview]]:
        return self._backend.staging(2, self._chunk_bytes)


class _PoolStaging:
    """Two reused host buffers per ``with`` block, for backends that lend none."""

    def __init__(self, chunk_bytes: int) -> None:
        self._pool = StagingPool(chunk_bytes)

    def __call__(self) -> contextlib.AbstractContextManager[list[memoryview]]:
        return self._pool.borrow(2)


def staging_for(backend: AllocatorBackend, chunk_bytes: int) -> StagingFactory:
    """The staging buffers of ``backend``: its own (pinned) when it lends them, else a pool."""
    if type(backend).staging is not AllocatorBackend.staging:
        return _BackendStaging(backend, chunk_bytes)
    return _PoolStaging(chunk_bytes)
