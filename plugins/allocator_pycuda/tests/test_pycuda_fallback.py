"""The manager on the pycuda backend when the digest kernels cannot run: seals and
verifications fall back to the host, typed and audited (``digest.fallback``), and are still
checked.

On a GPU machine the kernels may fail to build (no NVRTC and no shipped PTX), the driver may
refuse the image, or a launch may fail half way through a digest; none of these may escape
bare, and none may let a seal or a verification pass without the bytes having been hashed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
import vramcore_allocator_pycuda
from vramcore_allocator_pycuda import DriverApi, PyCudaBackend, _kernels

from vramcore import VramManager
from vramcore.digest import hash_leaves, merkle_root
from vramcore.errors import IntegrityViolation, SealVerificationFailed
from vramcore.events import DigestFallback, SealRefused, VramSealed
from vramcore.kernels import _nvrtc
from vramcore.kernels._nvrtc import KernelCompileError
from vramcore.testing import TEST_TOKEN, CapturePlugin, CapturingSink

LEAF = 65536
E = TypeVar("E")
DATA = bytes(range(1, 256)) * 1285  # 327,675 bytes, no zero byte: 5 leaves, the last short


@pytest.fixture(autouse=True)
def shipped_ptx(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels as the shipped PTX: the fake driver loads it at once, where an NVRTC
    compile per backend costs about 2 s (NVRTC is tested in tests/test_kernel_nvrtc.py)."""
    text, _digest = _nvrtc.shipped_ptx()
    image = _nvrtc.KernelImage(
        data=text.encode("ascii") + b"\0", kind="ptx", origin="shipped PTX compute_80"
    )
    monkeypatch.setattr(_kernels, "kernel_image", lambda *args: image)


class Rig:
    """A manager on the stand-in driver, and what a test inspects afterwards."""

    def __init__(self, api: DriverApi, driver: Any, make_plugin_manager: Any) -> None:
        self.driver = driver
        self.sink = CapturingSink()
        self.backend = PyCudaBackend(api)
        pm = make_plugin_manager(vramcore_allocator_pycuda, CapturePlugin(self.sink))
        self.manager = VramManager(
            TEST_TOKEN, allocator=self.backend, plugin_manager=pm, worker_id="t"
        )

    def fallbacks(self, operation: str) -> list[DigestFallback]:
        """The ``digest.fallback`` events of ``operation``."""
        return [
            e
            for e in self.sink.events
            if isinstance(e, DigestFallback) and e.operation == operation
        ]

    def of(self, kind: type[E]) -> list[E]:
        """The captured events of class ``kind``."""
        return [e for e in self.sink.events if isinstance(e, kind)]

    def flip(self, at: int) -> None:
        """Flip one bit of the shard's bytes in "VRAM"."""
        (alloc,) = self.driver.allocations.values()
        alloc.memory[at] = bytes([alloc.memory[at][0] ^ 1])

    def assert_nothing_secret(self) -> None:
        """No token or device/host address in any audit record."""
        secrets = {TEST_TOKEN}
        addresses = [*self.driver.allocations, *(p.address() for p in self.driver.pinned)]
        for ptr in addresses:
            secrets |= {str(ptr), f"{ptr:x}", f"{ptr:X}"}
        for event in self.sink.events:
            text = event.to_json()
            leaked = [s for s in secrets if s in text]
            assert leaked == [], f"{event.event_type} leaks {leaked}"


@pytest.fixture
def rig(fake_api: DriverApi, fake_driver: Any, make_plugin_manager: Any) -> Iterator[Rig]:
    r = Rig(fake_api, fake_driver, make_plugin_manager)
    with r.manager:
        yield r
    r.backend.close()


def _no_image(exc: Exception) -> Callable[..., Any]:
    def kernel_image(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return kernel_image


@pytest.mark.parametrize(
    "breakage",
    ["driver-refuses-image", "no-nvrtc-no-ptx", "loader-oserror"],
)
def test_a_seal_whose_kernels_do_not_compile_is_sealed_on_the_host_and_audited(
    rig: Rig, breakage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if breakage == "driver-refuses-image":
        rig.driver.compile_error = rig.driver.LogicError(
            "cuModuleLoadData failed: a PTX JIT compilation failed"
        )
        expected = "LogicError: cuModuleLoadData failed"
    elif breakage == "no-nvrtc-no-ptx":
        error = KernelCompileError("no NVRTC could be loaded and no PTX is shipped for sm_90")
        monkeypatch.setattr(_kernels, "kernel_image", _no_image(error))
        expected = "no NVRTC could be loaded"
    else:
        error = OSError("libnvrtc.so.12: cannot open shared object file")
        monkeypatch.setattr(_kernels, "kernel_image", _no_image(error))
        expected = "OSError: libnvrtc.so.12"
    shard = rig.manager.seal_model(DATA, shard_id="s")
    assert shard.digest == merkle_root(hash_leaves(DATA, LEAF)).hex()
    assert rig.driver.launches == [], "nothing ran on the device"
    (event,) = rig.fallbacks("seal")
    assert event.backend == "pycuda"
    assert event.shard_id == "s"
    reason = event.reason
    assert reason.startswith("pycuda backend: the digest kernels do not load on GPU 0")
    assert expected in reason
    assert event.severity.name == "WARNING"
    # Verification falls back too, and still hashes every byte: a flipped bit is caught.
    rig.manager.verify_sealed(shard)
    assert len(rig.fallbacks("verify")) == 1
    rig.flip(3 * LEAF + 9)
    with pytest.raises(SealVerificationFailed) as info:
        rig.manager.verify_sealed(shard)
    assert info.value.reason == "digest"
    assert (3 * LEAF, 4 * LEAF) in info.value.corrupted_ranges
    rig.assert_nothing_secret()


def test_the_cross_check_applies_when_the_device_declines(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seal that falls back to the host still compares VRAM with the staged bytes."""
    rig.manager.seal_model(DATA, shard_id="first")  # the device answered: later seals sample
    assert rig.fallbacks("seal") == []
    rig.driver.inject("launch", "an illegal memory access was encountered")
    lost = lambda *args: None  # noqa: E731 - every upload is lost; read-backs work
    monkeypatch.setattr(rig.driver, "memcpy_htod", lost)
    monkeypatch.setattr(rig.driver, "memcpy_htod_async", lost)
    with pytest.raises(IntegrityViolation, match="cross-check failed: the host digest") as info:
        rig.manager.seal_model(DATA, shard_id="second")
    assert info.value.reason == "cross_check"
    assert rig.driver.faults["launch"] == [], "the device was asked, and declined"
    assert [e.shard_id for e in rig.of(VramSealed)] == ["first"]
    (refused,) = rig.of(SealRefused)
    assert refused.reason == "cross_check"
    rig.assert_nothing_secret()


class SecondLaunchFails:
    """The stand-in's fault hook, armed so that the second launch from now on fails: the leaf
    hashes launch and run, the tree level after them does not."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        self.fault = driver.fault
        self.start = len(driver.launches)

    def arm(self) -> None:
        """Count launches from now on."""
        self.start = len(self.driver.launches)

    def __call__(self, kind: str) -> None:
        if kind == "launch" and len(self.driver.launches) > self.start:
            raise self.driver.LaunchError("cuLaunchKernel failed: unspecified launch failure")
        self.fault(kind)


def test_a_launch_that_fails_mid_verify_falls_back_typed_and_audited(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    shard = rig.manager.seal_model(DATA, shard_id="s")
    breaker = SecondLaunchFails(rig.driver)
    monkeypatch.setattr(rig.driver, "fault", breaker)
    rig.manager.verify_sealed(shard)  # hashed on the host instead: the bytes are intact
    assert len(rig.driver.launches) == breaker.start + 1, "one launch ran before the failure"
    (event,) = rig.fallbacks("verify")
    assert event.backend == "pycuda"
    assert "LaunchError: cuLaunchKernel failed: unspecified launch failure" in event.reason
    assert len(rig.driver.allocations) == 1, "the digest's scratch memory was freed"
    # Never a silent pass: the same failure over tampered bytes still fails the check.
    rig.flip(LEAF + 1)
    breaker.arm()
    with pytest.raises(SealVerificationFailed) as info:
        rig.manager.verify_sealed(shard)
    assert info.value.reason == "digest"
    assert len(rig.fallbacks("verify")) == 2
    rig.assert_nothing_secret()
