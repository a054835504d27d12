"""What makes two loads the same: the load recipe, the key of every cache entry.

Every load is a call of a ComfyUI node (``NodeCall``: the node id and its canonical inputs). A
recipe is that call under its kind's label, the resolved paths of the files among its inputs and
each file's identity on disk. Two requests share an entry only when all of these match, so a file
replaced on disk or a different weight dtype never gets a stale model. A file's identity is its
size, mtime, inode and ctime (all from one ``stat``): a copy over it that keeps size and mtime
(``cp -p``, ``rsync -t``) still brings a new inode or ctime, which no program can set back, so it
is a new key without hashing the contents. ``hash_contents`` adds a SHA-256 for filesystems that
report no real inode or ctime, and for Windows, where ``st_ctime`` is the creation time (an
in-place rewrite that sets the mtime back is seen only by the hash there).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class ModelKind(str, Enum):
    """A load's label: its config section, selector, output types and status row. What is loaded
    is the node call; the kind only says which of its outputs are kept."""

    CHECKPOINT = "checkpoint"
    TEXT_ENCODER = "text_encoder"
    DIFFUSION_MODEL = "diffusion_model"
    VAE = "vae"
    NODE = "node"  # any other loader node, called by its node id (its files are found among its inputs)

    @property
    def folder(self) -> str:
        """ComfyUI's model folder name for this kind (the one place it is written); "" for NODE,
        whose files may come from any folder."""
        return _FOLDERS.get(self, "")

    @property
    def section(self) -> str:
        """The preload_config.json section that lists this kind."""
        return _SECTIONS[self]

    @property
    def kept_outputs(self) -> int | None:
        """How many of its node's outputs an entry keeps: what the kind's selector hands out
        (MODEL, CLIP, VAE for a checkpoint; one for the other loaders); None for NODE, whose
        outputs are all handed out in the node's order."""
        return _KEPT_OUTPUTS.get(self)


_FOLDERS = {ModelKind.CHECKPOINT: "checkpoints", ModelKind.TEXT_ENCODER: "text_encoders",
            ModelKind.DIFFUSION_MODEL: "diffusion_models", ModelKind.VAE: "vae"}
_SECTIONS = {ModelKind.CHECKPOINT: "checkpoints", ModelKind.TEXT_ENCODER: "text_encoders",
             ModelKind.DIFFUSION_MODEL: "diffusion_models", ModelKind.VAE: "vaes",
             ModelKind.NODE: "nodes"}
_KEPT_OUTPUTS = {ModelKind.CHECKPOINT: 3, ModelKind.TEXT_ENCODER: 1, ModelKind.DIFFUSION_MODEL: 1, ModelKind.VAE: 1}


@dataclass(frozen=True)
class NodeCall:
    """A ComfyUI node and the inputs it is called with, sorted by name.

    Compared and hashed by ``canonical`` (one JSON text per call), so inputs such as ``1``,
    ``1.0`` and ``true``, which a node may treat differently, never make the same call."""

    node: str
    inputs: tuple[tuple[str, Any], ...] = field(default=(), compare=False)
    canonical: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        inputs = tuple(sorted(self.inputs, key=lambda item: item[0]))
        object.__setattr__(self, "inputs", inputs)
        canonical = json.dumps([self.node, dict(inputs)], sort_keys=True, separators=(",", ":"))
        object.__setattr__(self, "canonical", canonical)

    @classmethod
    def of(cls, node: str, inputs: Mapping[str, Any]) -> NodeCall:
        return cls(node, tuple(inputs.items()))

    def kwargs(self) -> dict[str, Any]:
        """The inputs as the node's function takes them."""
        return dict(self.inputs)


@dataclass(frozen=True)
class FileIdentity:
    """A file as it is on disk now: size, modification time, inode and change time (ctime, set by the
    kernel on every write and chmod), optionally a content hash. ``inode`` and ``ctime_ns`` are 0
    for identities built by hand."""

    size: int
    mtime_ns: int
    sha256: str | None = None
    inode: int = 0
    ctime_ns: int = 0


class FileIdentityReader:
    """Reads file identities; a content hash is computed once per version of a file.

    A version is (path, inode, size, mtime, ctime): a file rewritten in place with the same size
    and its mtime set back still gets a new ctime (which no program can set), so it is hashed again.
    """

    def __init__(self, hash_contents: bool = False) -> None:
        self.hash_contents = hash_contents
        self._hashes: dict[tuple[str, int, int, int, int], str] = {}
        self._lock = threading.Lock()

    def read(self, path: str) -> FileIdentity:
        stat = os.stat(path)
        if not self.hash_contents:
            return FileIdentity(stat.st_size, stat.st_mtime_ns, inode=stat.st_ino, ctime_ns=stat.st_ctime_ns)
        memo = (path, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        with self._lock:
            digest = self._hashes.get(memo)
        if digest is None:
            digest = _sha256_of(path)
            after = os.stat(path)
            if (after.st_ino, after.st_size, after.st_mtime_ns, after.st_ctime_ns) == memo[1:]:
                with self._lock:
                    self._hashes[memo] = digest  # only a digest of a file that did not change meanwhile
        return FileIdentity(stat.st_size, stat.st_mtime_ns, digest, inode=stat.st_ino, ctime_ns=stat.st_ctime_ns)


def _sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class LoadRecipe:
    """Everything that decides what a load produces: the node call (its inputs as they are passed),
    the kind (which of the node's outputs are kept), the files among the inputs and their identity."""

    kind: ModelKind
    call: NodeCall
    paths: tuple[str, ...]
    identities: tuple[FileIdentity, ...]
    key: str = field(init=False, compare=False)
    lineage: str = field(init=False, compare=False)
    portable_key: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        lineage = json.dumps([self.kind.value, self.call.canonical, list(self.paths)])
        identity = json.dumps([[i.size, i.mtime_ns, i.inode, i.ctime_ns, i.sha256] for i in self.identities])
        object.__setattr__(self, "lineage", hashlib.sha256(lineage.encode()).hexdigest()[:16])
        object.__setattr__(self, "key", hashlib.sha256((lineage + identity).encode()).hexdigest()[:16])
        # Keys that outlive the process (the conditioning cache on disk) must survive a copy of the
        # models to a new host or image, which brings new inodes and ctimes: size, mtime and hash only.
        portable = json.dumps([[i.size, i.mtime_ns, i.sha256] for i in self.identities])
        object.__setattr__(self, "portable_key", hashlib.sha256((lineage + portable).encode()).hexdigest()[:16])

    @classmethod
    def build(cls, kind: ModelKind, call: NodeCall, paths: list[str] | tuple[str, ...],
              reader: FileIdentityReader) -> LoadRecipe:
        resolved = tuple(os.path.realpath(p) for p in paths)
        return cls(kind=kind, call=call, paths=resolved, identities=tuple(reader.read(p) for p in resolved))

    @property
    def file_bytes(self) -> int:
        return sum(i.size for i in self.identities)
