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
