"""The cupy backend without a GPU: its logic on a fake CUDA runtime, its probe, its plugin.

The fake (``conftest.FakeCuda``) keeps "device" memory in host memory, queues copies and
kernel launches on honest streams, and runs the real digest kernels built for the host, so
everything but the driver itself is exercised here: the ``BackendContract`` suite, the device
digest through the plugin hook, pinned staging and event handles, the strict pointer checks,
and the manager end to end.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import vramcore_allocator_cupy as plugin
from vramcore_allocator_cupy import CupyBackend, why_not
from vramcore_allocator_cupy._cuda import (
    MEMORY_DEVICE,
    MEMORY_HOST,
    MEMORY_MANAGED,
    MEMORY_UNREGISTERED,
    CudaError,
)
from vramcore_allocator_cupy.testing import FakeCuda

from vramcore import VramManager, kernels
from vramcore.backend import DeviceBuffer, MemoryKind
from vramcore.digest import hash_leaves, merkle_root
from vramcore.errors import (
    AllocationFailed,
    DeviceDigestUnavailable,
    InsufficientVram,
    InvalidInput,
    PolicyViolation,
    SealVerificationFailed,
    VramError,
)
from vramcore.testing import TEST_TOKEN, BackendContract, CapturePlugin, CapturingSink

LEAF = 65536


class FakeFaults:
    """:class:`vramcore.testing.FaultInjector` over a :class:`FakeCuda`."""

    def __init__(self, fake: FakeCuda) -> None:
        self.fake = fake

    def _arm(self, op: str, reason: str) -> None:
        self.fake.fail[op] = CudaError(999, f"cudaErrorInjected ({reason})", op)

    def fail_next_allocation(self, reason: str = "injected") -> None:
        self._arm("malloc", reason)

    def fail_next_copy(self, reason: str = "injected") -> None:
        self._arm("memcpy_h2d", reason)

    def fail_next_wait(self, reason: str = "injected") -> None:
        self._arm("stream_synchronize", reason)

    def fail_next_read(self, reason: str = "injected") -> None:
        self._arm("memcpy_d2h", reason)

    def fail_next_free(self, reason: str = "injected") -> None:
        self._arm("free", reason)


class TestCupyBackendOnFakeCuda(BackendContract):
    """The conformance suite, on the fake runtime (the GPU run repeats it on real CUDA)."""

    @pytest.fixture
    def fake(self, fake_cuda: FakeCuda) -> FakeCuda:
        return fake_cuda

    @pytest.fixture
    def backend(self, fake_backend: CupyBackend) -> CupyBackend:
        return fake_backend

    @pytest.fixture
    def digest_plugins(self) -> list[object]:
        return [plugin]

    @pytest.fixture
    def fault_injector(self, fake: FakeCuda) -> FakeFaults:
        return FakeFaults(fake)


# -- probe ------------------------------------------------------------------------------------


def _raise(exc: BaseException) -> Any:
    def fn() -> Any:
        raise exc

    return fn


def test_probe_without_cupy() -> None:
    reason = why_not(import_cupy=_raise(ImportError("No module named 'cupy'")))
    assert reason is not None
    assert "CuPy is not installed" in reason


def test_probe_with_a_broken_cupy() -> None:
    reason = why_not(import_cupy=_raise(RuntimeError("libcudart.so.12: cannot open\x1b[31m")))
    assert reason is not None
    assert reason.startswith("CuPy failed to import: RuntimeError")
    assert "\x1b" not in reason


def _api_failing(name: str, driver: int) -> Any:
    class Api(FakeCuda):
        def device_count(self) -> int:
            raise CudaError(35, name, "cudaGetDeviceCount")

        def driver_version(self) -> int:
            return driver

    return lambda: Api(None)


def test_probe_without_a_driver() -> None:
    reason = why_not(lambda: None, _api_failing("cudaErrorInsufficientDriver", 0))
    assert reason == "no CUDA driver found (no NVIDIA GPU or driver on this machine)"


def test_probe_with_an_old_driver_names_both_versions() -> None:
    reason = why_not(lambda: None, _api_failing("cudaErrorInsufficientDriver", 12020))
    assert reason is not None
    assert "driver (12.2) is older than CuPy's CUDA runtime (12.9)" in reason
    assert "cuda13x" in reason


def test_probe_with_no_device() -> None:
    assert "no CUDA device found" in str(
        why_not(lambda: None, _api_failing("cudaErrorNoDevice", 13000))
    )
    assert "CUDA_VISIBLE_DEVICES" in str(why_not(lambda: None, lambda: FakeCuda(None, devices=0)))


def test_probe_passes_with_a_device() -> None:
    assert why_not(lambda: None, lambda: FakeCuda(None)) is None


def test_probe_on_this_machine_never_raises() -> None:
    """Here, CuPy is either missing or present without a driver: either way, a reason."""
    reason = why_not()
    if reason is None:
        pytest.skip("this machine has a usable GPU: the GPU tests cover it")
    assert reason.startswith(("CuPy is not installed", "no CUDA driver", "the CUDA driver", "CuPy"))


def test_backend_on_a_machine_without_cuda_raises_a_vram_error() -> None:
    api = _api_failing("cudaErrorInsufficientDriver", 0)()
    with pytest.raises(VramError, match="CUDA is not usable"):
        CupyBackend(api, nvml=False)


# -- plugin and CLI without a GPU -------------------------------------------------------------


def test_plugin_registers_the_cupy_backend() -> None:
    (spec,) = plugin.vramcore_allocator_backends()
    assert spec.name == "cupy"
    assert spec.priority > 0
    assert "./plugins/allocator_cupy[cuda12x]" in spec.install_hint


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from vramcore._cli.cli import main

    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_plugins_reports_cupy_not_viable_with_the_reason(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    if why_not() is None:
        pytest.skip("a usable GPU is here")
    monkeypatch.delenv("VRAMCORE_PLUGINS", raising=False)
    code, out, err = _cli(["plugins", "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    (row,) = [b for b in data["backends"] if b["name"] == "cupy"]
    assert row["viable"] is False
    assert row["reason"] == why_not()
    assert "Traceback" not in out + err


def test_cli_devices_with_cupy_says_why_without_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    if why_not() is None:
        pytest.skip("a usable GPU is here")
    code, out, err = _cli(["devices", "--allocator", "cupy"], capsys)
    assert code == 2
    assert "cupy" in err
    assert why_not() in err  # type: ignore[operator]
    assert "Traceback" not in out + err


def test_docs() -> None:
    from vramcore.testing import undocumented_public_names

    for name in (
        "vramcore_allocator_cupy",
        "vramcore_allocator_cupy._backend",
        "vramcore_allocator_cupy._cuda",
        "vramcore_allocator_cupy._memory",
        "vramcore_allocator_cupy._nvml",
        "vramcore_allocator_cupy._probe",
        "vramcore_allocator_cupy.testing",
    ):
        assert undocumented_public_names(name) == [], name


# -- the backend on the fake runtime ---------------------------------------------------------


def test_device_info_reports_the_memory_model(fake_cuda: FakeCuda) -> None:
    backend = CupyBackend(fake_cuda, nvml=False)
    (info,) = backend.devices()
    assert info.name == "NVIDIA H100 80GB HBM3"
    assert info.compute_capability == (9, 0)
    assert info.uuid == "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f"
    assert info.pci_bus_id == "00000000:1b:00.0"
    assert info.free_bytes == fake_cuda.capacity
    # HMM: pageable access without the host page tables, reported as such.
    assert (info.pageable_memory_access, info.host_page_tables) == (True, False)
    assert info.ecc_enabled is True
    assert not info.integrated
    fake_cuda.attrs.update({"PageableMemoryAccess": 1, "PageableMemoryAccessUsesHostPageTables": 1})
    fake_cuda.attrs["Integrated"] = 1
    (ats,) = backend.devices()
    assert (ats.pageable_memory_access, ats.host_page_tables, ats.integrated) == (True, True, True)
    backend.close()


@pytest.mark.parametrize(
    ("kind", "rule"), [(MEMORY_MANAGED, "managed"), (MEMORY_HOST, "host_memory")]
)
def test_allocation_that_is_not_device_memory_is_refused_and_freed(
    host_lib: Any, kind: int, rule: str
) -> None:
    fake = FakeCuda(host_lib, pointer_kind=kind)
    backend = CupyBackend(fake, nvml=False)
    with pytest.raises(PolicyViolation) as info:
        backend.allocate(0, 4096)
    assert info.value.rule == rule
    assert fake.mem == {}
    backend.close()


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (MEMORY_DEVICE, MemoryKind.DEVICE),
        (MEMORY_MANAGED, MemoryKind.MANAGED),
        (MEMORY_HOST, MemoryKind.HOST_MAPPED),
        (MEMORY_UNREGISTERED, MemoryKind.HOST),
        (77, MemoryKind.UNKNOWN),
    ],
)
def test_memory_kind_asks_the_driver_every_time(
    fake_cuda: FakeCuda, fake_backend: CupyBackend, kind: int, expected: MemoryKind
) -> None:
    buf = fake_backend.allocate(0, 4096)
    fake_cuda.pointer_kind = kind
    assert fake_backend.memory_kind(buf) is expected
    fake_cuda.pointer_kind = MEMORY_DEVICE
    fake_backend.free(buf)


def test_memory_kind_when_the_driver_cannot_tell(
    fake_cuda: FakeCuda, fake_backend: CupyBackend
) -> None:
    buf = fake_backend.allocate(0, 4096)
    fake_cuda.fail["pointer_type"] = CudaError(1, "cudaErrorInvalidValue", "x")
    assert fake_backend.memory_kind(buf) is MemoryKind.UNKNOWN
    fake_backend.free(buf)


def test_out_of_memory_is_insufficient_vram(fake_cuda: FakeCuda, fake_backend: CupyBackend) -> None:
    with pytest.raises(InsufficientVram) as info:
        fake_backend.allocate(0, fake_cuda.capacity + 1)
    assert info.value.retriable
    fake_cuda.fail["malloc"] = CudaError(700, "cudaErrorIllegalAddress", "cudaMalloc")
    with pytest.raises(AllocationFailed, match="cudaErrorIllegalAddress"):
        fake_backend.allocate(0, 4096)


def test_pinned_staging_copies_are_asynchronous_until_waited(
    fake_cuda: FakeCuda, fake_backend: CupyBackend
) -> None:
    buf = fake_backend.allocate(0, 8192)
    with fake_backend.staging(2, 4096) as (a, b):
        assert len(fake_cuda.pinned) == 2
        a[:] = b"\x11" * 4096
        handle = fake_backend.copy_in(buf, 0, a)
        assert handle is not None  # an event, not a synchronous copy
        ptr = next(iter(fake_cuda.mem))
        assert fake_cuda.mem[ptr][1].raw[:4] == b"\x00" * 4  # still queued
        handle.wait()
        handle.wait()  # twice is fine
        assert fake_cuda.mem[ptr][1].raw[:4096] == b"\x11" * 4096
        b[:] = b"\x22" * 4096
        h2 = fake_backend.copy_in(buf, 4096, b[:100])
        assert h2 is not None
        h2.wait()
    out = bytearray(8192)
    fake_backend.read_into(buf, 0, memoryview(out))
    assert out[:4096] == b"\x11" * 4096
    assert out[4096:4196] == b"\x22" * 100
    # The pinned buffers are kept for the next load, not freed and re-pinned.
    with fake_backend.staging(2, 4096):
        pass
    assert fake_cuda.calls.count("host_alloc") == 2
    fake_backend.free(buf)


def test_staging_falls_back_to_pageable_memory(
    fake_cuda: FakeCuda, fake_backend: CupyBackend
) -> None:
    fake_cuda.fail["host_alloc"] = CudaError(2, "cudaErrorMemoryAllocation", "cudaHostAlloc")
    buf = fake_backend.allocate(0, 4096)
    with fake_backend.staging(2, 4096) as (a, _b):
        a[:] = b"\x33" * 4096
        assert fake_backend.copy_in(buf, 0, a) is None  # pageable: synchronous
    out = bytearray(4096)
    fake_backend.read_into(buf, 0, memoryview(out))
    assert out == b"\x33" * 4096
    assert fake_cuda.pinned == {}
    fake_backend.free(buf)


def test_staging_keeps_at_most_its_budget(host_lib: Any) -> None:
    fake = FakeCuda(host_lib)
    backend = CupyBackend(fake, nvml=False, staging_keep=8192)
    with backend.staging(3, 4096):
        assert len(fake.pinned) == 3
    assert len(fake.pinned) == 2
    backend.close()
    assert fake.pinned == {}


def test_a_failed_copy_completion_raises_from_wait(
    fake_cuda: FakeCuda, fake_backend: CupyBackend
) -> None:
    buf = fake_backend.allocate(0, 4096)
    with fake_backend.staging(1, 4096) as (a,):
        handle = fake_backend.copy_in(buf, 0, a)
        assert handle is not None
        fake_cuda.fail["event_synchronize"] = CudaError(700, "cudaErrorIllegalAddress", "x")
        with pytest.raises(AllocationFailed, match="copy to the GPU failed"):
            handle.wait()
        with pytest.raises(AllocationFailed):
            handle.wait()  # the same error again
    fake_backend.free(buf)


def test_device_digest_through_the_hook(fake_cuda: FakeCuda, fake_backend: CupyBackend) -> None:
    data = bytes(range(256)) * 1000 + b"tail"
    buf = fake_backend.allocate(0, len(data))
    fake_backend.copy_in(buf, 0, memoryview(data))
    got = plugin.vramcore_device_digest(fake_backend, buf, LEAF, None, None)
    assert got is not None
    leaves = hash_leaves(data, LEAF)
    assert got.root == merkle_root(leaves)
    assert bytes(got.leaves) == b"".join(leaves)
    part = plugin.vramcore_device_digest(fake_backend, buf, LEAF, (1, 3), None)
    assert part is not None
    assert (part.root, part.first_leaf, bytes(part.leaves)) == (None, 1, b"".join(leaves[1:3]))
    assert len(fake_cuda.mem) == 1, "digest scratch memory left allocated"
    fake_backend.free(buf)


def test_the_hook_defers_for_other_backends(fake_backend: CupyBackend, mock_backend: Any) -> None:
    buf = mock_backend.allocate(0, 10)
    assert plugin.vramcore_device_digest(mock_backend, buf, LEAF, None, None) is None
    foreign = DeviceBuffer(device=0, nbytes=10, backend="mock", native=None)
    assert plugin.vramcore_device_digest(fake_backend, foreign, LEAF, None, None) is None


@pytest.mark.parametrize("where", ["malloc", "launch:vramcore_leaf_hashes", "memcpy_d2h"])
def test_a_failed_digest_frees_its_scratch(
    fake_cuda: FakeCuda, fake_backend: CupyBackend, where: str
) -> None:
    data = bytes(5 * LEAF)
    buf = fake_backend.allocate(0, len(data))
    fake_backend.copy_in(buf, 0, memoryview(data))
    fake_cuda.fail[where] = CudaError(700, "cudaErrorLaunchFailure", where)
    with pytest.raises(VramError, match="device digest failed"):
        fake_backend.digest(buf, LEAF)
    assert len(fake_cuda.mem) == 1
    fake_backend.free(buf)
    assert fake_cuda.mem == {}


def test_no_pointer_in_reprs_or_errors(fake_cuda: FakeCuda, fake_backend: CupyBackend) -> None:
    buf = fake_backend.allocate(0, 4096)
    (ptr,) = fake_cuda.mem
    texts = [repr(buf), repr(buf.native), repr(fake_backend)]
    with fake_backend.staging(1, 4096) as (a,):
        handle = fake_backend.copy_in(buf, 0, a)
        texts.append(repr(handle))
        assert handle is not None
        handle.wait()
    fake_cuda.fail["free"] = CudaError(1, "cudaErrorInvalidValue", "cudaFree")
    with pytest.raises(AllocationFailed) as info:
        fake_backend.free(buf)
    texts.append(str(info.value))
    fake_backend.free(buf)  # the failed free left it allocated; now it goes
    with pytest.raises(InvalidInput) as again:
        fake_backend.free(buf)
    texts.append(str(again.value))
    for text in texts:
        assert str(ptr) not in text and f"{ptr:x}" not in text.lower(), text
        assert not re.search(r"0x[0-9a-f]{6,}", text), text


def test_closed_backend_refuses_and_frees_everything(host_lib: Any) -> None:
    fake = FakeCuda(host_lib)
    backend = CupyBackend(fake, nvml=False)
    buf = backend.allocate(0, 4096)
    with backend.staging(1, 4096):
        pass
    backend.copy_in(buf, 0, memoryview(b"x" * 10))
    backend.close()
    backend.close()
    assert fake.mem == {} and fake.pinned == {} and fake.streams == {}
    with pytest.raises(VramError, match="closed"):
        backend.allocate(0, 10)
    with pytest.raises(VramError):
        backend.read_into(buf, 0, memoryview(bytearray(1)))


# -- the manager end to end on the fake runtime ----------------------------------------------


@pytest.fixture
def manager(fake_cuda: FakeCuda, fake_backend: CupyBackend, make_plugin_manager: Any) -> Any:
    fake_cuda.attrs["PageableMemoryAccess"] = 0  # keep the policy out of this test
    sink = CapturingSink()
    pm = make_plugin_manager(plugin, CapturePlugin(sink), mock=False)
    with VramManager(TEST_TOKEN, allocator=fake_backend, plugin_manager=pm) as m:
        m.sink = sink
        yield m


def test_seal_verify_and_tamper_end_to_end(manager: Any, fake_cuda: FakeCuda) -> None:
    data = bytes(range(256)) * 4096 + b"!"  # 1 MiB + 1: 17 leaves
    shard = manager.seal_model(data, shard_id="s")
    assert shard.digest == merkle_root(hash_leaves(data, LEAF)).hex()
    manager.verify_sealed(shard)
    (ptr,) = fake_cuda.mem
    vram = fake_cuda.mem[ptr][1]
    vram[5 * LEAF + 7] = bytes([vram[5 * LEAF + 7][0] ^ 1])  # a bit flip in leaf 5
    with pytest.raises(SealVerificationFailed) as info:
        manager.verify_sealed(shard)
    assert (5 * LEAF, 6 * LEAF) in info.value.corrupted_ranges


def test_seal_file_through_pinned_staging(
    manager: Any, fake_cuda: FakeCuda, tmp_path: Path
) -> None:
    data = bytes(range(251)) * 20000
    path = tmp_path / "w.bin"
    path.write_bytes(data)
    shard = manager.seal_file(path)
    assert shard.digest == merkle_root(hash_leaves(data, LEAF)).hex()
    assert "event_record" in fake_cuda.calls, "file chunks should go through pinned staging"
    manager.verify_sealed(shard)


# -- the real CuPy adapter, as far as it goes without a driver --------------------------------


def _real_cupy() -> Any:
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed here")
    if why_not() is None:
        pytest.skip("a usable GPU is here: the GPU tests cover the adapter")
    return cupy


def test_adapter_names_exist_in_the_installed_cupy() -> None:
    """Every ``cupy.cuda.runtime`` name the adapter calls exists (a typo fails here)."""
    cupy = _real_cupy()
    import inspect

    from vramcore_allocator_cupy import _cuda

    source = inspect.getsource(_cuda.CupyCuda)
    names = set(re.findall(r"self\._rt\.([A-Za-z_]\w*)", source))
    assert {"malloc", "pointerGetAttributes", "memcpyAsync", "hostAlloc"} <= names
    missing = [n for n in sorted(names) if not hasattr(cupy.cuda.runtime, n)]
    assert missing == []
    for path in ("cuda.Device", "cuda.Stream", "RawModule", "cuda.driver.CUDADriverError"):
        obj: Any = cupy
        for part in path.split("."):
            obj = getattr(obj, part)
    assert hasattr(cupy.cuda.compiler, "CompileException")
    for attr in _cuda.ATTRIBUTES:
        assert hasattr(cupy.cuda.runtime, f"cudaDevAttr{attr}"), attr


def test_adapter_maps_the_missing_driver_to_cuda_errors() -> None:
    _real_cupy()
    from vramcore_allocator_cupy._cuda import CupyCuda

    api = CupyCuda()
    assert api.driver_version() == 0
    with pytest.raises(CudaError) as info:
        api.device_count()
    assert info.value.name == "cudaErrorInsufficientDriver"
    assert "failed: cudaErrorInsufficientDriver" in str(info.value)
    with pytest.raises(CudaError):
        api.malloc(0, 4096)


def test_no_room_for_digest_scratch_is_a_typed_unavailable_digest(
    fake_cuda: FakeCuda, fake_backend: CupyBackend
) -> None:
    buf = fake_backend.allocate(0, fake_cuda.capacity - 100)  # the GPU is (nearly) full
    with pytest.raises(plugin.CupyDigestUnavailable, match="no room"):
        plugin.vramcore_device_digest(fake_backend, buf, LEAF, None, None)
    assert len(fake_cuda.mem) == 1
    fake_backend.free(buf)


@pytest.mark.parametrize(
    "error",
    [
        OSError("libnvrtc.so.13: cannot open shared object file"),
        RuntimeError("NVRTC_ERROR_COMPILATION: catastrophic error: cannot open source file"),
        ImportError("cupy_backends.cuda.libs.nvrtc"),
    ],
    ids=["no-libnvrtc", "no-headers", "no-binding"],
)
def test_a_compile_failure_of_any_kind_is_a_typed_unavailable_digest(
    fake_cuda: FakeCuda, fake_backend: CupyBackend, error: Exception
) -> None:
    # The old fake raised only CudaError, so a compile failure of another kind (as CuPy's
    # compiler raises them) escaped the backend bare and never showed here.
    fake_cuda.compile_error = error
    buf = fake_backend.allocate(0, 3 * LEAF)
    with pytest.raises(plugin.CupyDigestUnavailable, match=type(error).__name__) as info:
        plugin.vramcore_device_digest(fake_backend, buf, LEAF, None, None)
    assert isinstance(info.value, DeviceDigestUnavailable)
    fake_cuda.compile_error = None
    assert plugin.vramcore_device_digest(fake_backend, buf, LEAF, None, None) is not None
    fake_backend.free(buf)


def test_a_launch_failure_of_any_kind_is_a_typed_unavailable_digest(
    fake_cuda: FakeCuda, fake_backend: CupyBackend
) -> None:
    buf = fake_backend.allocate(0, 3 * LEAF)
    fake_cuda.fail[f"launch:{kernels.LEAF_KERNEL}"] = RuntimeError("CUDA_ERROR_LAUNCH_FAILED")
    with pytest.raises(plugin.CupyDigestUnavailable, match="CUDA_ERROR_LAUNCH_FAILED"):
        plugin.vramcore_device_digest(fake_backend, buf, LEAF, None, None)
    assert len(fake_cuda.mem) == 1, "scratch memory freed after the failed launch"
    fake_backend.free(buf)


def test_fake_launch_checks_what_the_driver_checks(fake_cuda: FakeCuda) -> None:
    # The old fake launched anything: before a load, with any block, any argument count.
    stream = fake_cuda.stream_create(0)
    args = (0, 1, 0)
    with pytest.raises(CudaError, match="InvalidResourceHandle"):
        fake_cuda.launch(0, kernels.LEVEL_KERNEL, 1, 32, args, stream)
    fake_cuda.load_kernels(0)
    with pytest.raises(CudaError, match="LaunchOutOfResources"):
        fake_cuda.launch(0, kernels.LEVEL_KERNEL, 1, kernels.MAX_BLOCK + 1, args, stream)
    with pytest.raises(CudaError, match="argument count"):
        fake_cuda.launch(0, kernels.LEVEL_KERNEL, 1, 32, args[:2], stream)
    with pytest.raises(CudaError, match="InvalidConfiguration"):
        fake_cuda.launch(0, kernels.LEVEL_KERNEL, 0, 32, args, stream)
    fake_cuda.stream_destroy(0, stream)


def test_sampled_leaves_in_one_launch(fake_cuda: FakeCuda, fake_backend: CupyBackend) -> None:
    data = bytes(range(256)) * (9 * LEAF // 256) + b"tail"
    leaves = hash_leaves(data, LEAF)
    buf = fake_backend.allocate(0, len(data))
    fake_backend.copy_in(buf, 0, memoryview(data))
    plan = kernels.SampledPlan(method="indices", indices_seconds=0.0, full_seconds=0.0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "sampled_plan", lambda n, k, size: plan)
        fake_cuda.calls.clear()
        got = plugin.vramcore_device_digest(fake_backend, buf, LEAF, None, [1, 5, 9])
    assert got.leaf_indices == (1, 5, 9) and got.root is None
    assert bytes(got.leaves) == leaves[1] + leaves[5] + leaves[9]
    assert [c for c in fake_cuda.calls if c.startswith("launch:")] == [
        f"launch:{kernels.INDEX_KERNEL}"
    ]
    with pytest.raises(InvalidInput):
        plugin.vramcore_device_digest(fake_backend, buf, LEAF, None, [9, 1])
    fake_backend.free(buf)
    assert len(fake_cuda.mem) == 0


def test_cli_without_cupy_names_what_to_install(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on a machine where CuPy was never installed (its import spec not found)."""
    import importlib.util

    from vramcore_allocator_cupy import _probe

    real = importlib.util.find_spec
    monkeypatch.setattr(
        _probe.importlib.util, "find_spec", lambda name, *a: None if name == "cupy" else real(name)
    )
    monkeypatch.delenv("VRAMCORE_PLUGINS", raising=False)
    code, out, err = _cli(["plugins", "--json"], capsys)
    assert code == 0, err
    (row,) = [b for b in json.loads(out)["backends"] if b["name"] == "cupy"]
    assert (row["viable"], row["reason"]) == (False, "CuPy is not installed")
    assert "./plugins/allocator_cupy[cuda12x]" in row["install_hint"]
    code, out, err = _cli(["devices", "--allocator", "cupy"], capsys)
    assert code == 2
    assert "CuPy is not installed" in err and "./plugins/allocator_cupy[cuda12x]" in err
    assert "Traceback" not in out + err


def test_fake_free_memory_moves_in_pages_as_cuda_reports_it(fake_cuda: FakeCuda) -> None:
    # The old fake took 4 KiB off free memory for a 4 KiB allocation; CUDA takes a page, so a
    # test asserting byte-exact free memory passed here and failed on a GPU.
    from vramcore_allocator_cupy.testing import PAGE

    free, total = fake_cuda.mem_info(0)
    ptr = fake_cuda.malloc(0, 4096)
    assert free - fake_cuda.mem_info(0)[0] == PAGE
    with pytest.raises(CudaError, match="MemoryAllocation"):
        fake_cuda.malloc(0, free - 4096)  # fits byte-wise, not page-wise
    fake_cuda.free(0, ptr)
    assert fake_cuda.mem_info(0) == (free, total)
