"""The shared weight store: one file of a built model's tensors per host, mapped by every process.

A file ``<key>.weights`` holds the tensors back to back (64-byte aligned); ``<key>.json``, its
manifest, lists each tensor (name, dtype, shape, offset) and what the caller needs to rebuild the
model around them. A process maps the weights copy-on-write (``MAP_PRIVATE``): pages it never
writes are the file's, shared with every other process mapping it; a page it writes (an in-place
patch) becomes its own and never reaches the file or another process.

Files live in a directory of this user's only (mode 0700), by default in ``/dev/shm``, where they
stay in RAM after every process has exited: that is what makes a restart map instead of load.

Lifecycle, all with ``flock`` (released by the kernel when a process dies, SIGKILL included):
- A writer holds ``<key>.lock`` exclusively while it builds and writes; a second process building
  the same model waits for it and then maps its file.
- Data and manifest are written to names of the writer's own and renamed, weights first, manifest
  last: a manifest exists only beside complete weights, so a writer killed mid-write leaves at most
  files no reader opens, removed by the next sweep.
- Every process mapping a file holds a shared lock on it. A file is removed (stale, or over the
  cap, least recently mapped first) only when an exclusive lock on it can be taken, i.e. when no
  process maps it; ``/proc/locks`` tells how many processes map a file.

Pure: torch for the mapping, nothing of ComfyUI.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("memkit")

FORMAT = 1
ALIGN = 64
MANIFEST_MAX_BYTES = 64 * 2**20
_KEY = re.compile(r"^[0-9a-f]{16,64}$")
_VMA = re.compile(rb"^([0-9a-f]+)-([0-9a-f]+) ", re.MULTILINE)  # a mapping's first line in /proc/<pid>/smaps
_ANONYMOUS = re.compile(rb"^Anonymous:\s+(\d+) kB", re.MULTILINE)
_DTYPE_NAMES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
                "complex64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
_DTYPES = {name: getattr(torch, name) for name in _DTYPE_NAMES if hasattr(torch, name)}


class StoreError(RuntimeError):
    """The store cannot be used for this model (the reason is the message)."""


def default_directory() -> Path:
    """``/dev/shm/comfyui-memkit-<uid>``: RAM-backed, this user's own."""
    return Path("/dev/shm") / f"comfyui-memkit-{os.getuid()}"


def unavailable_reason(directory: Path) -> str | None:
    """Why a store cannot live in ``directory`` on this host (None when it can)."""
    if sys.platform == "win32" or not hasattr(os, "getuid"):
        return "shared weights need Linux (a RAM-backed /dev/shm and flock); this is " + sys.platform
    parent = directory.parent
    if not parent.is_dir():
        return f"{parent} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable"
    return None


@dataclass(frozen=True)
class StoredTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * _DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class Manifest:
    key: str
    size: int
    tensors: tuple[StoredTensor, ...]
    info: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "key": self.key, "bytes": self.size,
                           "tensors": [[t.name, t.dtype, list(t.shape), t.offset] for t in self.tensors],
                           "info": self.info})

    @classmethod
    def from_json(cls, text: str, key: str) -> Manifest:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError(f"the manifest is a JSON {type(raw).__name__}, not an object")
        if raw.get("format") != FORMAT or raw.get("key") != key:
            raise ValueError(f"format {raw.get('format')!r}, key {raw.get('key')!r}")
        size = int(raw["bytes"])
        tensors = []
        for name, dtype, shape, offset in raw["tensors"]:
            if dtype not in _DTYPES:
                raise ValueError(f"{name}: unknown dtype {dtype!r}")
            tensor = StoredTensor(str(name), dtype, tuple(int(s) for s in shape), int(offset))
            if tensor.offset % ALIGN or tensor.offset < 0 or tensor.offset + tensor.nbytes > size:
                raise ValueError(f"{name}: offset {tensor.offset} outside the {size} bytes")
            tensors.append(tensor)
        return cls(key, size, tuple(tensors), dict(raw.get("info") or {}))


class MappedWeights:
    """One process's copy-on-write mapping of a store file; holds the file's shared lock until
    ``close`` (or until the process ends)."""

    def __init__(self, path: Path, manifest: Manifest, fd: int, base: torch.Tensor | None) -> None:
        self.path = path
        self.manifest = manifest
        self._fd: int | None = fd
        self._base = base
        self.start = base.data_ptr() if base is not None else 0
        self.end = self.start + manifest.size

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every stored tensor as a view of the mapping, by name."""
        if self._fd is None:
            raise StoreError(f"{self.path.name} was closed")
        views = {}
        for item in self.manifest.tensors:
            if self._base is None or item.nbytes == 0:
                views[item.name] = torch.empty(item.shape, dtype=_DTYPES[item.dtype])
                continue
            raw = self._base[item.offset:item.offset + item.nbytes]
            views[item.name] = raw.view(_DTYPES[item.dtype]).view(item.shape)
        return views

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether the tensor's memory is (still) this mapping's."""
        return tensor.device.type == "cpu" and self.start <= tensor.untyped_storage().data_ptr() < self.end

    def private_bytes(self, max_age: float = 0.0) -> int:
        """Bytes of the mapping this process has written to: copy-on-write pages that became its own
        (an in-place patch), which ``/proc/self/smaps`` counts as anonymous; 0 where it cannot be read.
        ``max_age``: a reading of smaps that recent will do (the kernel takes tens of ms per read)."""
        data = _smaps(max_age)
        total = 0
        for vma in _VMA.finditer(data):
            if int(vma.group(1), 16) < self.end and int(vma.group(2), 16) > self.start:
                field = _ANONYMOUS.search(data, vma.end())
                if field is not None:
                    total += int(field.group(1)) * 1024
        return total

    def close(self) -> None:
        """Let go of the file's shared lock (the views keep the memory mapped while they live)."""
        self._base = None
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


class WeightStore:
    """The store's directory: open, write, lock, sweep."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._identity: tuple[int, int] | None = None  # (device, inode) of the directory ``prepare`` checked

    # --- the directory --------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the directory (0700) or check that an existing one is this user's own and
        nobody else's to write: files in it are mapped into this process as model weights."""
        try:
            self.directory.mkdir(mode=0o700, exist_ok=True)
            info = os.lstat(self.directory)
        except OSError as error:
            raise StoreError(f"cannot use {self.directory}: {error.strerror or error}") from None
        if not stat.S_ISDIR(info.st_mode):
            raise StoreError(f"{self.directory} is not a directory")
        if info.st_uid != os.getuid():
            raise StoreError(f"{self.directory} belongs to uid {info.st_uid}, not this user ({os.getuid()})")
        if info.st_mode & 0o022:
            raise StoreError(f"{self.directory} is writable by others (mode {oct(info.st_mode & 0o777)})")
        self._identity = (info.st_dev, info.st_ino)

    def check(self) -> None:
        """Raise StoreError unless the directory is still the one ``prepare`` checked: /dev/shm is
        writable by every user, so a directory removed meanwhile (``rm -r``, systemd's RemoveIPC at
        logout) could be made again by someone else, with files this process would map as weights."""
        if self._identity is None:  # first use: check it (or make it) now
            self.prepare()
            return
        try:
            info = os.lstat(self.directory)
        except OSError as error:
            raise StoreError(f"{self.directory} is gone ({error.strerror or error})") from None
        if (info.st_dev, info.st_ino) != self._identity or info.st_uid != os.getuid():
            raise StoreError(f"{self.directory} is not the directory this process checked any more")

    def free_bytes(self) -> int:
        stats = os.statvfs(self.directory)
        return stats.f_bavail * stats.f_frsize

    def _paths(self, key: str) -> tuple[Path, Path, Path]:
        if not _KEY.match(key):
            raise StoreError(f"not a store key: {key[:80]!r}")
        return (self.directory / f"{key}.weights", self.directory / f"{key}.json", self.directory / f"{key}.lock")

    # --- reading --------------------------------------------------------------------------

    def open(self, key: str) -> MappedWeights | None:
        """Map the key's file copy-on-write, or None when the store has no complete file for it.
        A file that does not match its manifest is removed (when unmapped) and is a miss. Raises
        StoreError when the directory is not the one checked."""
        self.check()
        weights, manifest_path, _ = self._paths(key)
        try:
            text = _read_small(manifest_path)
            fd = os.open(weights, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            log.warning("[memkit] shared weights: cannot read %s (%s)", manifest_path.name, str(error)[:200])
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            info = os.fstat(fd)
            if info.st_uid != os.getuid():
                raise OSError(f"{weights.name} belongs to uid {info.st_uid}")
            try:
                now = os.stat(weights)
            except FileNotFoundError:
                now = None
            if now is None or (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
                os.close(fd)  # removed or replaced meanwhile: a miss, nothing to remove
                return None
            manifest = Manifest.from_json(text, key)
            if info.st_size != manifest.size:
                raise ValueError(f"{info.st_size} bytes on disk, the manifest says {manifest.size}")
            # through the locked descriptor: the file mapped is the file whose lock this process holds
            base = (torch.from_file(f"/proc/self/fd/{fd}", shared=False, size=info.st_size, dtype=torch.uint8)
                    if info.st_size else None)
        except (ValueError, KeyError, TypeError, OSError, RuntimeError) as error:
            os.close(fd)
            log.warning("[memkit] shared weights: %s is unusable (%s); removing it", weights.name, str(error)[:200])
            self.remove_if_unmapped(key)
            return None
        with contextlib.suppress(OSError):
            os.utime(manifest_path)  # least recently mapped goes first when the store is over its cap
        return MappedWeights(weights, manifest, fd, base)

    def manifest(self, key: str) -> Manifest | None:
        """The key's manifest, if the store has a complete file for it (nothing is mapped)."""
        _, manifest_path, _ = self._paths(key)
        try:
            return Manifest.from_json(_read_small(manifest_path), key)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # --- writing --------------------------------------------------------------------------

    @contextlib.contextmanager
    def writer_lock(self, key: str, wait_seconds: float,
                    interrupted: Callable[[], bool] | None = None) -> Iterator[bool]:
        """Hold the key's writer lock (True), or give up after ``wait_seconds`` (False): another
        process is building the same model and the caller builds privately."""
        _, _, lock_path = self._paths(key)
        self.check()
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            deadline = time.monotonic() + wait_seconds
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline or (interrupted and interrupted()):
                        yield False
                        return
                    time.sleep(0.2)
            yield True
        finally:
            os.close(fd)

    def write(self, key: str, tensors: Iterable[tuple[str, torch.Tensor]], info: dict[str, Any]) -> Manifest:
        """Write the tensors (CPU; each name once) and the manifest, atomically. Call with the key's
        writer lock held. Raises StoreError when the store cannot take them (cap, free space)."""
        weights, manifest_path, _ = self._paths(key)
        items = list(tensors)
        layout, size = [], 0
        for name, tensor in items:
            dtype = str(tensor.dtype).removeprefix("torch.")
            if dtype not in _DTYPES:
                raise StoreError(f"{name}: dtype {dtype} cannot be stored")
            layout.append(StoredTensor(name, dtype, tuple(tensor.shape), size))
            size += -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN
        manifest = Manifest(key, size, tuple(layout), info)
        text = manifest.to_json()
        if len(text) > MANIFEST_MAX_BYTES:
            raise StoreError(f"its manifest would be {len(text)} bytes, over {MANIFEST_MAX_BYTES}")
        self.check()
        self.make_room(size, keep=key)
        if size > self.max_bytes - self.used_bytes(exclude=key):
            raise StoreError(f"{_gb(size)} would take the store over its cap of {_gb(self.max_bytes)} "
                             f"({_gb(self.used_bytes(exclude=key))} held by files other processes map)")
        if size > self.free_bytes():
            raise StoreError(f"{_gb(size)} do not fit in {self.directory} ({_gb(self.free_bytes())} free)")
        suffix = f".tmp.{os.getpid()}"
        data_tmp, manifest_tmp = Path(f"{weights}{suffix}"), Path(f"{manifest_path}{suffix}")
        try:
            with _create(data_tmp) as out:
                for item, (_, tensor) in zip(layout, items):
                    out.seek(item.offset)
                    _write_tensor(out, tensor)
                out.truncate(size)
            with _create(manifest_tmp) as out:
                out.write(text.encode("utf-8"))
            os.replace(data_tmp, weights)
            os.replace(manifest_tmp, manifest_path)  # last: a manifest means complete weights
        except BaseException as error:
            for leftover in (data_tmp, manifest_tmp):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            if not isinstance(error, OSError):
                raise
            if error.errno == errno.ENOSPC:
                raise StoreError(f"{self.directory} ran out of space writing {_gb(size)}") from None
            raise StoreError(f"cannot write {weights.name}: {error.strerror or error}") from None
        return manifest

    # --- keeping it tidy ------------------------------------------------------------------

    def keys(self) -> list[str]:
        return sorted(p.stem for p in self.directory.glob("*.json") if _KEY.match(p.stem))

    def used_bytes(self, exclude: str | None = None) -> int:
        total = 0
        for path in [*self.directory.glob("*.weights"), *self.directory.glob("*.tmp.*")]:
            if path.name.split(".", 1)[0] != exclude:
                with contextlib.suppress(OSError):
                    total += path.stat().st_size
        return total

    def remove_if_unmapped(self, key: str) -> bool:
        """Remove the key's files unless a process maps them (it holds the file's shared lock)."""
        weights, manifest_path, _ = self._paths(key)
        with _exclusive(weights, os.O_RDONLY) as taken:
            if taken is False:
                return False
            for path in (manifest_path, weights):  # the writer lock stays: a writer may hold it now
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            return True

    def make_room(self, size: int, keep: str | None = None) -> list[str]:
        """Remove unmapped files, least recently mapped first, until ``size`` more bytes fit under
        the cap (as far as unmapped files allow). Returns the keys removed."""
        removed = []
        if self.used_bytes(exclude=keep) + size <= self.max_bytes:
            return removed
        def last_mapped(key: str) -> float:
            with contextlib.suppress(OSError):
                return (self.directory / f"{key}.json").stat().st_mtime
            return 0.0
        for key in sorted((k for k in self.keys() if k != keep), key=last_mapped):
            if self.used_bytes(exclude=keep) + size <= self.max_bytes:
                break
            if self._writer_gone(key) and self.remove_if_unmapped(key):
                removed.append(key)
                log.info("[memkit] shared weights: removed %s (least recently mapped; store over its cap)", key)
        return removed

    def sweep(self, is_stale: Callable[[Manifest], bool]) -> list[str]:
        """Remove what no process will use: files of writers that died mid-write, weights without a
        manifest, and stale files (``is_stale``: e.g. their model file changed) no process maps."""
        removed = []
        for path in self.directory.glob("*.tmp.*"):
            key = path.name.split(".", 1)[0]
            if _KEY.match(key) and self._writer_gone(key):  # no writer holds its lock: dead or done
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed.append(path.name)
        for key in {p.stem for p in self.directory.glob("*.weights")} - set(self.keys()):
            if _KEY.match(key) and self._writer_gone(key) and self.remove_if_unmapped(key):
                removed.append(key)
        for key in self.keys():
            manifest = self.manifest(key)
            if manifest is not None and is_stale(manifest) and self._writer_gone(key) \
                    and self.remove_if_unmapped(key):
                removed.append(key)
                log.info("[memkit] shared weights: removed %s (its model file changed)", key)
        for lock in self.directory.glob("*.lock"):  # of removed files, once no writer holds them
            if _KEY.match(lock.stem) and not (self.directory / f"{lock.stem}.weights").exists() \
                    and self._writer_gone(lock.stem):
                with contextlib.suppress(OSError):
                    lock.unlink()
        return removed

    def _writer_gone(self, key: str) -> bool:
        _, _, lock_path = self._paths(key)
        with _exclusive(lock_path, os.O_RDWR) as taken:
            return taken is not False

    def mappers(self, key: str) -> int | None:
        """How many processes map the key's file (from ``/proc/locks``), None where unknown."""
        weights, _, _ = self._paths(key)
        try:
            info = weights.stat()
            file_id = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
            with open("/proc/locks", encoding="ascii", errors="replace") as locks:
                lines = locks.read().splitlines()
        except OSError:
            return None
        pids = set()
        for line in lines:
            fields = line.split()
            if "->" in fields:  # a waiter, not a holder
                continue
            if (len(fields) >= 6 and fields[1] == "FLOCK" and fields[3] == "READ"
                    and fields[5] == file_id):
                pids.add(fields[4])
        return len(pids)


_smaps_read: tuple[float, bytes] = (-1e9, b"")
_smaps_lock = threading.Lock()


def _smaps(max_age: float) -> bytes:
    """``/proc/self/smaps``, read again unless a reading at most ``max_age`` seconds old exists."""
    global _smaps_read
    with _smaps_lock:
        taken, data = _smaps_read
        if time.monotonic() - taken > max_age:
            try:
                with open("/proc/self/smaps", "rb") as smaps:
                    data = smaps.read()
            except OSError:
                data = b""
            _smaps_read = (time.monotonic(), data)
        return data


def _write_tensor(out: Any, tensor: torch.Tensor) -> None:
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return
    raw = flat.view(torch.uint8) if flat.element_size() > 0 else flat
    step = max(1, (64 * 2**20) // max(1, raw.element_size()))
    for start in range(0, raw.numel(), step):  # 64 MB at a time: no second copy of a big tensor
        out.write(memoryview(raw[start:start + step].numpy()))


@contextlib.contextmanager
def _exclusive(path: Path, flags: int) -> Iterator[bool | None]:
    """Try an exclusive flock on ``path`` without waiting, held for the block: None when there is
    no such file, else whether the lock was taken (False: a process holds the file's lock)."""
    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
    except FileNotFoundError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            taken = True
        except BlockingIOError:
            taken = False
        yield taken
    finally:
        os.close(fd)


def _create(path: Path) -> Any:
    """A new file of this user's only (0600), never through a link and never an existing file."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a leftover of this process's own earlier, failed write
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), "wb")


def _read_small(path: Path) -> str:
    with open(path, "rb") as handle:
        data = handle.read(MANIFEST_MAX_BYTES + 1)
    if len(data) > MANIFEST_MAX_BYTES:
        raise ValueError(f"{path.name} is over {MANIFEST_MAX_BYTES} bytes")
    return data.decode("utf-8")


def _gb(size: int) -> str:
    return f"{size / 2**30:.2f} GB"
