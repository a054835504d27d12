"""Cached text-encoder outputs (CONDITIONING), in RAM and on disk.

A key is a digest of the encoder's identity and the exact text; the caller decides the identity
(``comfy_models.encoder_identity``), so two encoder variants never share an entry. Pure Python
and torch: tested without ComfyUI.

Disk entries are safetensors files named ``<key>.safetensors``, where the key has the form
``conditioning_key`` gives (32 hex digits; other keys stay in RAM only, so a key can never name a
path outside the folder). Tensors are stored by name, everything else as JSON metadata.

What the disk cache promises, because the folder is the user's and the disk can fail:

- A write goes to a temporary ``.<key>.safetensors.<pid>-<token>.partial`` file, which is fsynced,
  renamed over the entry (``os.replace``), and then the folder is fsynced (best effort: where the
  OS cannot open a folder, e.g. Windows, that step is skipped). A reader never sees half a file,
  and a crash leaves either the old entry or the new one.
- A read error never deletes anything. A file that is cut short or not ours (another format) is a
  miss with one warning per file; the next ``put`` of that key replaces it, and otherwise the size
  cap removes it in time as the oldest entry. A transient error (too many open files, I/O error, a
  permission error, ``MemoryError``) is a miss too, and the file is read again next time.
- Only our own entries count: regular files (``os.lstat``, so never a symlink) named like an entry.
  Other names and extensions, folders and symlinks (wherever they point) are never read, counted
  by the cap or deleted. The cap deletes our entries only, the least recently used first.
- Temporary files left by a writer that was killed are removed during cap enforcement once they
  are more than an hour old (``STALE_PARTIAL_S``); a younger one may still be being written.
- Listing the folder skips what vanished or changed kind meanwhile: ``report`` never raises, and
  a fault in one file never stops the cap from being enforced on the others.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from .bounded import cut, shown

log = logging.getLogger("memkit.conditioning")

FORMAT = "memkit-conditioning-1"
Conditioning = list[list[Any]]  # [[cond tensor, {"pooled_output": tensor, ...}], ...]

KEY = re.compile(r"[0-9a-f]{32}")  # what conditioning_key returns: the only keys stored on disk
ENTRY = re.compile(r"[0-9a-f]{32}\.safetensors")
PARTIAL = re.compile(r"\.[0-9a-f]{32}\.safetensors\.[0-9A-Za-z._-]+\.partial")  # ours, old or new naming
STALE_PARTIAL_S = 3600
_WARNED_MOST = 4096  # files remembered as already warned about (then the memory starts over)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


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


@dataclass(frozen=True)
class DiskEntry:
    """One regular file in the cache folder, from a single ``lstat``."""

    path: Path
    size: int
    mtime_ns: int


class ConditioningCache:
    """RAM LRU (up to ``ram_bytes``) in front of a disk store (up to ``disk_bytes``; 0 = off)."""

    def __init__(self, ram_bytes: int, disk_dir: Path | None, disk_bytes: int) -> None:
        self.ram_bytes = ram_bytes
        self.disk_dir = disk_dir if disk_bytes > 0 else None
        self.disk_bytes = disk_bytes
        self.stats = ConditioningStats()
        self._ram: OrderedDict[str, Conditioning] = OrderedDict()
        self._lock = threading.Lock()
        self._warned: set[tuple] = set()

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

    def _on_disk(self, key: str) -> bool:
        """Whether this key has a disk entry: the disk is on and the key cannot name another path."""
        return self.disk_dir is not None and KEY.fullmatch(key) is not None

    def _read(self, key: str) -> Conditioning | None:
        """The entry's conditioning, or None; never raises and never deletes (see the module doc)."""
        if not self._on_disk(key):
            return None
        path = self._path(key)
        try:
            info = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as error:
            self._warn_once(path, None, f"could not be inspected ({shown(str(error))}): a miss, the file is kept")
            return None
        if not stat.S_ISREG(info.st_mode):
            self._warn_once(path, info, "is not a regular file (a symlink, a folder or another kind): "
                                        "never read or deleted by MemKit; a miss")
            return None
        if info.st_size > self.disk_bytes:
            self._warn_once(path, info, f"is {info.st_size} bytes, over the disk cap ({self.disk_bytes} bytes): "
                                        "not read, a miss (the cap removes it at a later write)")
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
            conditioning = from_safetensors(tensors, metadata)
        except (OSError, MemoryError) as error:  # transient (safetensors reports EMFILE as FileNotFoundError)
            if os.path.lexists(path):
                self._warn_once(path, info, f"could not be read ({type(error).__name__}: {shown(str(error))}): "
                                            "a miss this time, the file is kept and read again next time")
            return None
        except Exception as error:  # cut short or not ours: a miss; the next put replaces it
            self._warn_once(path, info, f"is not a readable MemKit conditioning file ({shown(str(error))}): a miss, "
                                        "the next encode of this prompt replaces it")
            return None
        self._touch(path)
        return conditioning

    def _warn_once(self, path: Path, info: os.stat_result | None, reason: str) -> None:
        """One warning per file and kind of problem (a file rewritten since is another file)."""
        seen = (path.name, reason[:40]) + ((info.st_ino, info.st_size, info.st_mtime_ns) if info else ())
        if seen in self._warned:
            return
        if len(self._warned) >= _WARNED_MOST:
            self._warned.clear()
        self._warned.add(seen)
        log.warning("%s", cut(f"[memkit] conditioning cache file {path} {reason}"))

    def _listing(self) -> tuple[list[DiskEntry], list[DiskEntry]]:
        """Our entries and our temporary files in the folder, one ``lstat`` each; skips what is not
        a regular file or vanished meanwhile. Never raises: an unreadable folder lists nothing."""
        entries: list[DiskEntry] = []
        partials: list[DiskEntry] = []
        if self.disk_dir is None:
            return entries, partials
        try:
            with os.scandir(self.disk_dir) as found:
                for item in found:
                    kind = entries if ENTRY.fullmatch(item.name) else partials if PARTIAL.fullmatch(item.name) else None
                    if kind is None:
                        continue  # a foreign name: never ours to count or delete
                    try:
                        info = item.stat(follow_symlinks=False)
                    except OSError:  # vanished (or unreadable) since the folder was listed
                        continue
                    if stat.S_ISREG(info.st_mode):
                        kind.append(DiskEntry(Path(item.path), info.st_size, info.st_mtime_ns))
        except OSError:  # no folder yet, not a folder, unreadable, or failed while listing
            pass
        return entries, partials

    def _touch(self, path: Path) -> None:
        """Mark as most recently used: the size cap evicts the oldest mtime first, so the mtime is set
        past the newest in the folder (file timestamps are too coarse to order quick writes)."""
        newest = max((entry.mtime_ns for entry in self._listing()[0]), default=0)
        stamp = max(time.time_ns(), newest + 1000)
        with contextlib.suppress(OSError):
            os.utime(path, ns=(stamp, stamp))

    def _write(self, key: str, conditioning: Conditioning) -> None:
        """Store one entry (fsynced, then renamed); never raises: a failure costs the disk copy only."""
        if not self._on_disk(key):
            return
        stored = to_safetensors(conditioning)
        if stored is None:
            return
        tensors, metadata = stored
        path = self._path(key)
        temporary = self.disk_dir / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial"
        try:
            data = save(tensors, metadata=metadata)
            self.disk_dir.mkdir(parents=True, exist_ok=True)
            _write_synced(temporary, data)
            os.replace(temporary, path)
            _sync_folder(self.disk_dir)
            self._touch(path)
        except Exception as error:  # a full or read-only disk, a folder in the way: the prompt goes on
            log.warning("%s", cut(f"[memkit] could not write the conditioning cache file {path} "
                                  f"({type(error).__name__}: {shown(str(error))}); kept in RAM only"))
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        finally:
            self._enforce_cap()

    def _enforce_cap(self) -> None:
        """Delete our least recently used entries until the rest fit ``disk_bytes``, and temporary
        files older than ``STALE_PARTIAL_S``; a file that cannot be deleted is skipped, not fatal."""
        entries, partials = self._listing()
        oldest_kept = time.time_ns() - STALE_PARTIAL_S * 10**9
        for partial in partials:
            if partial.mtime_ns < oldest_kept:
                self._unlink(partial.path)
        entries.sort(key=lambda entry: entry.mtime_ns)
        total = sum(entry.size for entry in entries)
        for entry in entries:
            if total <= self.disk_bytes:
                break
            if self._unlink(entry.path):
                total -= entry.size

    def _unlink(self, path: Path) -> bool:
        """Remove one of our files; True when it is gone (also when it had vanished already)."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            return True
        except OSError as error:
            self._warn_once(path, None, f"could not be deleted ({shown(str(error))}); the cap skips it")
            return False
        return True

    def clear_ram(self) -> int:
        """Forget the RAM copies (ComfyUI's /free with free_memory); the disk copies stay."""
        with self._lock:
            dropped = len(self._ram)
            self._ram.clear()
        return dropped

    # --- reporting ------------------------------------------------------------------------

    def report(self) -> dict[str, int]:
        """Counts for /memkit/status; never raises (a missing or unreadable folder has no files)."""
        with self._lock:
            ram = {"ram_entries": len(self._ram), "ram_bytes": sum(conditioning_bytes(c) for c in self._ram.values())}
        entries = self._listing()[0]
        return {**ram, "disk_files": len(entries), "disk_bytes": sum(entry.size for entry in entries),
                "ram_hits": self.stats.ram_hits, "disk_hits": self.stats.disk_hits, "misses": self.stats.misses}


def _write_synced(path: Path, data: bytes) -> None:
    """Create ``path`` (never through a symlink or over a file) with ``data``, flushed to the disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_BINARY, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable; best effort where the OS cannot open a folder (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | _O_DIRECTORY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _fresh(conditioning: Conditioning) -> Conditioning:
    """New lists and dicts around the same tensors: a node that edits its input in place cannot
    change what the cache hands out next time."""
    return [[cond, dict(extras)] for cond, extras in conditioning]
