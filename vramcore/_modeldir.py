"""A model directory, checked before anything is sealed: which files are its shards.

A model on a hub is a directory: one ``model.safetensors``, or shards
``model-0000N-of-0000M.safetensors`` with an index ``model.safetensors.index.json`` whose
``weight_map`` names the shard that holds each tensor. :func:`scan_model_dir` finds the
shards (the index's files when there is an index, else every top-level ``*.safetensors``),
reads each shard's header (strictly, :mod:`vramcore.safetensors`) and checks that they agree:

* every file the index names exists, inside the directory (a name with ``..``, an absolute
  name, or a symlink resolving outside the directory is refused);
* each shard holds exactly the tensors the index assigns to it (no extra tensor, none
  missing), and no tensor is in two shards (with or without an index).

Each refusal is one line: :class:`~vramcore.errors.InvalidInput` for a path that is not a model
directory at all (exit 2), :class:`~vramcore.errors.IntegrityViolation` (reason
``"model_dir"``) for a directory whose parts disagree or reach outside it (exit 1).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath

import attrs

from vramcore.errors import IntegrityViolation, InvalidInput
from vramcore.safetensors import read_tensor_map
from vramcore.shard import TensorMap
from vramcore.validation import check_path, escape_text, safe_repr

__all__ = [
    "INDEX_SUFFIX",
    "MAX_INDEX_BYTES",
    "ModelDir",
    "ModelFile",
    "bad_dir",
    "scan_model_dir",
    "walk_files",
]

#: The index of a sharded model ends so (``model.safetensors.index.json``).
INDEX_SUFFIX = ".safetensors.index.json"
#: Larger index files are refused before parsing (a million tensors take about 60 MB).
MAX_INDEX_BYTES = 256 << 20
#: Most files a model directory may hold (beyond, it is not a model directory).
MAX_FILES = 100_000


def bad_dir(message: str) -> IntegrityViolation:
    """The one-line refusal of a model directory whose parts disagree or reach outside it."""
    return IntegrityViolation(f"model directory refused: {message}", reason="model_dir")


@attrs.frozen
class ModelFile:
    """One file of a model directory.

    :attr name: its path relative to the directory, ``/``-separated (as signatures name it).
    :attr path: the file itself (inside the directory, symlinks resolved).
    :attr size: its size in bytes when scanned.
    """

    name: str
    path: Path
    size: int


@attrs.frozen
class ModelDir:
    """A checked model directory (what :func:`scan_model_dir` returns).

    :attr root: the directory (resolved).
    :attr index: the index file's name, or ``None`` when every ``*.safetensors`` is a shard.
    :attr shards: the shards, sorted by name, each to be sealed as one shard.
    :attr tensor_maps: shard name -> its header's tensor map, as read while scanning.
    """

    root: Path
    index: str | None
    shards: tuple[ModelFile, ...]
    tensor_maps: Mapping[str, TensorMap]

    def check_sealed(self, name: str, tensors: TensorMap) -> None:
        """Refuse a shard whose sealed tensor map is not the one scanned (it changed since)."""
        if tensors != self.tensor_maps[name]:
            raise bad_dir(f"{_shown(name)} changed between the directory check and its seal")


def scan_model_dir(path: object) -> ModelDir:
    """Find and check the shards of the model directory ``path`` (see the module docstring).

    :raises InvalidInput: ``path`` is not a readable directory, or holds no safetensors file.
    :raises IntegrityViolation: the index, the files and the headers disagree, or a file
        lies outside the directory.
    """
    return _Scan(_check_dir(path)).run()


def walk_files(root: Path) -> Iterator[ModelFile]:
    """Every regular file under ``root`` (recursively, sorted), named relative to it.

    A symlink resolving outside ``root`` is refused (:func:`bad_dir`); one inside is followed
    to its file. Directories are entered only when they are real directories inside ``root``.
    """
    count = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        here = Path(dirpath)
        for entry in sorted(dirnames):
            if (here / entry).is_symlink():
                _inside(root, here / entry)  # refuses an escape; a link inside is not walked
        for entry in sorted(filenames):
            count += 1
            if count > MAX_FILES:
                raise InvalidInput(f"{escape_text(str(root))} holds over {MAX_FILES} files")
            found = _regular(root, here / entry)
            if found is not None:
                yield found


def _shown(name: str) -> str:
    return escape_text(name[:256])


def _check_dir(path: object) -> Path:
    if isinstance(path, bytes) or not isinstance(path, str | os.PathLike):
        raise InvalidInput(f"model directory must be a path, got {type(path).__name__}")
    p = Path(os.fspath(path))
    try:
        st = p.stat()
    except OSError as exc:
        raise InvalidInput(f"model directory {escape_text(str(p))}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidInput(f"{escape_text(str(p))} is not a directory")
    return p.resolve()


def _inside(root: Path, path: Path) -> Path:
    """``path`` with symlinks resolved, refused unless it stays inside ``root``."""
    target = path.resolve()
    if target != root and root not in target.parents:
        rel = path.relative_to(root) if path.is_relative_to(root) else path
        raise bad_dir(f"{_shown(rel.as_posix())} is a symlink leading outside the directory")
    return target


def _regular(root: Path, path: Path) -> ModelFile | None:
    target = _inside(root, path)
    try:
        st = target.stat()
    except OSError:
        return None  # a dangling link is no file
    if not stat.S_ISREG(st.st_mode):
        return None
    return ModelFile(path.relative_to(root).as_posix(), target, st.st_size)


class _Scan:
    """One directory check: the index (if any), the shards, their headers, their agreement."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.index: str | None = None
        self.weight_map: dict[str, str] | None = None
        self.maps: dict[str, TensorMap] = {}

    def run(self) -> ModelDir:
        self._read_index()
        shards = self._indexed_shards() if self.weight_map is not None else self._all_shards()
        for shard in shards:
            with shard.path.open("rb") as fh:
                self.maps[shard.name] = read_tensor_map(fh, shard.size)
        self._check_tensors()
        return ModelDir(self.root, self.index, tuple(shards), dict(self.maps))

    def _read_index(self) -> None:
        found = sorted(p.name for p in self.root.iterdir() if p.name.endswith(INDEX_SUFFIX))
        if len(found) > 1:
            raise bad_dir(f"two indexes, {_shown(found[0])} and {_shown(found[1])}")
        if not found:
            return
        self.index = found[0]
        index = _regular(self.root, self.root / self.index)
        if index is None:
            raise bad_dir(f"{_shown(self.index)} is not a regular file")
        if index.size > MAX_INDEX_BYTES:
            raise bad_dir(f"{_shown(self.index)} is over {MAX_INDEX_BYTES} bytes")
        try:
            data = json.loads(index.path.read_bytes())
        except (ValueError, RecursionError) as exc:
            raise bad_dir(f"{_shown(self.index)} is not valid JSON ({exc})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise bad_dir(f"{_shown(self.index)} has no weight_map object")
        for tensor, file in weight_map.items():
            if not isinstance(file, str):
                raise bad_dir(f"{_shown(self.index)} maps {safe_repr(tensor)} to a non-string")
        self.weight_map = weight_map

    def _indexed_shards(self) -> list[ModelFile]:
        assert self.weight_map is not None
        shards = []
        for name in sorted(set(self.weight_map.values())):
            pure = PurePosixPath(name)
            if pure.is_absolute() or ".." in pure.parts or "\\" in name or not name:
                raise bad_dir(f"the index names {_shown(name)}, a file outside the directory")
            shard = _regular(self.root, self.root / pure)
            if shard is None:
                raise bad_dir(f"the index names {_shown(name)}, which is missing")
            if shard.name != name:  # "./a" or "a//b": one file, one name
                raise bad_dir(f"the index names {_shown(name)}, not a plain relative name")
            check_path(shard.path, field=f"shard {_shown(name)}")
            shards.append(shard)
        return shards

    def _all_shards(self) -> list[ModelFile]:
        shards = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.endswith(".safetensors"):
                shard = _regular(self.root, entry)
                if shard is not None:
                    shards.append(shard)
        if not shards:
            raise InvalidInput(f"{escape_text(str(self.root))} holds no *.safetensors file")
        return shards

    def _check_tensors(self) -> None:
        owner: dict[str, str] = {}
        for name, tensors in self.maps.items():
            for tensor in tensors.names:
                if tensor in owner:
                    raise bad_dir(
                        f"tensor {safe_repr(tensor)} is in {_shown(owner[tensor])} and in "
                        f"{_shown(name)}"
                    )
                owner[tensor] = name
                if self.weight_map is not None and self.weight_map.get(tensor) != name:
                    where = self.weight_map.get(tensor)
                    said = "does not list it" if where is None else f"puts it in {_shown(where)}"
                    raise bad_dir(
                        f"{_shown(name)} holds tensor {safe_repr(tensor)} but the index {said}"
                    )
        if self.weight_map is not None:
            for tensor, file in self.weight_map.items():
                if tensor not in owner:
                    raise bad_dir(
                        f"the index puts tensor {safe_repr(tensor)} in {_shown(file)}, whose "
                        "header does not hold it"
                    )
