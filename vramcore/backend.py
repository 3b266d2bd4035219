"""The allocator backend contract: what a plugin implements to put bytes in device memory.

A plugin registers :class:`BackendSpec` records through the
:func:`~vramcore.hookspecs.vramcore_allocator_backends` hook. The manager selects one spec
(see :func:`vramcore.plugins.select_backend`) and calls its factory to get an
:class:`AllocatorBackend`; allocation, copies and frees are methods of that object, not hook
calls, so the hot path costs no hook dispatch.

Device pointers stay inside the backend: a :class:`DeviceBuffer` shows its device, size and
backend, never its address.

The copy contract
-----------------

:meth:`AllocatorBackend.copy_in` may be asynchronous. A backend either

* finishes reading the host ``data`` before ``copy_in`` returns (and returns ``None``), or
* returns a :class:`CopyHandle` whose :meth:`~CopyHandle.wait` returns once the backend no
  longer reads ``data`` (the device has its own copy; on CUDA: an event recorded after the
  ``cudaMemcpyAsync`` on the copy's stream).

Until the handle's ``wait()`` returned, the core neither writes, reuses, frees nor hashes the
memory behind ``data``; it waits on every handle before it reports the copy done, so a shard
is never digested or sealed while a copy into it is still running. ``wait()`` raises the
copy's error (a :class:`~vramcore.errors.VramError`), if any. A backend may also lend the
host staging buffers the core reads files into (:meth:`AllocatorBackend.staging`): pinned
memory on CUDA, so a chunk goes to the device by DMA with no extra host copy while the next
chunk is read and the previous one hashed (double buffering).

:meth:`AllocatorBackend.read_into` is synchronous: ``out`` holds the bytes when it returns.

Every method may be called from any thread, not only the one that made the backend.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes.util
import enum
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import attrs

from vramcore._dlpack import KDL_CPU, KDL_CUDA, DLDataType
from vramcore._dlpack import export as dlpack_export
from vramcore._dlpack import live_exports as dlpack_live_exports
from vramcore.errors import InvalidInput, NotSealed
from vramcore.validation import scrub_text

__all__ = [
    "CUDA_DRIVER_CHECK",
    "HOST_MEMORY_NOTICE",
    "KDL_CPU",
    "KDL_CUDA",
    "AllocatorBackend",
    "BackendSpec",
    "CopyHandle",
    "DLDataType",
    "DeviceBuffer",
    "DeviceDigest",
    "DeviceInfo",
    "MemoryKind",
    "ProbeCheck",
    "TensorSource",
    "cuda_driver_check",
    "dlpack_export",
    "dlpack_live_exports",
    "find_libcuda",
    "log_host_memory",
]

#: What every command and the manager's log say, once, when the weights live in host memory.
HOST_MEMORY_NOTICE = (
    "the {backend} backend keeps the weights in HOST memory, not in GPU memory (VRAM): "
    "for tests and demos only"
)


@runtime_checkable
class CopyHandle(Protocol):
    """Completion of an asynchronous :meth:`AllocatorBackend.copy_in` (see the copy contract).

    ``wait()`` blocks until the backend no longer reads the host buffer it was given, and
    raises the copy's error if it failed. Calling it again returns at once (or raises again).
    """

    def wait(self) -> None:
        """Block until the copy has finished reading its host buffer."""


def _index_tuple(value: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if value is None else tuple(value)


@attrs.frozen(kw_only=True)
class DeviceDigest:
    """What a device-side digest returns (:func:`~vramcore.hookspecs.vramcore_device_digest`).

    :attr root: the RFC 6962 root over *all* of the buffer's leaves (32 bytes), or ``None``
        when only a leaf range or a list of leaf indices was asked for.
    :attr leaves: the packed leaf hashes, 32 bytes each: of leaves ``first_leaf`` onwards, or,
        when :attr:`leaf_indices` is set, of exactly those leaves in that order.
    :attr first_leaf: index of the first leaf in :attr:`leaves` (``0`` with
        :attr:`leaf_indices`).
    :attr leaf_indices: ``None`` for a whole buffer or a range; for an answer to a sampled
        check, the leaf indices asked for (a tuple; ``leaves`` holds one hash per index).
    """

    root: bytes | None
    leaves: bytes | bytearray | memoryview
    first_leaf: int = 0
    leaf_indices: tuple[int, ...] | None = attrs.field(default=None, converter=_index_tuple)

    @property
    def leaf_count(self) -> int:
        """Number of leaf hashes held."""
        return len(self.leaves) // 32


class MemoryKind(enum.StrEnum):
    """Where an allocation's bytes live, as the driver reports the pointer type."""

    DEVICE = "device"  #: plain device memory (cudaMalloc): the only kind the policy accepts
    MANAGED = "managed"  #: unified/managed memory, may migrate to host RAM
    HOST_MAPPED = "host_mapped"  #: pinned host memory mapped into the device address space
    HOST = "host"  #: pageable host memory
    UNKNOWN = "unknown"  #: the backend cannot tell


@attrs.frozen(kw_only=True)
class DeviceInfo:
    """What a backend knows of one device, including the flags the VRAM-only policy reads.

    :attr index: the device ordinal the backend uses.
    :attr name: the marketing name ("NVIDIA H100 80GB HBM3").
    :attr total_bytes: device memory size.
    :attr free_bytes: free device memory when probed.
    :attr compute_capability: ``(major, minor)``, or ``None`` when not a CUDA device.
    :attr uuid: the device UUID, when known.
    :attr pci_bus_id: the PCI bus id, when known.
    :attr integrated: the GPU shares physical memory with the host (Jetson, iGPUs).
    :attr managed_memory: the device supports managed (unified) memory.
    :attr pageable_memory_access: the device can read pageable host memory (ATS or HMM).
    :attr host_page_tables: that access goes through the host's page tables (ATS).
    :attr ecc_enabled: ECC state, ``None`` when unknown.
    :attr ecc_errors: uncorrected ECC error count, ``None`` when unknown.
    :attr health: further health facts a backend knows, by name (NVML's ``retired_pages``,
        ``remapped_rows_uncorrectable``, ``remap_pending``, ``remap_failed``,
        ``addressing_mode``...); empty when none. Reported, not read by the policy.
    """

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    compute_capability: tuple[int, int] | None = None
    uuid: str | None = None
    pci_bus_id: str | None = None
    integrated: bool = False
    managed_memory: bool = False
    pageable_memory_access: bool = False
    host_page_tables: bool = False
    ecc_enabled: bool | None = None
    ecc_errors: int | None = None
    health: Mapping[str, int | bool | str | None] = attrs.field(factory=dict, hash=False)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready mapping of every field."""
        out = attrs.asdict(self)
        out["health"] = dict(self.health)
        if self.compute_capability is not None:
            out["compute_capability"] = list(self.compute_capability)
        return out


@runtime_checkable
class TensorSource(Protocol):
    """How a backend lets the core build tensor views of one allocation (its ``_tensors.py``).

    Returned by :meth:`AllocatorBackend.tensor_source`; the core's
    :class:`vramcore.TensorView` uses it for ``__dlpack__`` and for the backend's own array.
    """

    def dlpack_device(self) -> tuple[int, int]:
        """``(DLPack device type, device ordinal)``: ``(1, 0)`` for host memory, ``(2, n)``
        for CUDA device ``n``."""

    def address(self) -> int:
        """The allocation's first byte's address; raises
        :class:`~vramcore.errors.NotSealed` once the allocation was freed. Never logged."""

    def array(self, offset: int, dtype: str, shape: tuple[int, ...]) -> object:
        """The backend's own zero-copy array (a NumPy or CuPy ndarray, a PyCUDA GPUArray) of
        NumPy ``dtype`` and ``shape`` from byte ``offset``; raises once freed."""


class TensorViews(Protocol):
    """What the core attaches to a sealed shard's buffer to answer :meth:`DeviceBuffer.tensors`
    (see :mod:`vramcore._tensors`)."""

    def views(self, names: Sequence[str] | None) -> dict[str, Any]:
        """Name -> view, for ``names`` or every tensor."""


class DeviceBuffer:
    """A backend's allocation, as the rest of vramcore sees it.

    :attr device: device index.
    :attr nbytes: size in bytes.
    :attr backend: name of the backend that owns it.
    :attr native: the backend's own object for inference code (a CuPy array, a PyCUDA
        allocation, a memoryview for the mock). It may expose the device address: hand it to
        kernels, never to logs.
    """

    __slots__ = ("_native", "_tensor_views", "backend", "device", "freed", "nbytes")

    def __init__(self, *, device: int, nbytes: int, backend: str, native: object) -> None:
        self.device = device
        self.nbytes = nbytes
        self.backend = backend
        self._native = native
        self._tensor_views: TensorViews | None = None
        self.freed = False

    @property
    def native(self) -> object:
        """The backend's own buffer object (see the class docstring)."""
        return self._native

    def attach_tensor_views(self, views: TensorViews) -> None:
        """Called by the manager when the shard in this buffer is sealed (not for users)."""
        self._tensor_views = views

    def tensors(self, names: Sequence[str] | None = None) -> dict[str, Any]:
        """The sealed shard's tensors: name -> zero-copy :class:`vramcore.TensorView`.

        Each view has the tensor's dtype and shape (from the sealed, signed tensor map) and
        exports ``__dlpack__``/``__dlpack_device__`` on every backend, so
        ``torch.from_dlpack(view)`` shares the memory, BF16 and the 8-bit floats included;
        ``view.array`` is the backend's own array (NumPy on the mock, CuPy on CuPy, a
        ``GPUArray`` on PyCUDA). Take them inside ``VramManager.verified(shard)``: they are the
        bytes just verified, and stay valid until the shard is deallocated.

        :param names: only these tensors (default: all, in shard order).
        :raises InvalidInput: the shard was not sealed from a safetensors file (or its map
            records no dtypes, as before attestation version 2), a name is unknown, or a
            tensor's dtype has no view (the sub-byte F4/F6 types).
        :raises NotSealed: the buffer was deallocated.
        :raises BackendUnavailable: the backend offers no tensor views.
        """
        if self.freed:
            raise NotSealed("this shard was deallocated; its tensors can no longer be viewed")
        if self._tensor_views is None:
            raise InvalidInput(
                "this buffer holds no sealed safetensors shard: tensors() needs a shard sealed "
                "with seal_file() from a .safetensors file"
            )
        return self._tensor_views.views(names)

    def __repr__(self) -> str:
        state = " freed" if self.freed else ""
        return f"<DeviceBuffer {self.backend} GPU{self.device} {self.nbytes} bytes{state}>"


class AllocatorBackend(abc.ABC):
    """Device memory operations one backend provides.

    Implementations must be thread-safe: the manager calls them from many threads. Every
    method raises :class:`vramcore.errors.VramError` subclasses, never driver exceptions
    (wrap them, without the pointer, in :class:`~vramcore.errors.AllocationFailed`).
    """

    #: The name the backend is registered under ("mock", "cupy"...).
    name: str = "abstract"
    #: Whether the weights this backend holds live in host memory (the mock): the manager says
    #: so once, in plain words, and ``strict_host_isolation`` refuses such a backend.
    host_memory: bool = False

    @abc.abstractmethod
    def devices(self) -> Sequence[DeviceInfo]:
        """Probe and describe every device this backend can drive."""

    @abc.abstractmethod
    def mem_info(self, device: int) -> tuple[int, int]:
        """Return ``(free_bytes, total_bytes)`` of ``device`` now."""

    @abc.abstractmethod
    def allocate(self, device: int, nbytes: int) -> DeviceBuffer:
        """Allocate ``nbytes`` of plain device memory on ``device``.

        Raises :class:`~vramcore.errors.InsufficientVram` or
        :class:`~vramcore.errors.AllocationFailed`.
        """

    @abc.abstractmethod
    def copy_in(self, buf: DeviceBuffer, offset: int, data: memoryview) -> CopyHandle | None:
        """Copy host ``data`` into ``buf`` at byte ``offset`` (bounds-checked).

        Return ``None`` when ``data`` was fully read before returning, else a
        :class:`CopyHandle` the caller waits on before it touches ``data`` again (see the copy
        contract in the module docstring). Errors found before the copy starts (bounds, a
        freed buffer) raise here; errors of the copy itself may surface from ``wait()``.
        """

    @abc.abstractmethod
    def read_into(self, buf: DeviceBuffer, offset: int, out: memoryview) -> None:
        """Copy ``len(out)`` bytes of ``buf`` from byte ``offset`` into host ``out``.

        Synchronous: ``out`` holds the bytes when this returns.
        """

    def tensor_source(self, buf: DeviceBuffer) -> TensorSource | None:
        """How to view ``buf``'s tensors zero-copy (:meth:`DeviceBuffer.tensors`), or ``None``
        when this backend offers no tensor views (the default)."""
        return None

    def host_view(self, buf: DeviceBuffer) -> memoryview | None:
        """A zero-copy host view of ``buf``'s bytes, when the backend's memory is host memory.

        Only a backend whose "device" memory is host-addressable (the mock) returns one; the
        core then hashes straight from it instead of reading the bytes back. GPU backends keep
        the default, ``None``.
        """
        return None

    @contextlib.contextmanager
    def staging(self, count: int, nbytes: int) -> Iterator[list[memoryview]]:
        """Lend ``count`` host buffers of ``nbytes`` for file reads feeding :meth:`copy_in`.

        The default lends ordinary host memory; a CUDA backend overrides it with pinned
        (page-locked) memory it keeps and reuses, so copies run by DMA without a bounce
        buffer. The buffers are only valid inside the block; the core waits for every copy
        handle before leaving it.
        """
        yield [memoryview(bytearray(nbytes)) for _ in range(count)]

    @abc.abstractmethod
    def free(self, buf: DeviceBuffer) -> None:
        """Release ``buf``; later use of it raises. Freeing twice is an error."""

    @abc.abstractmethod
    def memory_kind(self, buf: DeviceBuffer) -> MemoryKind:
        """Ask the driver where ``buf`` lives (the policy accepts only ``DEVICE``)."""

    def close(self) -> None:  # noqa: B027 - optional hook with a do-nothing default
        """Release backend resources (contexts, pools). Called once by the manager.

        The manager calls it only after every seal and verification it ran has finished. A
        backend may refuse any later call with a :class:`~vramcore.errors.VramError`.
        """


@attrs.frozen(kw_only=True)
class ProbeCheck:
    """One thing a backend needs, checked for ``vramcore doctor`` (one line each).

    :attr what: what was checked (``"CuPy"``, ``"CUDA driver and GPU"``).
    :attr ok: whether it is in place.
    :attr detail: what was found (``"installed (14.2.0)"``, ``"not installed"``, ``"no CUDA
        driver found (...)"``); no device pointer, no secret.
    :attr install: installing the backend's package (:attr:`BackendSpec.install_hint`) fixes
        it; the doctor prints the install hint only when such a check failed.
    """

    what: str
    ok: bool
    detail: str
    install: bool = False


#: The ``what`` of a doctor report's driver line (:func:`cuda_driver_check`).
CUDA_DRIVER_CHECK = "CUDA driver and GPU"


def find_libcuda() -> str | None:
    """The CUDA driver library (``libcuda``) as the dynamic loader finds it, or ``None``.

    Looks for the file only; nothing is loaded.
    """
    return ctypes.util.find_library("cuda")


def cuda_driver_check(package: str, find: Callable[[], str | None] = find_libcuda) -> ProbeCheck:
    """The driver line of a CUDA backend's doctor report when its Python ``package`` (``CuPy``,
    ``PyCUDA``) is missing or broken: whether the machine has the CUDA driver library at all,
    which tells "install the package" apart from "no NVIDIA GPU or driver here". Never
    raises: a failing ``find`` counts as no driver found."""
    try:
        found = find()
    except Exception:  # the driver check only refines the diagnosis
        found = None
    if found is None:
        return ProbeCheck(
            what=CUDA_DRIVER_CHECK,
            ok=False,
            detail="no CUDA driver found (libcuda is not on this machine: no NVIDIA GPU or driver)",
        )
    return ProbeCheck(
        what=CUDA_DRIVER_CHECK,
        ok=True,
        detail=f"driver library found ({scrub_text(found)[:80]}); GPUs are counted once "
        f"{package} imports",
    )


@attrs.frozen(kw_only=True)
class BackendSpec:
    """A named allocator backend a plugin offers.

    :attr name: unique name, used by ``allocator=`` and ``VRAMCORE_ALLOCATOR``.
    :attr priority: higher wins when no name is given; a mock should be low.
    :attr probe: returns ``None`` when the backend can run here, else the reason it cannot
        ("no CUDA driver found"); must be cheap and must not raise.
    :attr factory: builds the backend; called only when the probe passed.
    :attr install_hint: what to install to make it usable, said so that it works as printed
        (never a package-index name this project does not publish).
    :attr description: one line for ``vramcore plugins``.
    :attr host_memory: the backend's "device" memory is host RAM (the mock): it is chosen
        only when named, never in place of a GPU backend that cannot run.
    :attr diagnose: optional: what the backend needs, checked one thing at a time
        (:class:`ProbeCheck`), so ``vramcore doctor`` can say which is missing (the library,
        or the driver and GPU); like the probe, cheap and never raising.
    """

    name: str
    priority: int
    probe: Callable[[], str | None]
    factory: Callable[[], AllocatorBackend]
    install_hint: str = ""
    description: str = ""
    host_memory: bool = False
    diagnose: Callable[[], Sequence[ProbeCheck]] | None = None

    def checks(self) -> list[ProbeCheck]:
        """Run :attr:`diagnose` (none: ``[]``); one that raises or answers something else
        gives one failed check saying what went wrong."""
        if self.diagnose is None:
            return []
        try:
            found: object = self.diagnose()
        except Exception as exc:  # a diagnosis must never take the doctor down
            return [ProbeCheck(what="diagnosis", ok=False, detail=f"{type(exc).__name__}: {exc}")]
        if isinstance(found, Sequence) and all(isinstance(c, ProbeCheck) for c in found):
            return list(found)
        return [
            ProbeCheck(
                what="diagnosis",
                ok=False,
                detail=f"answered {type(found).__name__}, not a sequence of ProbeCheck",
            )
        ]

    def why_not(self) -> str | None:
        """Run the probe; a probe that raises, or answers something other than ``None`` or a
        reason, counts as not viable, with what went wrong as the reason."""
        try:
            reason: object = self.probe()
        except Exception as exc:  # a probe must never take the manager down
            return f"viability probe failed: {type(exc).__name__}: {exc}"
        if reason is None or isinstance(reason, str):
            return reason
        return f"viability probe answered {type(reason).__name__}, not a reason or None"


def log_host_memory(backend: str) -> None:
    """Warn (logger ``vramcore.host_memory``) that ``backend`` keeps weights in host memory.

    The CLI shows this logger's message once per command, however many managers it makes.
    """
    logging.getLogger("vramcore.host_memory").warning(
        "%s", HOST_MEMORY_NOTICE.format(backend=backend)
    )
