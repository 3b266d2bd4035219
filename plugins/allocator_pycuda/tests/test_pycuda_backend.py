"""The pycuda backend's own behaviour on the stand-in driver: contexts, copies, failures,
digest compilation, probing and the native shard object."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
import vramcore_allocator_pycuda
from vramcore_allocator_pycuda import (
    DriverApi,
    PyCudaBackend,
    PyCudaDigestUnavailable,
    PyCudaShard,
)
from vramcore_allocator_pycuda import _backend as backend_module
from vramcore_allocator_pycuda._copies import EventHandle

from vramcore import VramManager
from vramcore.backend import DeviceBuffer, MemoryKind
from vramcore.digest import hash_leaves, merkle_root
from vramcore.errors import (
    AllocationFailed,
    DeviceDigestUnavailable,
    InsufficientVram,
    InvalidInput,
    PolicyViolation,
)
from vramcore.testing import TEST_TOKEN, CapturePlugin, CapturingSink

LEAF = 65536


def on_thread(driver: Any, fn: Any) -> Any:
    """Run ``fn`` on a new thread; check it left that thread's context stack empty."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)
        out.append(list(driver.stack()))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    result, stack = out
    if isinstance(result, BaseException):
        raise result
    assert stack == [], "the backend left a context pushed on a worker thread"
    return result


@pytest.fixture
def backend(fake_api: DriverApi) -> Any:
    b = PyCudaBackend(fake_api)
    yield b
    b.close()


# -- contexts ------------------------------------------------------------------------------


def test_primary_context_is_retained_once_per_process(fake_api: DriverApi, fake_driver: Any):
    first, second = PyCudaBackend(fake_api), PyCudaBackend(fake_api)
    for b in (first, second):
        b.free(b.allocate(0, 10))
        b.close()
    assert fake_driver.calls.count(("retain_primary", 0)) == 1
    assert fake_driver.stack() == []


def test_the_applications_current_context_is_adopted(fake_api: DriverApi, fake_driver: Any):
    app_ctx = fake_driver.Device(0).make_context()  # pushed, like pycuda.autoinit
    try:
        b = PyCudaBackend(fake_api)
        buf = b.allocate(0, 4096)
        assert buf.native.allocation.ctx is app_ctx
        assert ("retain_primary", 0) not in fake_driver.calls
        b.free(buf)
        b.close()
        assert fake_driver.stack() == [app_ctx], "the application's context must stay current"
    finally:
        fake_driver.Context.pop()


def test_every_call_from_a_worker_thread_leaves_no_context(backend: Any, fake_driver: Any):
    buf = on_thread(fake_driver, lambda: backend.allocate(0, 3 * LEAF))
    data = bytes(range(256)) * (3 * LEAF // 256)
    assert on_thread(fake_driver, lambda: backend.copy_in(buf, 0, memoryview(data))) is None
    out = bytearray(len(data))
    on_thread(fake_driver, lambda: backend.read_into(buf, 0, memoryview(out)))
    assert bytes(out) == data
    assert on_thread(fake_driver, lambda: backend.memory_kind(buf)) is MemoryKind.DEVICE
    on_thread(fake_driver, lambda: backend.mem_info(0))
    on_thread(fake_driver, backend.devices)
    digest = on_thread(
        fake_driver,
        lambda: vramcore_allocator_pycuda.vramcore_device_digest(
            backend=backend, buffer=buf, leaf_size=LEAF, leaf_range=None, leaf_indices=None
        ),
    )
    assert digest.root == merkle_root(hash_leaves(data, LEAF))
    on_thread(fake_driver, lambda: backend.free(buf))
    assert fake_driver.out_of_thread_frees == 0
    assert fake_driver.stack() == []


def test_a_context_that_cannot_be_pushed_is_a_typed_error(
    backend: Any, fake_driver: Any, monkeypatch: pytest.MonkeyPatch
):
    ctx = fake_driver.primary_contexts[0]

    def refuse() -> None:
        raise fake_driver.Error("cuCtxPushCurrent failed: context is destroyed")

    monkeypatch.setattr(ctx, "push", refuse)
    with pytest.raises(AllocationFailed, match="cannot make the CUDA context of GPU 0 current"):
        backend.allocate(0, 10)
    assert fake_driver.used == [0]


# -- allocation failures -------------------------------------------------------------------


def test_driver_out_of_memory_is_insufficient_vram(
    backend: Any, fake_driver: Any, monkeypatch: pytest.MonkeyPatch
):
    # The free-memory check passes (another process frees and retakes memory), the driver
    # then refuses: still InsufficientVram, with the free memory the driver reports.
    monkeypatch.setattr(fake_driver, "mem_get_info", lambda: (1 << 40, 1 << 40))
    with pytest.raises(InsufficientVram) as info:
        backend.allocate(0, 512 << 20)
    assert info.value.needed == 512 << 20
    assert info.value.retriable


def test_driver_errors_become_allocation_failed_without_addresses(
    backend: Any, fake_driver: Any, fake_faults: Any
):
    buf = backend.allocate(0, 4096)
    address = str(buf.native.allocation.ptr)
    fake_faults.fail_next_copy("device lost")
    with pytest.raises(AllocationFailed) as info:
        backend.copy_in(buf, 0, memoryview(b"x" * 100))
    assert "device lost" in str(info.value)
    assert address not in str(info.value)
    assert hex(int(address))[2:] not in str(info.value)
    assert address not in repr(buf)
    assert address not in repr(buf.native)
    backend.free(buf)


def test_bookkeeping_failure_after_mem_alloc_frees_the_memory(
    backend: Any, fake_driver: Any, monkeypatch: pytest.MonkeyPatch
):
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("bookkeeping broke")

    monkeypatch.setattr(backend_module, "PyCudaShard", broken)
    with pytest.raises(RuntimeError):
        backend.allocate(0, 1 << 20)
    assert fake_driver.used == [0]
    assert fake_driver.allocations == {}


def test_allocating_on_a_closed_backend_is_refused(backend: Any, fake_driver: Any):
    backend.close()
    with pytest.raises(AllocationFailed, match="closed"):
        backend.allocate(0, 10)
    assert fake_driver.used == [0]


@pytest.mark.parametrize("device", [-1, 1, True, "0"])
def test_bad_devices_are_invalid_input(backend: Any, device: Any):
    with pytest.raises(InvalidInput):
        backend.allocate(device, 10)


def test_a_buffer_of_another_backend_is_refused(backend: Any):
    stranger = DeviceBuffer(device=0, nbytes=10, backend="pycuda", native=None)
    for call in (
        lambda: backend.free(stranger),
        lambda: backend.copy_in(stranger, 0, memoryview(b"x")),
        lambda: backend.read_into(stranger, 0, memoryview(bytearray(1))),
        lambda: backend.memory_kind(stranger),
    ):
        with pytest.raises(InvalidInput):
            call()


def test_read_into_a_read_only_buffer_is_refused(backend: Any):
    buf = backend.allocate(0, 10)
    with pytest.raises(InvalidInput, match="writable"):
        backend.read_into(buf, 0, memoryview(bytes(10)))
    backend.free(buf)


def test_close_frees_what_is_still_allocated(backend: Any, fake_driver: Any):
    bufs = [backend.allocate(0, 1 << 20) for _ in range(3)]
    backend.close()
    assert fake_driver.used == [0]
    assert all(b.freed for b in bufs)
    with pytest.raises(InvalidInput):
        bufs[0].native.allocation  # noqa: B018 - the accessor itself must raise
    backend.close()  # twice is fine


# -- copies --------------------------------------------------------------------------------


def test_staging_copies_are_asynchronous_with_event_handles(backend: Any, fake_driver: Any):
    data = bytes(range(256)) * 1024
    buf = backend.allocate(0, len(data))
    with backend.staging(2, len(data)) as lent:
        lent[0][:] = data
        handle = backend.copy_in(buf, 0, lent[0])
        assert isinstance(handle, EventHandle)
        assert "pending" in repr(handle)
        lent[1][:] = b"\x00" * len(data)
        handle.wait()
        assert "done" in repr(handle)
        lent[0][:] = b"\xff" * len(data)  # reused only after wait: the device kept data
    out = bytearray(len(data))
    backend.read_into(buf, 0, memoryview(out))
    assert bytes(out) == data
    backend.free(buf)


def test_a_copy_from_ordinary_memory_is_synchronous(backend: Any):
    buf = backend.allocate(0, 100)
    assert backend.copy_in(buf, 0, memoryview(bytearray(100))) is None
    backend.free(buf)


def test_pinned_buffers_are_reused_and_freed_on_close(backend: Any, fake_driver: Any):
    for _ in range(3):
        with backend.staging(2, 1 << 20) as lent:
            assert len(lent) == 2
    assert len(fake_driver.pinned) == 2, "staging buffers were not reused"
    backend.close()
    assert all(p.freed for p in fake_driver.pinned)


def test_a_failed_asynchronous_copy_raises_from_wait_every_time(backend: Any, fake_faults: Any):
    buf = backend.allocate(0, 4096)
    with backend.staging(1, 4096) as lent:
        fake_faults.fail_next_wait("ECC error during DMA")
        handle = backend.copy_in(buf, 0, lent[0])
        for _ in range(2):
            with pytest.raises(AllocationFailed, match="ECC error during DMA"):
                handle.wait()
    backend.free(buf)


def test_events_are_recycled(backend: Any, fake_driver: Any):
    buf = backend.allocate(0, 4096)
    with backend.staging(1, 4096) as lent:
        for _ in range(10):
            backend.copy_in(buf, 0, lent[0]).wait()
        for _ in range(5):
            backend.copy_in(buf, 0, lent[0])  # dropped without wait: the event comes back
        backend.copy_in(buf, 0, lent[0]).wait()
    assert fake_driver.events_made <= 2
    backend.free(buf)


def test_a_non_contiguous_source_is_refused(backend: Any):
    buf = backend.allocate(0, 10)
    with pytest.raises(InvalidInput, match="contiguous"):
        backend.copy_in(buf, 0, memoryview(bytes(20))[::2])
    backend.free(buf)


# -- digest --------------------------------------------------------------------------------


def test_the_kernels_compile_once_per_device(backend: Any, fake_driver: Any):
    data = bytes(range(256)) * (5 * LEAF // 256)
    buf = backend.allocate(0, len(data))
    backend.copy_in(buf, 0, memoryview(data))
    for leaf_range in (None, (1, 3), None):
        answer = vramcore_allocator_pycuda.vramcore_device_digest(
            backend=backend, buffer=buf, leaf_size=LEAF, leaf_range=leaf_range, leaf_indices=None
        )
        assert answer is not None
    assert fake_driver.compiles == 1
    assert "vramcore_merkle_level" in fake_driver.launches
    backend.free(buf)
    assert fake_driver.used == [0], "digest scratch memory leaked"


def test_a_module_that_does_not_load_is_a_typed_unavailable_digest(
    backend: Any, fake_driver: Any, caplog: pytest.LogCaptureFixture
):
    fake_driver.compile_error = fake_driver.LogicError(
        "cuModuleLoadData failed: a PTX JIT compilation failed"
    )
    buf = backend.allocate(0, 100)
    with caplog.at_level(logging.WARNING, logger="vramcore.allocator_pycuda"):
        for _ in range(2):
            with pytest.raises(PyCudaDigestUnavailable, match="PTX JIT compilation failed"):
                vramcore_allocator_pycuda.vramcore_device_digest(
                    backend=backend, buffer=buf, leaf_size=LEAF, leaf_range=None, leaf_indices=None
                )
    assert len(caplog.records) == 1, "the reason is logged once, not on every digest"
    assert "PTX JIT compilation failed" in caplog.text
    assert fake_driver.compiles == 0
    backend.free(buf)


def test_the_digest_hook_defers_for_other_backends(mock_backend: Any):
    buf = mock_backend.allocate(0, 10)
    assert (
        vramcore_allocator_pycuda.vramcore_device_digest(
            backend=mock_backend, buffer=buf, leaf_size=LEAF, leaf_range=None, leaf_indices=None
        )
        is None
    )


def test_digest_scratch_is_freed_when_a_launch_fails(
    backend: Any, fake_driver: Any, monkeypatch: pytest.MonkeyPatch
):
    buf = backend.allocate(0, 3 * LEAF)
    used = list(fake_driver.used)

    def broken_read(dest: Any, src: Any) -> None:
        raise fake_driver.Error("cuMemcpyDtoH failed: an illegal memory access")

    monkeypatch.setattr(fake_driver, "memcpy_dtoh", broken_read)
    with pytest.raises(PyCudaDigestUnavailable, match="illegal memory access"):
        backend.device_digest(buf, LEAF, None)
    assert fake_driver.used == used
    monkeypatch.undo()
    backend.free(buf)


# -- the manager on this backend -----------------------------------------------------------


def _manager(backend: Any, make_plugin_manager: Any) -> tuple[VramManager, CapturingSink]:
    sink = CapturingSink()
    pm = make_plugin_manager(vramcore_allocator_pycuda, CapturePlugin(sink))
    return VramManager(TEST_TOKEN, allocator=backend, plugin_manager=pm, worker_id="t"), sink


def test_seal_verify_and_use_a_shard(backend: Any, fake_driver: Any, make_plugin_manager: Any):
    data = bytes(range(256)) * (3 * LEAF // 256) + b"tail"
    manager, _ = _manager(backend, make_plugin_manager)
    with manager:
        shard = manager.seal_model(data, shard_id="layer0")
        assert shard.digest == merkle_root(hash_leaves(data, LEAF)).hex()
        manager.verify_sealed(shard)
        with manager.verified(shard) as buf:
            native = buf.native
            assert isinstance(native, PyCudaShard)
            cai = native.__cuda_array_interface__
            assert cai["shape"] == (len(data),)
            assert cai["typestr"] == "|u1"
            assert str(cai["data"][0]) not in repr(native)
        manager.deallocate(shard)
        with pytest.raises(InvalidInput):
            native.allocation  # noqa: B018
    assert fake_driver.compiles == 1, "seal and verify used the device digest"
    assert fake_driver.used == [0]


def test_managed_memory_is_refused_by_the_policy(
    backend: Any, fake_driver: Any, make_plugin_manager: Any, monkeypatch: pytest.MonkeyPatch
):
    real_alloc = fake_driver.mem_alloc

    def managed(nbytes: int) -> Any:
        alloc = real_alloc(nbytes)
        alloc.kind = MemoryKind.MANAGED
        return alloc

    monkeypatch.setattr(fake_driver, "mem_alloc", managed)
    manager, sink = _manager(backend, make_plugin_manager)
    with manager, pytest.raises(PolicyViolation):
        manager.seal_model(b"weights" * 1000)
    assert "policy.violation" in sink.types()
    assert fake_driver.used == [0], "the refused allocation was not freed"


# -- probing -------------------------------------------------------------------------------


def test_devices_report_the_driver_attributes(backend: Any, fake_driver: Any):
    fake_driver.specs[0]["attributes"].update(PAGEABLE_MEMORY_ACCESS=1)
    (info,) = backend.devices()
    assert info.name.startswith("NVIDIA H100")
    assert info.compute_capability == (9, 0)
    assert info.pci_bus_id == "0000:01:00.0"
    assert info.uuid == "GPU-fake-0000"
    assert info.total_bytes == fake_driver.specs[0]["total"]
    assert info.managed_memory
    assert info.pageable_memory_access  # HMM ...
    assert not info.host_page_tables  # ... not ATS
    assert not info.integrated
    assert info.ecc_enabled is True
    assert info.ecc_errors is None


def test_integrated_and_ats_devices_are_reported(backend: Any, fake_driver: Any):
    fake_driver.specs[0]["attributes"].update(
        INTEGRATED=1, PAGEABLE_MEMORY_ACCESS=1, PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES=1
    )
    (info,) = backend.devices()
    assert info.integrated
    assert info.host_page_tables


@pytest.mark.parametrize("fail_init", [False, True])
def test_nvml_details(fake_driver: Any, fake_api: DriverApi, fake_nvml: Any, fail_init: bool):
    fake_api.nvml = fake_nvml(ecc_errors=3, fail_init=fail_init)
    b = PyCudaBackend(fake_api)
    (info,) = b.devices()
    b.close()
    if fail_init:  # NVML absent or refusing: the attributes alone
        assert (info.uuid, info.ecc_enabled, info.ecc_errors) == ("GPU-fake-0000", True, None)
    else:
        assert (info.uuid, info.ecc_enabled, info.ecc_errors) == ("GPU-nvml-0000", False, 3)


# -- the shard object ----------------------------------------------------------------------


class _FakeGpuArrayModule:
    class GPUArray:
        def __init__(self, shape: Any, dtype: Any, gpudata: int, base: Any) -> None:
            self.shape, self.dtype, self.gpudata, self.base = shape, dtype, gpudata, base


def test_gpuarray_views_are_bounded(backend: Any, fake_driver: Any):
    buf = backend.allocate(0, 64)
    shard = PyCudaShard(buf.native.allocation, 64, 0, _FakeGpuArrayModule)
    view = shard.gpuarray("float32", offset=16)
    assert view.shape == (12,)
    assert view.gpudata == buf.native.allocation.ptr + 16
    assert view.base is buf.native.allocation
    assert shard.gpuarray("uint8", (4, 4)).shape == (4, 4)
    for kwargs in ({"shape": (65,)}, {"offset": -1}, {"dtype": "float64", "shape": (9,)}):
        with pytest.raises(InvalidInput):
            shard.gpuarray(**kwargs)
    with pytest.raises(InvalidInput, match="gpuarray is not available"):
        buf.native.gpuarray()
    backend.free(buf)
    with pytest.raises(InvalidInput):
        buf.native.gpuarray()
    assert "deallocated" in repr(buf.native)


@pytest.mark.parametrize(
    ("leaf_size", "leaf_range"),
    [(LEAF, (1, 5)), (LEAF, (2, 1)), (LEAF, (-1, 1)), (LEAF, (0, True)), (1000, None)],
)
def test_bad_leaf_ranges_are_refused_even_without_a_compiler(
    backend: Any, fake_driver: Any, leaf_size: int, leaf_range: Any
):
    fake_driver.compile_error = fake_driver.LogicError("cuModuleLoadData failed")
    buf = backend.allocate(0, 2 * LEAF)
    with pytest.raises(InvalidInput):
        vramcore_allocator_pycuda.vramcore_device_digest(
            backend=backend,
            buffer=buf,
            leaf_size=leaf_size,
            leaf_range=leaf_range,
            leaf_indices=None,
        )
    backend.free(buf)


def test_a_worker_on_the_second_gpu_touches_only_that_gpu(fake_driver: Any, fake_api: DriverApi):
    fake_driver.specs.append({**fake_driver.specs[0], "attributes": {}})
    fake_driver.used.append(0)
    context_type = type(fake_driver.primary_contexts[0])
    fake_driver.primary_contexts.append(context_type(fake_driver, 1, primary=True))
    b = PyCudaBackend(fake_api)
    buf = b.allocate(1, LEAF)
    with b.staging(1, LEAF) as (lent,):
        lent[:] = b"\x01" * LEAF
        b.copy_in(buf, 0, lent).wait()
    assert buf.native.allocation.ctx is fake_driver.primary_contexts[1]
    assert ("retain_primary", 0) not in fake_driver.calls, "GPU 0 got a context it never used"
    b.close()
    assert fake_driver.used == [0, 0]
    assert fake_driver.pinned and all(p.freed for p in fake_driver.pinned)


def test_close_goes_on_past_a_dead_context_and_reports_it(
    fake_driver: Any, fake_api: DriverApi, monkeypatch: pytest.MonkeyPatch
):
    fake_driver.specs.append({**fake_driver.specs[0], "attributes": {}})
    fake_driver.used.append(0)
    context_type = type(fake_driver.primary_contexts[0])
    fake_driver.primary_contexts.append(context_type(fake_driver, 1, primary=True))
    b = PyCudaBackend(fake_api)
    dead, alive = b.allocate(0, 100), b.allocate(1, 100)

    def refuse() -> None:
        raise fake_driver.Error("cuCtxPushCurrent failed: context is destroyed")

    monkeypatch.setattr(fake_driver.primary_contexts[0], "push", refuse)
    with pytest.raises(AllocationFailed, match="context of GPU 0"):
        b.close()
    assert fake_driver.used == [100, 0], "GPU 1 was not cleaned up after GPU 0 failed"
    assert dead.freed and alive.freed
    assert fake_driver.stack() == []


# -- no nvcc at run time; the fake driver as strict as cuModuleLoadData and cuLaunchKernel -----


def _digest(backend: Any, buf: Any, **kw: Any) -> Any:
    args = {"leaf_range": None, "leaf_indices": None, **kw}
    return vramcore_allocator_pycuda.vramcore_device_digest(
        backend=backend, buffer=buf, leaf_size=LEAF, **args
    )


@pytest.mark.vramcore_gpu_fake
@pytest.mark.parametrize("nvrtc", ["found", "missing"])
def test_the_device_digest_needs_no_nvcc(
    backend: Any,
    fake_driver: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
    nvrtc: str,
) -> None:
    from vramcore.kernels import _nvrtc

    monkeypatch.setenv("PATH", str(tmp_path))  # no nvcc (nor anything else) on PATH
    for name in ("CUDA_HOME", "CUDA_PATH", "VRAMCORE_PYCUDA_NVCC"):
        monkeypatch.delenv(name, raising=False)
    if nvrtc == "missing":
        monkeypatch.setattr(_nvrtc, "find_nvrtc", lambda: [])
        monkeypatch.setattr(_nvrtc, "_LOADED", {})
    elif not _nvrtc.find_nvrtc():
        pytest.skip("NVRTC not installed here (nvidia-cuda-nvrtc-cu12 is in the dev group)")
    data = bytes(range(256)) * (5 * LEAF // 256) + b"tail"
    buf = backend.allocate(0, len(data))
    backend.copy_in(buf, 0, memoryview(data))
    answer = _digest(backend, buf)
    assert answer is not None and answer.root == merkle_root(hash_leaves(data, LEAF))
    assert fake_driver.loaded == (["cubin"] if nvrtc == "found" else ["ptx"])
    backend.free(buf)


@pytest.mark.vramcore_gpu_fake
def test_sampled_leaves_come_back_for_exactly_the_indices_asked(
    backend: Any, fake_driver: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vramcore import kernels

    data = bytes(range(256)) * (9 * LEAF // 256) + b"x" * 100
    leaves = hash_leaves(data, LEAF)
    buf = backend.allocate(0, len(data))
    backend.copy_in(buf, 0, memoryview(data))
    for method in ("indices", "full"):
        plan = kernels.SampledPlan(method=method, indices_seconds=0.0, full_seconds=0.0)  # type: ignore[arg-type]
        monkeypatch.setattr(kernels, "sampled_plan", lambda n, k, size, p=plan: p)
        fake_driver.launches.clear()
        answer = _digest(backend, buf, leaf_indices=[0, 4, 9])
        assert answer.leaf_indices == (0, 4, 9) and answer.root is None
        assert bytes(answer.leaves) == leaves[0] + leaves[4] + leaves[9]
        expected = kernels.INDEX_KERNEL if method == "indices" else kernels.LEAF_KERNEL
        assert fake_driver.launches == [expected]
    with pytest.raises(InvalidInput, match="strictly increasing"):
        _digest(backend, buf, leaf_indices=[4, 0])
    backend.free(buf)
    assert fake_driver.used == [0], "digest scratch memory leaked"


@pytest.mark.vramcore_gpu_fake
def test_a_failed_launch_is_a_typed_unavailable_digest(backend: Any, fake_driver: Any) -> None:
    buf = backend.allocate(0, 2 * LEAF)
    fake_driver.inject("launch", "an illegal memory access was encountered")
    with pytest.raises(PyCudaDigestUnavailable, match="illegal memory access") as info:
        _digest(backend, buf)
    assert isinstance(info.value, DeviceDigestUnavailable)
    assert _digest(backend, buf) is not None, "the next digest runs on the device again"
    backend.free(buf)
    assert fake_driver.used == [0]


def test_no_scratch_memory_is_a_typed_unavailable_digest(backend: Any, fake_driver: Any) -> None:
    buf = backend.allocate(0, 2 * LEAF)
    fake_driver.inject("alloc", "out of memory")
    with pytest.raises(PyCudaDigestUnavailable, match="scratch allocation"):
        _digest(backend, buf)
    backend.free(buf)


def test_fake_module_load_is_as_strict_as_the_driver(fake_driver: Any) -> None:
    # The old fake "compiled" any source; the driver loads only an image for this GPU.
    from vramcore import kernels
    from vramcore.kernels import _nvrtc

    fake_driver.primary_contexts[0].push()
    try:
        with pytest.raises(fake_driver.LogicError, match="image is invalid"):
            fake_driver.module_from_buffer(kernels.kernel_source().encode())
        text, _ = _nvrtc.shipped_ptx()
        module = fake_driver.module_from_buffer(text.encode() + b"\0")
        with pytest.raises(fake_driver.LogicError, match="named symbol not found"):
            module.get_function("vramcore_leaf_hash")
        if _nvrtc.find_nvrtc():
            cubin, _log = _nvrtc.nvrtc_compile(kernels.kernel_source(), "sm_80")
            with pytest.raises(fake_driver.LogicError, match="no kernel image is available"):
                fake_driver.module_from_buffer(cubin)  # the fake device is sm_90
    finally:
        fake_driver.Context.pop()


def test_fake_launch_checks_what_the_driver_checks(fake_driver: Any) -> None:
    import numpy as np

    from vramcore import kernels
    from vramcore.kernels import _nvrtc

    fake_driver.primary_contexts[0].push()
    try:
        text, _ = _nvrtc.shipped_ptx()
        fn = fake_driver.module_from_buffer(text.encode() + b"\0").get_function(
            kernels.LEVEL_KERNEL
        )
        src, dst = fake_driver.mem_alloc(64), fake_driver.mem_alloc(32)
        ok = (src, np.uint64(2), dst)
        with pytest.raises(fake_driver.LaunchError, match="too many resources"):
            fn(*ok, block=(kernels.MAX_BLOCK + 1, 1, 1), grid=(1, 1))
        with pytest.raises(fake_driver.LogicError, match="takes 3 arguments"):
            fn(src, dst, block=(32, 1, 1), grid=(1, 1))
        with pytest.raises(TypeError, match="invalid type"):
            fn(src, 2, dst, block=(32, 1, 1), grid=(1, 1))
        with pytest.raises(fake_driver.LogicError, match="invalid argument"):
            fn(*ok, block=(32, 1, 1), grid=(0, 1))
        fn(*ok, block=(32, 1, 1), grid=(1, 1))
        src.free()
        dst.free()
    finally:
        fake_driver.Context.pop()


def test_fake_free_memory_moves_in_pages_as_the_driver_reports_it(fake_driver: Any) -> None:
    # The old fake took 4 KiB off free memory for a 4 KiB allocation; the driver takes a page.
    page = 2 << 20  # conftest.PAGE

    fake_driver.primary_contexts[0].push()
    try:
        free, total = fake_driver.mem_get_info()
        alloc = fake_driver.mem_alloc(4096)
        assert free - fake_driver.mem_get_info()[0] == page
        with pytest.raises(fake_driver.MemoryError, match="out of memory"):
            fake_driver.mem_alloc(free - 4096)  # fits byte-wise, not page-wise
        alloc.free()
        assert fake_driver.mem_get_info() == (free, total)
    finally:
        fake_driver.Context.pop()
