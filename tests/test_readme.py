"""The README as a person follows it: its example runs, its tables say what the code does.

- The "Using it" example runs as written, in a process of its own, on the mock with the audit
  chain (the environment a reader would set: a token, an audit log, ``VRAMCORE_ALLOCATOR``).
- The configuration table lists every setting the core and the workspace's plugins declare
  (``vramcore config`` shows the same list), and nothing else.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from vramcore._config import Configuration, declared_settings
from vramcore.plugins import get_plugin_manager
from vramcore.safetensors import write_safetensors

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TOKEN = "XFD0WhKBKLs1YV3vGiniD6x7bbu0pWpptZgy2yt8VOo"


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else len(README)]


def _python_block(section: str) -> str:
    begin = section.index("```python\n") + len("```python\n")
    return section[begin : section.index("```\n", begin)]


def test_the_using_it_example_runs_as_written(tmp_path: Path) -> None:
    code = _python_block(_section("Using it"))
    with (tmp_path / "model-00001.safetensors").open("wb") as fh:
        write_safetensors(fh, {"w": ("F32", [4096], os.urandom(4 * 4096))})
    (tmp_path / "vramcore.toml").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRAMCORE_")}
    env |= {
        "VRAMCORE_WORKER_TOKEN": TOKEN,
        "VRAMCORE_ALLOCATOR": "mock",
        "VRAMCORE_AUDIT_LOG": str(tmp_path / "audit"),
        "TMPDIR": str(tmp_path),
    }
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    size = (tmp_path / "model-00001.safetensors").stat().st_size
    assert proc.stdout == f"model-00001.safetensors: {size} bytes verified, 1 tensors\n"
    assert (tmp_path / "audit").is_dir()  # it ran audited


def test_the_configuration_table_lists_every_setting() -> None:
    declared = {setting.variable for setting, _ in declared_settings(get_plugin_manager()).values()}
    table = _section("Configuration")
    listed = set(re.findall(r"^\| `(VRAMCORE_[A-Z0-9_]+)`", table, re.MULTILINE))
    assert declared - listed == set(), "settings missing from the README's configuration table"
    assert listed - declared == set(), "README lists variables no plugin declares"


def test_the_configuration_example_is_a_valid_file(tmp_path: Path) -> None:
    section = _section("Configuration")
    begin = section.index("```toml\n") + len("```toml\n")
    path = tmp_path / "vramcore.toml"
    path.write_text(section[begin : section.index("```\n", begin)])
    config = Configuration.load({"VRAMCORE_CONFIG": str(path)})
    config.check(declared_settings(get_plugin_manager()))  # raises on a bad key or value
    assert config.file_value("allocator") == ("cupy", path)


def test_the_contents_list_every_section_in_order() -> None:
    headings = re.findall(r"^## (.+)$", README, re.MULTILINE)
    contents = _section("Contents")
    listed = re.findall(r"^- \[(.+?)\]\(#([a-z0-9-]+)\)$", contents, re.MULTILINE)
    assert [name for name, _ in listed] == [h for h in headings if h != "Contents"]
    for name, anchor in listed:
        assert anchor == re.sub(r"[^\w\- ]", "", name.lower()).replace(" ", "-")
