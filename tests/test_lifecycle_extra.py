"""close() with shards in use, and seal_file's progress callback."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from vramcore.errors import InvalidInput


def test_close_waits_for_a_verified_block_in_another_thread(mock_manager: Any) -> None:
    shard = mock_manager.seal_model(b"w" * 70000, shard_id="busy")
    inside = threading.Event()
    leave = threading.Event()
    freed_while_inside: list[bool] = []

    def infer() -> None:
        with mock_manager.verified(shard) as buf:
            inside.set()
            leave.wait(5)
            freed_while_inside.append(buf.freed)

    worker = threading.Thread(target=infer)
    worker.start()
    assert inside.wait(5)
    closer = threading.Thread(target=mock_manager.close)
    closer.start()
    time.sleep(0.1)
    assert closer.is_alive(), "close() returned while a verified() block was open"
    leave.set()
    worker.join(5)
    closer.join(5)
    assert freed_while_inside == [False]
    assert mock_manager.used_vram() == 0


def test_close_inside_own_verified_block_is_refused(mock_manager: Any) -> None:
    shard = mock_manager.seal_model(b"w" * 70000, shard_id="mine")
    with mock_manager.verified(shard), pytest.raises(InvalidInput, match="verified"):
        mock_manager.close()
    mock_manager.close()
    assert mock_manager.used_vram() == 0


def test_seal_file_reports_progress_per_chunk(
    make_plugin_manager: Any, mock_backend: Any, tmp_path: Path
) -> None:
    from vramcore import VramManager
    from vramcore.testing import TEST_TOKEN

    path = tmp_path / "shard.bin"
    path.write_bytes(b"p" * (3 * 65536 + 10))
    seen: list[tuple[int, int]] = []
    with VramManager(
        TEST_TOKEN,
        allocator=mock_backend,
        plugin_manager=make_plugin_manager(),
        audit="disabled",
        chunk_bytes=65536,
    ) as vram:
        vram.seal_file(path, progress=lambda done, total: seen.append((done, total)))
    total = path.stat().st_size
    assert seen == [(65536, total), (131072, total), (196608, total), (total, total)]


@pytest.mark.slow
def test_seal_finishing_after_close_frees_its_buffer(
    make_plugin_manager: Any, mock_backend: Any
) -> None:
    from vramcore import VramManager
    from vramcore.errors import VramError
    from vramcore.testing import TEST_TOKEN, CapturePlugin, CapturingSink

    holder: list[Any] = []

    class CloseOnSealed(CapturingSink):
        """Closes the manager from another thread while the seal is being recorded."""

        def emit(self, event: Any) -> None:
            super().emit(event)
            if event.event_type == "vram.sealed":
                closer = threading.Thread(target=holder[0].close)
                closer.start()
                closer.join(5)

    sink = CloseOnSealed()
    manager = VramManager(
        TEST_TOKEN, allocator=mock_backend, plugin_manager=make_plugin_manager(CapturePlugin(sink))
    )
    holder.append(manager)
    with pytest.raises(VramError, match="closed while the shard was being sealed"):
        manager.seal_model(b"z" * 70000, shard_id="late")
    assert manager.used_vram() == 0
    assert mock_backend.live_allocations == 0
    assert sink.types()[-1] == "vram.deallocated"


def _seal_file_manager(make_plugin_manager: Any, mock_backend: Any) -> Any:
    from vramcore import VramManager
    from vramcore.testing import TEST_TOKEN

    return VramManager(
        TEST_TOKEN,
        allocator=mock_backend,
        plugin_manager=make_plugin_manager(),
        audit="disabled",
        chunk_bytes=65536,
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [("truncate", "shrank while it was loaded"), ("append", "grew while it was loaded")],
)
def test_file_changing_size_while_loading_is_refused(
    make_plugin_manager: Any, mock_backend: Any, tmp_path: Path, change: str, message: str
) -> None:
    from vramcore.errors import IntegrityViolation

    path = tmp_path / "moving.bin"
    path.write_bytes(b"m" * (4 * 65536))

    def meddle(done: int, total: int) -> None:
        if done == 65536:
            with path.open("r+b") as fh:
                if change == "truncate":
                    fh.truncate(2 * 65536)
                else:
                    fh.seek(0, 2)
                    fh.write(b"extra")

    with _seal_file_manager(make_plugin_manager, mock_backend) as vram:
        with pytest.raises(IntegrityViolation, match=message):
            vram.seal_file(path, progress=meddle)
        assert vram.used_vram() == 0
        assert mock_backend.live_allocations == 0


def test_safetensors_header_rewritten_before_loading_is_refused(
    make_plugin_manager: Any, mock_backend: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vramcore._loading
    from vramcore.errors import IntegrityViolation
    from vramcore.safetensors import read_header, write_safetensors

    path = tmp_path / "m.safetensors"
    with path.open("wb") as fh:
        write_safetensors(fh, {"alpha": ("U8", [70000], b"a" * 70000)})

    def read_then_rename(fh: Any, size: int) -> Any:
        tensors = read_header(fh, size)
        # Same length, other name: only the header changes, the file size does not.
        path.write_bytes(path.read_bytes().replace(b'"alpha"', b'"omega"', 1))
        return tensors

    monkeypatch.setattr(vramcore._loading, "read_header", read_then_rename)
    with _seal_file_manager(make_plugin_manager, mock_backend) as vram:
        with pytest.raises(IntegrityViolation, match="safetensors header"):
            vram.seal_file(path)
        assert vram.used_vram() == 0
        assert mock_backend.live_allocations == 0
