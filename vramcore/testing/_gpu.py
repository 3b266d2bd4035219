"""The namespaced ``vramcore_gpu`` marker: its tests are skipped, saying why, without a GPU."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

__all__ = ["GPU_MARKER", "pytest_collection_modifyitems", "pytest_configure"]

#: The namespaced marker of tests that need a real GPU (``@pytest.mark.vramcore_gpu``).
GPU_MARKER = "vramcore_gpu"


def _gpu_available() -> str | None:
    """``None`` when a CUDA GPU is visible, else why not (for the marker's skip)."""

    if os.environ.get("VRAMCORE_FORCE_GPU_TESTS") == "1":
        return None
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "no NVIDIA driver (nvidia-smi not found); run scripts/gpu-check on a GPU machine"
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"nvidia-smi failed: {exc}"
    if out.returncode != 0 or "GPU" not in out.stdout:
        return "nvidia-smi lists no GPU"
    return None


def pytest_configure(config: pytest.Config) -> None:
    """Register the namespaced ``vramcore_gpu`` marker (harmless to other projects)."""
    config.addinivalue_line(
        "markers", f"{GPU_MARKER}: needs a real CUDA GPU (vramcore; skipped with a reason)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``vramcore_gpu``, saying why, when no GPU is visible.

    Only tests carrying that marker are touched: other markers (a project's own ``gpu``)
    are left alone.
    """
    gpu_items = [item for item in items if item.get_closest_marker(GPU_MARKER)]
    if not gpu_items:
        return
    reason = _gpu_available()
    if reason is not None:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=f"{GPU_MARKER} test: {reason}"))
