"""Configuration in one place: vramcore.toml, the environment and arguments, and their sources.

The library part (:mod:`vramcore._config`) is tested with files in the test's own directory;
the CLI part (``vramcore config`` / ``vramcore doctor``) with the plugins installed in the
workspace: the mock, the audit chain, tracing, the example sink and the CuPy plugin (whose
CUDA library is installed here, with no driver: the machine the doctor must explain).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from vramcore import Setting, hookimpl
from vramcore._cli.cli import main
from vramcore._config import Configuration, declared_settings
from vramcore.errors import ConfigError

TOKEN = "p9Rk2VwXq7LmZ4sT1bN8cJ6yH3fD0gAeUiOuK5rWz2E"
SETTINGS = {
    "allocator": (Setting(key="allocator", help="backend"), "vramcore"),
    "hash_workers": (
        Setting(key="hash_workers", help="threads", kind="int", minimum=1, maximum=1024),
        "vramcore",
    ),
    "strict_plugins": (Setting(key="strict_plugins", help="strict", kind="bool"), "vramcore"),
    "plugins": (Setting(key="plugins", help="allowlist", kind="list"), "vramcore"),
    "worker_token": (Setting(key="worker_token", help="secret", secret=True), "vramcore"),
    "audit_durability": (
        Setting(key="audit_durability", help="d", kind="choice", choices=("mixed", "batched")),
        "audit_chain",
    ),
}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load(tmp_path: Path, env: dict[str, str] | None = None) -> Configuration:
    """The files of ``tmp_path`` (``etc/vramcore.toml`` and ``project/vramcore.toml``)."""
    return Configuration.load(
        env or {}, cwd=tmp_path / "project", system_file=tmp_path / "etc" / "vramcore.toml"
    )


def by_key(values: list[Any]) -> dict[str, Any]:
    return {value.setting.key: value for value in values}


# -- sources and precedence -----------------------------------------------------------------


def test_no_file_gives_defaults(tmp_path: Path) -> None:
    config = load(tmp_path)
    assert config.files == []
    values = by_key(config.resolve(SETTINGS))
    assert values["allocator"].source == "default" and values["allocator"].text is None


def test_file_then_environment_then_argument(tmp_path: Path) -> None:
    project = write(
        tmp_path / "project" / "vramcore.toml", 'allocator = "mock"\nhash_workers = 3\n'
    )
    config = load(tmp_path, {"VRAMCORE_HASH_WORKERS": "5"})
    values = by_key(config.resolve(SETTINGS))
    assert (values["allocator"].text, values["allocator"].source) == ("mock", "file")
    assert values["allocator"].origin == str(project)
    assert (values["hash_workers"].text, values["hash_workers"].source) == ("5", "environment")
    assert values["hash_workers"].origin == "VRAMCORE_HASH_WORKERS"
    values = by_key(config.resolve(SETTINGS, {"allocator": ("cupy", "--allocator")}))
    assert (values["allocator"].text, values["allocator"].source) == ("cupy", "argument")
    assert values["allocator"].origin == "--allocator"


def test_project_file_overrides_the_system_file(tmp_path: Path) -> None:
    write(tmp_path / "etc" / "vramcore.toml", 'allocator = "mock"\nhash_workers = 2\n')
    project = write(tmp_path / "project" / "vramcore.toml", 'allocator = "cupy"\n')
    config = load(tmp_path)
    values = by_key(config.resolve(SETTINGS))
    assert values["allocator"].text == "cupy" and values["allocator"].origin == str(project)
    assert values["hash_workers"].text == "2"
    assert values["hash_workers"].origin == str(tmp_path / "etc" / "vramcore.toml")
    assert config.files == [tmp_path / "etc" / "vramcore.toml", project]


def test_vramcore_config_names_the_only_file(tmp_path: Path) -> None:
    write(tmp_path / "project" / "vramcore.toml", 'allocator = "cupy"\n')
    other = write(tmp_path / "other.toml", 'allocator = "pycuda"\n')
    config = load(tmp_path, {"VRAMCORE_CONFIG": str(other)})
    assert config.files == [other]
    assert by_key(config.resolve(SETTINGS))["allocator"].text == "pycuda"
    with pytest.raises(ConfigError, match=r"^VRAMCORE_CONFIG=.*missing\.toml: no such file$"):
        load(tmp_path, {"VRAMCORE_CONFIG": str(tmp_path / "missing.toml")})


def test_applied_sets_unset_variables_and_restores_them(tmp_path: Path) -> None:
    write(
        tmp_path / "project" / "vramcore.toml",
        'allocator = "mock"\nplugins = ["mock", "audit_chain"]\nstrict_plugins = true\n'
        "hash_workers = 4\n",
    )
    env = {"VRAMCORE_HASH_WORKERS": "9"}
    config = load(tmp_path, env)
    with config.applied(env):
        assert env == {
            "VRAMCORE_HASH_WORKERS": "9",  # the environment wins over the file
            "VRAMCORE_ALLOCATOR": "mock",
            "VRAMCORE_PLUGINS": "mock,audit_chain",
            "VRAMCORE_STRICT_PLUGINS": "1",
        }
        values = by_key(config.resolve(SETTINGS))
        assert values["allocator"].source == "file"  # set from the file, not the environment
        assert values["hash_workers"].source == "environment"
    assert env == {"VRAMCORE_HASH_WORKERS": "9"}


# -- bad files: one line naming the key and the file ------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('hash_workers = "many"\n', r"^hash_workers in .*vramcore\.toml: must be a whole number"),
        (
            "hash_workers = 0\n",
            r"^hash_workers in .*vramcore\.toml: must be from 1 to 1024, got 0$",
        ),
        ("strict_plugins = 1\n", r"^strict_plugins in .*vramcore\.toml: must be true or false"),
        ('plugins = "mock"\n', r"^plugins in .*vramcore\.toml: must be a list of names"),
        ('audit_durability = "fast"\n', r"^audit_durability in .*: 'fast' is not one of mixed"),
        ('allocator = ""\n', r"^allocator in .*vramcore\.toml: must be a non-empty string"),
        ('alocator = "mock"\n', r"^unknown key 'alocator' in .*\(did you mean allocator\?\)"),
        (
            'worker_token = "a-secret-in-a-file-0123456789"\n',
            r"^worker_token in .*: a secret does not belong in a configuration file; set "
            r"VRAMCORE_WORKER_TOKEN",
        ),
    ],
)
def test_a_bad_value_is_one_line_naming_key_and_file(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path / "project" / "vramcore.toml", text)
    with pytest.raises(ConfigError, match=message) as info:
        load(tmp_path).check(SETTINGS)
    assert "\n" not in str(info.value)
    assert str(path) in str(info.value)
    assert "a-secret-in-a-file" not in str(info.value)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "etc" / "vramcore.toml", "allocator = mock\n")
    with pytest.raises(ConfigError, match=r"not valid TOML") as info:
        load(tmp_path)
    assert str(info.value).startswith(str(path))


def test_a_secret_is_shown_as_a_fingerprint_only(tmp_path: Path) -> None:
    values = by_key(load(tmp_path, {"VRAMCORE_WORKER_TOKEN": TOKEN}).resolve(SETTINGS))
    token = values["worker_token"]
    assert token.shown().startswith("set (fingerprint ")
    assert TOKEN not in token.shown() + json.dumps(token.to_dict()) + repr(token)


def test_two_plugins_declaring_one_key_is_a_config_error(
    make_plugin_manager: Any,
) -> None:
    class Twin:
        @hookimpl
        def vramcore_settings(self) -> list[Setting]:
            return [Setting(key="allocator", help="mine too")]

    pm = make_plugin_manager(Twin())
    with pytest.raises(ConfigError, match=r"setting allocator is declared by both vramcore and"):
        declared_settings(pm)


def test_a_plugin_declares_its_settings(make_plugin_manager: Any) -> None:
    class Mine:
        @hookimpl
        def vramcore_settings(self) -> list[Setting]:
            return [Setting(key="mine_endpoint", help="where", activates="sink")]

    pm = make_plugin_manager(Mine())
    declared = declared_settings(pm)
    assert declared["mine_endpoint"][0].variable == "VRAMCORE_MINE_ENDPOINT"
    assert declared["allocator"][1] == "vramcore"


# -- the CLI --------------------------------------------------------------------------------


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A clean environment, run from a project directory of the test's own."""
    for name in list(os.environ):
        if name.startswith("VRAMCORE_"):
            monkeypatch.delenv(name)
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    # No system file of the machine running the tests: an explicit file per test.
    monkeypatch.setenv("VRAMCORE_CONFIG", str(write(project / "vramcore.toml", "")))
    return project


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert TOKEN not in out + err
    return code, out, err


def test_config_shows_each_source(
    cli: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = write(cli / "vramcore.toml", 'audit_log = "/srv/audit"\nhash_workers = 2\n')
    monkeypatch.setenv("VRAMCORE_HASH_WORKERS", "3")
    monkeypatch.setenv("VRAMCORE_WORKER_TOKEN", TOKEN)
    code, out, _ = run(capsys, "config", "--allocator", "mock", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["files"] == [str(toml)]
    rows = {row["key"]: row for row in data["settings"]}
    assert (rows["audit_log"]["value"], rows["audit_log"]["source"]) == ("/srv/audit", "file")
    assert rows["audit_log"]["origin"] == str(toml) and rows["audit_log"]["plugin"] == "audit_chain"
    assert (rows["hash_workers"]["value"], rows["hash_workers"]["source"]) == ("3", "environment")
    assert (rows["allocator"]["source"], rows["allocator"]["origin"]) == ("argument", "--allocator")
    assert rows["mock_vram"]["source"] == "default" and rows["mock_vram"]["plugin"] == "mock"
    assert rows["worker_token"]["value"].startswith("set (fingerprint ")
    code, out, _ = run(capsys, "config", "--allocator", "mock")
    assert "audit_log                  /srv/audit" in out
    assert f"file {toml}" in out
    assert "environment VRAMCORE_HASH_WORKERS" in out and "argument --allocator" in out


def test_a_file_value_reaches_the_plugin_that_reads_it(
    cli: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(cli / "vramcore.toml", 'allocator = "mock"\nmock_vram = "3GiB"\nmock_devices = 2\n')
    code, out, _ = run(capsys, "devices", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["backend"] == "mock"
    assert [d["total_bytes"] for d in data["devices"]] == [3 << 30, 3 << 30]
    assert "VRAMCORE_MOCK_VRAM" not in os.environ  # applied for the command only


@pytest.mark.parametrize("json_mode", [False, True])
def test_a_bad_file_is_exit_2_with_one_line(
    cli: Path, capsys: pytest.CaptureFixture[str], json_mode: bool
) -> None:
    toml = write(cli / "vramcore.toml", "audit_witness_required = 2\n")
    code, out, err = run(capsys, "plugins", *(["--json"] if json_mode else []))
    assert code == 2
    if json_mode:
        message = json.loads(out)["error"]["message"]
    else:
        assert err.count("\n") == 1
        message = err
    assert f"audit_witness_required in {toml}: must be true or false" in message


def test_doctor_explains_cupy_without_a_driver(
    cli: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "doctor", "--json")
    assert code == 0
    data = json.loads(out)
    backends = {row["name"]: row for row in data["backends"]}
    # The CuPy plugin and its CUDA library are installed in this workspace; no driver is.
    assert backends["cupy"]["active"] is False
    assert "driver" in backends["cupy"]["reason"]
    # CuPy is installed: the doctor says so, and that the driver is what is missing.
    assert [(c["what"], c["ok"]) for c in backends["cupy"]["checks"]] == [
        ("CuPy", True),
        ("CUDA driver and GPU", False),
    ]
    assert backends["cupy"]["install"] is None
    assert backends["mock"]["active"] is True
    sinks = {row["plugin"]: row for row in data["sinks"]}
    assert sinks["audit_chain"]["active"] is False
    assert sinks["audit_chain"]["reason"] == "VRAMCORE_AUDIT_LOG is unset"
    assert "VRAMCORE_AUDIT_LOG=" in sinks["audit_chain"]["fix"]
    assert sinks["audit_tracing"]["active"] is True and sinks["audit_tracing"]["durable"] is False
    assert data["audit_required_ok"] is False
    code, out, _ = run(capsys, "doctor")
    assert "cupy           cannot run: " in out and "driver" in out
    assert "would refuse to start" in out


def test_doctor_sees_a_sink_turned_on_by_the_file(
    cli: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = write(cli / "vramcore.toml", f'audit_log = "{cli / "audit"}"\n')
    code, out, _ = run(capsys, "doctor", "--json")
    assert code == 0
    data = json.loads(out)
    sinks = {row["plugin"]: row for row in data["sinks"]}
    assert sinks["audit_chain"]["active"] is True
    assert sinks["audit_chain"]["reason"] == f"VRAMCORE_AUDIT_LOG set (file {toml})"
    assert data["audit_required_ok"] is True
    assert not (cli / "audit").exists()  # the doctor starts nothing


def test_doctor_on_a_gpu_worker_without_a_driver_says_what_to_do(
    cli: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # What a worker image has: the CuPy plugin and the audit chain, no mock; here, no driver.
    monkeypatch.setenv("VRAMCORE_PLUGINS", "cupy,audit_chain")
    code, out, _ = run(capsys, "doctor", "--json")
    assert code == 0
    data = json.loads(out)
    assert [row["name"] for row in data["backends"]] == ["cupy"]
    assert data["default_backend"]["name"] is None
    assert "cupy: no CUDA driver" in data["default_backend"]["reason"]
    assert "NVIDIA GPU and its driver" in data["default_backend"]["fix"]
    code, out, _ = run(capsys, "doctor")
    assert "cupy           cannot run: no CUDA driver found" in out
    assert "fix: a GPU backend needs an NVIDIA GPU and its driver" in out
