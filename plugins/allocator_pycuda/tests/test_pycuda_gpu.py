"""The pycuda backend on a real GPU: the contract suite, contexts and the shard's views.

Run by ``scripts/gpu-check`` (which installs the PyCUDA wheel from ``dist/gpu-wheels``);
skipped with the reason elsewhere.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import vramcore_allocator_pycuda
from vramcore_allocator_pycuda import PyCudaBackend, PyCudaShard

from vramcore.digest import hash_leaves, merkle_root
from vramcore.testing import BackendContract

pytestmark = pytest.mark.vramcore_gpu

LEAF = 65536


def _viable() -> None:
    reason = vramcore_allocator_pycuda.unavailable_reason()
    if reason is not None:
        pytest.skip(f"pycuda backend not viable on this GPU machine: {reason}")


@pytest.fixture
def gpu_backend() -> Iterator[PyCudaBackend]:
    _viable()
    backend = PyCudaBackend()
    yield backend
    backend.close()


class TestPyCudaContract(BackendContract):
    """The real PyCUDA backend keeps the contract."""

    @pytest.fixture
    def backend(self) -> Iterator[PyCudaBackend]:
        _viable()
        backend = PyCudaBackend()
        yield backend
        backend.close()

    @pytest.fixture
    def digest_plugins(self) -> Sequence[object]:
        return [vramcore_allocator_pycuda]


def _current_context_on_thread(fn: Any) -> Any:
    import pycuda.driver as drv

    seen: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)
        seen.append(drv.Context.get_current())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(120)
    assert not thread.is_alive()
    if errors:
        raise errors[0]
    return seen[0]


def test_no_context_is_left_pushed_on_any_thread(gpu_backend: PyCudaBackend) -> None:
    import pycuda.driver as drv

    data = random.Random(1).randbytes(3 * LEAF + 5)
    box: list[Any] = []
    assert (
        _current_context_on_thread(lambda: box.append(gpu_backend.allocate(0, len(data)))) is None
    )
    buf = box[0]
    for step in (
        lambda: gpu_backend.copy_in(buf, 0, memoryview(data)),
        lambda: gpu_backend.read_into(buf, 0, memoryview(bytearray(len(data)))),
        lambda: gpu_backend.device_digest(buf, LEAF, None),
        lambda: gpu_backend.free(buf),
    ):
        assert _current_context_on_thread(step) is None
    assert drv.Context.get_current() is None


def test_an_application_context_is_adopted_and_left_current() -> None:
    _viable()
    import pycuda.driver as drv

    app = drv.Device(0).make_context()
    try:
        backend = PyCudaBackend()
        data = random.Random(2).randbytes(LEAF + 3)
        buf = backend.allocate(0, len(data))
        backend.copy_in(buf, 0, memoryview(data))
        native = buf.native
        assert isinstance(native, PyCudaShard)
        assert native.gpuarray().get().tobytes() == data  # used from the app's context
        backend.free(buf)
        backend.close()
        assert drv.Context.get_current() == app
    finally:
        drv.Context.pop()
        app.detach()


def test_shard_views_read_the_sealed_bytes(gpu_backend: PyCudaBackend) -> None:
    data = random.Random(3).randbytes(4 * LEAF)
    buf = gpu_backend.allocate(0, len(data))
    with gpu_backend.staging(1, len(data)) as (staging,):
        staging[:] = data
        handle = gpu_backend.copy_in(buf, 0, staging)
        assert handle is not None, "a copy from pinned staging memory is asynchronous"
        handle.wait()
    digest = gpu_backend.device_digest(buf, LEAF, None)
    assert digest is not None
    assert digest.root == merkle_root(hash_leaves(data, LEAF))
    native = buf.native
    assert isinstance(native, PyCudaShard)
    import numpy as np

    floats = native.gpuarray(np.float32, offset=LEAF).get()
    assert floats.tobytes() == data[LEAF:]
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:  # the CUDA Array Interface and DLPack, zero copy
        tensor = torch.as_tensor(native, device="cuda")
        assert bytes(tensor.cpu().numpy()) == data
        via_dlpack = torch.from_dlpack(native)
        assert via_dlpack.data_ptr() == tensor.data_ptr()
        assert bytes(via_dlpack.cpu().numpy()) == data
        del tensor, via_dlpack
    gpu_backend.free(buf)
