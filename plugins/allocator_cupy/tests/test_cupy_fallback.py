"""The manager on the cupy backend when the digest kernels cannot run: seals and verifications
fall back to the host, typed and audited (``digest.fallback``), and are still checked.

On a GPU machine the kernels may fail to compile (no ``libnvrtc`` for this CUDA, no headers)
or a launch may fail half way through a digest; neither may escape bare, and neither may let
a seal or a verification pass without the bytes having been hashed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar

import pytest
import vramcore_allocator_cupy as plugin
from vramcore_allocator_cupy import CupyBackend
from vramcore_allocator_cupy._cuda import CudaError
from vramcore_allocator_cupy.testing import FakeCuda

from vramcore import VramManager, kernels
from vramcore.digest import hash_leaves, merkle_root
from vramcore.errors import IntegrityViolation, SealVerificationFailed
from vramcore.events import DigestFallback, SealRefused, VramSealed
from vramcore.testing import TEST_TOKEN, CapturePlugin, CapturingSink

LEAF = 65536
E = TypeVar("E")
DATA = bytes(range(1, 256)) * 1285  # 327,675 bytes, no zero byte: 5 leaves, the last short


class Rig:
    """A manager on the fake runtime, and what a test inspects afterwards."""

    def __init__(self, fake: FakeCuda, make_plugin_manager: Any) -> None:
        fake.attrs["PageableMemoryAccess"] = 0  # keep the policy out of these tests
        self.fake = fake
        self.sink = CapturingSink()
        self.backend = CupyBackend(fake, nvml=False)
        pm = make_plugin_manager(plugin, CapturePlugin(self.sink), mock=False)
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
        (ptr,) = self.fake.mem
        vram = self.fake.mem[ptr][1]
        vram[at] = bytes([vram[at][0] ^ 1])

    def assert_nothing_secret(self) -> None:
        """No token, device address or seal signature in any audit record."""
        secrets = {TEST_TOKEN}
        for ptr in [*self.fake.mem, *self.fake.pinned]:
            secrets |= {str(ptr), f"{ptr:x}", f"{ptr:X}"}
        for event in self.sink.events:
            text = event.to_json()
            leaked = [s for s in secrets if s in text]
            assert leaked == [], f"{event.event_type} leaks {leaked}"


@pytest.fixture
def rig(fake_cuda: FakeCuda, make_plugin_manager: Any) -> Iterator[Rig]:
    r = Rig(fake_cuda, make_plugin_manager)
    with r.manager:
        yield r
    r.backend.close()


COMPILE_ERRORS = [
    OSError("libnvrtc.so.13: cannot open shared object file: No such file or directory"),
    RuntimeError("NVRTC_ERROR_COMPILATION: catastrophic error: cannot open source file"),
    CudaError(218, "cudaErrorInvalidPtx", "cuModuleLoadData"),
]


@pytest.mark.parametrize("error", COMPILE_ERRORS, ids=["no-libnvrtc", "no-headers", "bad-ptx"])
def test_a_seal_whose_kernels_do_not_compile_is_sealed_on_the_host_and_audited(
    rig: Rig, error: Exception
) -> None:
    rig.fake.compile_error = error
    shard = rig.manager.seal_model(DATA, shard_id="s")
    assert shard.digest == merkle_root(hash_leaves(DATA, LEAF)).hex()
    assert not any(c.startswith("launch:") for c in rig.fake.calls), "nothing ran on the device"
    (event,) = rig.fallbacks("seal")
    assert event.backend == "cupy"
    assert event.shard_id == "s"
    reason = event.reason
    assert reason.startswith("cupy backend: the digest kernels do not load on GPU 0")
    assert type(error).__name__ in reason  # the typed reason, not a bare "failed"
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


def test_the_cross_check_applies_when_the_kernels_stop_compiling(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seal that falls back to the host still compares VRAM with the staged bytes."""
    rig.manager.seal_model(DATA, shard_id="first")  # the device answered: later seals sample
    assert rig.fallbacks("seal") == []
    rig.fake.compile_error = OSError("libnvrtc.so.13: cannot open shared object file")
    copy = rig.fake.memcpy_async

    def lost_uploads(
        device: int, dst: int, src: int, nbytes: int, to_device: bool, stream: int
    ) -> None:
        if not to_device:  # read-backs work; every copy to the device is lost
            copy(device, dst, src, nbytes, to_device, stream)

    monkeypatch.setattr(rig.fake, "memcpy_async", lost_uploads)
    with pytest.raises(IntegrityViolation, match="cross-check failed: the host digest") as info:
        rig.manager.seal_model(DATA, shard_id="second")
    assert info.value.reason == "cross_check"
    assert [e.shard_id for e in rig.of(VramSealed)] == ["first"]
    (refused,) = rig.of(SealRefused)
    assert refused.shard_id == "second"
    assert refused.reason == "cross_check"
    rig.assert_nothing_secret()


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("CUDA_ERROR_LAUNCH_FAILED: unspecified launch failure"),
        CudaError(719, "cudaErrorLaunchFailure", f"launch of {kernels.LEVEL_KERNEL}"),
    ],
    ids=["any-kind", "cuda-error"],
)
def test_a_launch_that_fails_mid_verify_falls_back_typed_and_audited(
    rig: Rig, error: Exception
) -> None:
    shard = rig.manager.seal_model(DATA, shard_id="s")
    rig.fake.calls.clear()
    # The leaf hashes launch and run; the tree level after them fails.
    rig.fake.fail[f"launch:{kernels.LEVEL_KERNEL}"] = error
    rig.manager.verify_sealed(shard)  # hashed on the host instead: the bytes are intact
    assert f"launch:{kernels.LEAF_KERNEL}" in rig.fake.calls
    assert f"launch:{kernels.LEVEL_KERNEL}" in rig.fake.calls
    (event,) = rig.fallbacks("verify")
    assert event.backend == "cupy"
    assert "cupy backend: device digest failed on GPU 0" in event.reason
    assert type(error).__name__ in event.reason
    assert len(rig.fake.mem) == 1, "the digest's scratch memory was freed"
    # Never a silent pass: the same failure over tampered bytes still fails the check.
    rig.flip(LEAF + 1)
    rig.fake.fail[f"launch:{kernels.LEVEL_KERNEL}"] = error
    with pytest.raises(SealVerificationFailed) as info:
        rig.manager.verify_sealed(shard)
    assert info.value.reason == "digest"
    assert len(rig.fallbacks("verify")) == 2
    rig.assert_nothing_secret()
