"""Cached text-encoder outputs (CONDITIONING), in RAM and on disk.

A key is a digest of the encoder's identity and the exact text; the caller decides the identity
(``comfy_models.encoder_identity``), so two encoder variants never share an entry. Pure Python
and torch: tested without ComfyUI.

Disk entries are safetensors files (tensors by name, everything else as JSON metadata), written
to a temporary file and renamed, so a reader never sees half a file. A file that cannot be read,
or was not written by this module, is ignored and rewritten: the disk cache never fails a prompt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger("memkit.conditioning")

FORMAT = "memkit-conditioning-1"
Conditioning = list[list[Any]]  # [[cond tensor, {"pooled_output": tensor, ...}], ...]


def conditioning_key(identity: str, text: str) -> str:
    return hashlib.sha256(json.dumps([identity, text]).encode()).hexdigest()[:32]


def conditioning_bytes(conditioning: Conditioning) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(conditioning))


def _tensors(conditioning: Conditioning):
    for cond, extras in conditioning:
        yield cond
        yield from (v for v in extras.values() if isinstance(v, torch.Tensor))


def to_safetensors(conditioning: Conditioning) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """Tensors and metadata for one conditioning; None when an entry cannot be stored faithfully."""
    tensors: dict[str, torch.Tensor] = {}
    items = []
    for index, (cond, extras) in enumerate(conditioning):
        tensors[f"{index}.cond"] = cond.detach().to("cpu").contiguous()
        stored: dict[str, Any] = {}
        for name, value in extras.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().to("cpu").contiguous()
                stored[name] = {"tensor": f"{index}.{name}"}
            else:
                try:
                    if json.loads(json.dumps(value)) != value:
                        return None
                except (TypeError, ValueError):
                    return None  # e.g. hooks or other objects: kept in RAM only
                stored[name] = {"value": value}
        items.append(stored)
    return tensors, {"format": FORMAT, "items": json.dumps(items)}


def from_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Conditioning:
    if metadata.get("format") != FORMAT:
        raise ValueError(f"not a MemKit conditioning file (format {metadata.get('format')!r})")
    conditioning = []
    for index, stored in enumerate(json.loads(metadata["items"])):
        extras = {name: tensors[spec["tensor"]] if "tensor" in spec else spec["value"] for name, spec in stored.items()}
        conditioning.append([tensors[f"{index}.cond"], extras])
    return conditioning


@dataclass
class ConditioningStats:
    ram_hits: int = 0
    disk_hits: int = 0
    misses: int = 0


class ConditioningCache:
    """RAM LRU (up to ``ram_bytes``) in front of a disk store (up to ``disk_bytes``; 0 = off)."""

    def __init__(self, ram_bytes: int, disk_dir: Path | None, disk_bytes: int) -> None:
        self.ram_bytes = ram_bytes
        self.disk_dir = disk_dir if disk_bytes > 0 else None
        self.disk_bytes = disk_bytes
        self.stats = ConditioningStats()
        self._ram: OrderedDict[str, Conditioning] = OrderedDict()
        self._lock = threading.Lock()

    # --- lookups --------------------------------------------------------------------------

    def get(self, key: str, *, disk: bool) -> Conditioning | None:
        """A copy-safe hit (fresh lists and dicts, shared tensors), or None."""
        with self._lock:
            found = self._ram.get(key)
            if found is not None:
                self._ram.move_to_end(key)
                self.stats.ram_hits += 1
                return _fresh(found)
        found = self._read(key) if disk else None
        with self._lock:
            if found is None:
                self.stats.misses += 1
                return None
            self.stats.disk_hits += 1
            self._remember(key, found)
        return _fresh(found)

    def put(self, key: str, conditioning: Conditioning, *, disk: bool) -> None:
        kept = _fresh(conditioning)
        with self._lock:
            self._remember(key, kept)
        if disk:
            self._write(key, kept)

    def _remember(self, key: str, conditioning: Conditioning) -> None:
        self._ram[key] = conditioning
        self._ram.move_to_end(key)
        while len(self._ram) > 1 and sum(conditioning_bytes(c) for c in self._ram.values()) > self.ram_bytes:
            self._ram.popitem(last=False)

    # --- disk -----------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.disk_dir / f"{key}.safetensors"

    def _read(self, key: str) -> Conditioning | None:
        if self.disk_dir is None:
            return None
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
            conditioning = from_safetensors(tensors, metadata)
        except Exception as error:  # corrupt, truncated or foreign: ignore, it is rewritten
            log.warning("[memkit] ignoring conditioning cache file %s: %s", path, error)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        self._touch(path)
        return conditioning

    def _touch(self, path: Path) -> None:
        """Mark as most recently used: the size cap evicts the oldest mtime first, so the mtime is set
        past the newest in the folder (file timestamps are too coarse to order quick writes)."""
        with contextlib.suppress(OSError):
            newest = max((p.stat().st_mtime_ns for p in self.disk_dir.glob("*.safetensors")), default=0)
            stamp = max(time.time_ns(), newest + 1000)
            os.utime(path, ns=(stamp, stamp))

    def _write(self, key: str, conditioning: Conditioning) -> None:
        if self.disk_dir is None:
            return
        stored = to_safetensors(conditioning)
        if stored is None:
            return
        tensors, metadata = stored
        path = self._path(key)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
        try:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(temporary), metadata=metadata)
            os.replace(temporary, path)
            self._touch(path)
            self._enforce_cap()
        except OSError as error:  # a full or read-only disk costs the disk cache, never the prompt
            log.warning("[memkit] could not write the conditioning cache file %s: %s", path, error)
            with contextlib.suppress(OSError):
                temporary.unlink()

    def _enforce_cap(self) -> None:
        files = sorted(self.disk_dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
        total = sum(p.stat().st_size for p in files)
        while files and total > self.disk_bytes:
            oldest = files.pop(0)
            total -= oldest.stat().st_size
            with contextlib.suppress(OSError):
                oldest.unlink()

    def clear_ram(self) -> int:
        """Forget the RAM copies (ComfyUI's /free with free_memory); the disk copies stay."""
        with self._lock:
            dropped = len(self._ram)
            self._ram.clear()
        return dropped

    # --- reporting ------------------------------------------------------------------------

    def report(self) -> dict[str, int]:
        with self._lock:
            ram = {"ram_entries": len(self._ram), "ram_bytes": sum(conditioning_bytes(c) for c in self._ram.values())}
        files = list(self.disk_dir.glob("*.safetensors")) if self.disk_dir and self.disk_dir.is_dir() else []
        return {**ram, "disk_files": len(files), "disk_bytes": sum(p.stat().st_size for p in files),
                "ram_hits": self.stats.ram_hits, "disk_hits": self.stats.disk_hits, "misses": self.stats.misses}


def _fresh(conditioning: Conditioning) -> Conditioning:
    """New lists and dicts around the same tensors: a node that edits its input in place cannot
    change what the cache hands out next time."""
    return [[cond, dict(extras)] for cond, extras in conditioning]

