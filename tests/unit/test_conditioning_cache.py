"""The conditioning cache core: round trips, disk failures that never fail a prompt, caps."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from pathlib import Path

import pytest
import torch

from comfyui_memkit.model_cache import conditioning as conditioning_module
from comfyui_memkit.model_cache.conditioning import ConditioningCache, conditioning_key

try:
    import resource
except ImportError:  # Windows
    resource = None

KEYS = {name: conditioning_key("enc", name) for name in ("a", "b", "c", "d", "e", "probe", "outside")}
NAMES = {key: name for name, key in KEYS.items()}


def conditioning(seed: int = 0, tokens: int = 77) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn((1, tokens, 768), generator=generator),
             {"pooled_output": torch.randn((1, 768), generator=generator),
              "attention_mask": torch.ones((1, tokens), dtype=torch.int64), "area": [64, 64, 0, 0],
              "strength": 0.8}],
            [torch.randn((1, tokens, 768), generator=generator), {}]]


def same(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for (cond_a, extras_a), (cond_b, extras_b) in zip(a, b):
        if not torch.equal(cond_a, cond_b) or extras_a.keys() != extras_b.keys():
            return False
        for name, value in extras_a.items():
            other = extras_b[name]
            if isinstance(value, torch.Tensor):
                if not (isinstance(other, torch.Tensor) and other.dtype == value.dtype and torch.equal(value, other)):
                    return False
            elif value != other:
                return False
    return True


def test_every_entry_round_trips_through_the_disk(tmp_path):
    key = conditioning_key("encoder-a", "a fox")
    ConditioningCache(2**30, tmp_path, 2**30).put(key, conditioning(), disk=True)
    fresh = ConditioningCache(2**30, tmp_path, 2**30)  # a restart: empty RAM
    found = fresh.get(key, disk=True)
    assert same(found, conditioning())
    assert (fresh.stats.disk_hits, fresh.stats.misses) == (1, 0)
    assert fresh.get(key, disk=True) is not None
    assert fresh.stats.ram_hits == 1


def test_keys_differ_by_encoder_and_by_exact_text():
    keys = {conditioning_key("a", "fox"), conditioning_key("b", "fox"), conditioning_key("a", "fox "),
            conditioning_key("a", "Fox")}
    assert len(keys) == 4


def test_a_hit_is_safe_from_nodes_that_edit_their_input(tmp_path):
    cache = ConditioningCache(2**30, None, 0)
    cache.put("k", conditioning(), disk=False)
    first = cache.get("k", disk=False)
    first[0][1]["strength"] = 0.1
    first.append("junk")
    assert same(cache.get("k", disk=False), conditioning())


def test_corrupt_truncated_or_foreign_files_are_a_miss_kept_and_replaced_by_put(tmp_path, caplog):
    """Never deleted on a read: a miss with one bounded warning per file; the next put replaces it."""
    from safetensors.torch import save_file

    cache = ConditioningCache(0, tmp_path, 2**30)
    key = conditioning_key("enc", "text")
    path = tmp_path / f"{key}.safetensors"
    for broken in (b"\x00garbage" * 1000, None, "foreign"):
        if broken is None:  # a file cut short
            cache.put(key, conditioning(), disk=True)
            path.write_bytes(path.read_bytes()[:200])
        elif broken == "foreign":  # a valid safetensors file someone else wrote
            save_file({"x": torch.zeros(2)}, str(path), metadata={"format": "other" * 10_000})
        else:
            path.write_bytes(broken)
        before = path.read_bytes()
        reader = ConditioningCache(0, tmp_path, 2**30)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="memkit.conditioning"):
            assert reader.get(key, disk=True) is None
            assert reader.get(key, disk=True) is None
        assert path.read_bytes() == before, "a file that cannot be read is kept as it is"
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 1, warnings
        assert path.name in warnings[0]
        assert len(warnings[0]) < 1200, "the warning is bounded"
        reader.put(key, conditioning(), disk=True)
        assert same(ConditioningCache(0, tmp_path, 2**30).get(key, disk=True), conditioning())


def test_objects_that_are_not_data_stay_in_ram_only(tmp_path):
    cache = ConditioningCache(2**30, tmp_path, 2**30)
    hooked = [[torch.zeros(1, 2, 3), {"hooks": object()}]]
    cache.put(conditioning_key("enc", "hooked"), hooked, disk=True)
    assert list(tmp_path.glob("*.safetensors")) == []
    assert cache.get(conditioning_key("enc", "hooked"), disk=True) is not None


def file_size(tmp_path) -> int:
    """The size of one ``conditioning()`` entry on disk."""
    probe = ConditioningCache(0, tmp_path / "probe", 2**30)
    probe.put(KEYS["probe"], conditioning(), disk=True)
    return (tmp_path / "probe" / f"{KEYS['probe']}.safetensors").stat().st_size


def entry_names(folder) -> list[str]:
    return sorted(NAMES[p.stem] for p in folder.glob("*.safetensors") if p.is_file() and not p.is_symlink()
                  and p.stem in NAMES)


def test_the_disk_cap_evicts_the_least_recently_used_files(tmp_path):
    cache = ConditioningCache(0, tmp_path / "cache", int(2.5 * file_size(tmp_path)))
    for name in ("a", "b"):
        cache.put(KEYS[name], conditioning(), disk=True)
    assert cache.get(KEYS["a"], disk=True) is not None  # a is used again
    cache.put(KEYS["c"], conditioning(), disk=True)
    assert entry_names(tmp_path / "cache") == ["a", "c"]
    assert not list((tmp_path / "cache").glob(".*partial")), "no temporary file is left behind"


def test_the_ram_cap_keeps_the_most_recent(tmp_path):
    one = conditioning()
    cache = ConditioningCache(int(1.5 * sum(t.numel() * t.element_size() for t in (one[0][0], one[1][0],
                                                                                    one[0][1]["pooled_output"],
                                                                                    one[0][1]["attention_mask"]))),
                              None, 0)
    cache.put("a", one, disk=False)
    cache.put("b", one, disk=False)
    assert cache.get("a", disk=False) is None
    assert cache.get("b", disk=False) is not None


# --- faults: the folder is the user's and the disk can fail --------------------------------


class ModuleOs:
    """Stands in for the module's ``os``: the real one, with a few functions replaced (fault injection)."""

    def __init__(self, **replaced) -> None:
        self.__dict__.update(replaced)

    def __getattr__(self, name: str):
        return getattr(os, name)


def test_a_dangling_symlink_breaks_neither_the_report_nor_the_cap(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    dangling = folder / f"{KEYS['e']}.safetensors"
    dangling.symlink_to(tmp_path / "gone.safetensors")
    cache = ConditioningCache(0, folder, int(2.5 * file_size(tmp_path)))
    assert cache.report()["disk_files"] == 0
    for name in ("a", "b", "c"):
        cache.put(KEYS[name], conditioning(), disk=True)
    assert entry_names(folder) == ["b", "c"], "the cap still holds"
    assert dangling.is_symlink(), "the symlink is not ours to delete"
    assert cache.get(KEYS["e"], disk=True) is None
    report = cache.report()
    assert (report["disk_files"], report["disk_bytes"]) == (2, 2 * file_size(tmp_path))


def test_a_file_vanishing_between_listing_and_stat_is_skipped(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    size = file_size(tmp_path)
    cache = ConditioningCache(0, folder, int(2.5 * size))
    for name in ("a", "b"):
        cache.put(KEYS[name], conditioning(), disk=True)
    victim = f"{KEYS['a']}.safetensors"

    class Vanishing:
        """A directory entry whose file another process deletes just before we stat it."""

        def __init__(self, entry) -> None:
            self.name, self.path, self._entry = entry.name, entry.path, entry

        def stat(self, *, follow_symlinks: bool = True):
            if self.name == victim:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            return self._entry.stat(follow_symlinks=follow_symlinks)

    @contextlib.contextmanager
    def scandir(path):
        with os.scandir(path) as found:  # the vanishing file first: the others must still be listed
            yield [Vanishing(entry) for entry in sorted(found, key=lambda entry: entry.name != victim)]

    monkeypatch.setattr(conditioning_module, "os", ModuleOs(scandir=scandir))
    assert cache.report()["disk_files"] == 1
    (folder / victim).write_bytes(b"x" * size)  # back, vanishing again at the next listing
    cache.put(KEYS["c"], conditioning(), disk=True)
    cache.put(KEYS["d"], conditioning(), disk=True)
    monkeypatch.undo()
    assert entry_names(folder) == ["c", "d"], "the cap was enforced on the files that stayed"


def test_foreign_files_are_never_read_counted_or_deleted(tmp_path, caplog):
    folder = tmp_path / "cache"
    folder.mkdir()
    size = file_size(tmp_path)
    outside = ConditioningCache(0, tmp_path / "elsewhere", 2**30)
    outside.put(KEYS["outside"], conditioning(1), disk=True)
    foreign = {
        "notes.txt": b"mine",
        "model.safetensors": b"y" * 10 * size,
        f"{KEYS['d']}.json": b"{}",
        f"{KEYS['d']}.safetensors.bak": b"z" * size,
        f".{KEYS['d']}.safetensors.tmp": b"t",
        f"sub/{KEYS['d']}.safetensors": b"w" * size,
    }
    for name, data in foreign.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / f"{KEYS['e']}.safetensors").mkdir()  # a folder where an entry is expected
    link = folder / f"{KEYS['outside']}.safetensors"
    link.symlink_to(tmp_path / "elsewhere" / f"{KEYS['outside']}.safetensors")  # a valid entry, outside
    cache = ConditioningCache(0, folder, int(2.5 * size))
    with caplog.at_level(logging.WARNING, logger="memkit.conditioning"):
        assert cache.get(KEYS["outside"], disk=True) is None, "a symlink is never read"
        assert cache.get(KEYS["e"], disk=True) is None
        cache.put(KEYS["e"], conditioning(), disk=True)  # cannot replace a folder: RAM only, no error
    assert any(KEYS["e"] in record.getMessage() for record in caplog.records)
    assert cache.report()["disk_files"] == 0
    for name in ("a", "b", "c"):
        cache.put(KEYS[name], conditioning(), disk=True)
    assert entry_names(folder) == ["b", "c"]
    assert cache.report()["disk_files"] == 2
    for name, data in foreign.items():
        assert (folder / name).read_bytes() == data, name
    assert (folder / f"{KEYS['e']}.safetensors").is_dir()
    assert link.is_symlink()
    assert same(ConditioningCache(0, tmp_path / "elsewhere", 2**30).get(KEYS["outside"], disk=True),
                conditioning(1))
    assert not list(folder.glob(".*.partial"))


def test_a_key_that_is_not_a_digest_never_names_a_path(tmp_path):
    cache = ConditioningCache(2**30, tmp_path / "cache", 2**30)
    cache.put("../escape", conditioning(), disk=True)
    assert not (tmp_path / "escape.safetensors").exists()
    assert cache.get("../escape", disk=True) is not None  # kept in RAM


@pytest.mark.parametrize("fault", [MemoryError(), OSError(errno.EIO, "Input/output error"),
                                   PermissionError(errno.EACCES, "Permission denied " + "x" * 100_000)])
def test_a_transient_read_error_is_a_miss_and_keeps_the_file(tmp_path, monkeypatch, caplog, fault):
    key = KEYS["a"]
    ConditioningCache(0, tmp_path, 2**30).put(key, conditioning(), disk=True)

    def failing(*args, **kwargs):
        raise fault

    monkeypatch.setattr(conditioning_module, "safe_open", failing)
    reader = ConditioningCache(0, tmp_path, 2**30)
    with caplog.at_level(logging.WARNING, logger="memkit.conditioning"):
        assert reader.get(key, disk=True) is None
    assert all(len(record.getMessage()) < 1200 for record in caplog.records)
    monkeypatch.undo()
    assert (tmp_path / f"{key}.safetensors").is_file(), "a transient error never deletes"
    assert same(reader.get(key, disk=True), conditioning()), "read again once the fault is over"


@pytest.mark.skipif(resource is None, reason="RLIMIT_NOFILE is POSIX")
def test_too_many_open_files_is_a_miss_and_keeps_the_file(tmp_path):
    """A real EMFILE (safetensors reports it as FileNotFoundError): no descriptor can be opened."""
    key = KEYS["a"]
    ConditioningCache(0, tmp_path, 2**30).put(key, conditioning(), disk=True)
    reader = ConditioningCache(0, tmp_path, 2**30)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (3, hard))
    try:
        found = reader.get(key, disk=True)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert found is None
    assert same(reader.get(key, disk=True), conditioning()), "the file survived"


def test_the_cap_skips_a_file_it_cannot_delete(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    cache = ConditioningCache(0, folder, int(2.5 * file_size(tmp_path)))
    for name in ("a", "b"):
        cache.put(KEYS[name], conditioning(), disk=True)
    stuck = folder / f"{KEYS['a']}.safetensors"

    def unlink(path, *args, **kwargs):
        if Path(path) == stuck:
            raise PermissionError(errno.EPERM, "Operation not permitted", str(path))
        return os.unlink(path, *args, **kwargs)

    monkeypatch.setattr(conditioning_module, "os", ModuleOs(unlink=unlink))
    cache.put(KEYS["c"], conditioning(), disk=True)
    monkeypatch.undo()
    assert entry_names(folder) == ["a", "c"], "the next oldest went instead"


def test_the_temporary_file_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events: list[tuple[str, object]] = []

    def fsync(fd):
        info = os.fstat(fd)
        events.append(("fsync folder" if stat.S_ISDIR(info.st_mode) else "fsync file", info.st_ino))
        return os.fsync(fd)

    def replace(source, target):
        events.append(("replace", Path(target).name))
        return os.replace(source, target)

    monkeypatch.setattr(conditioning_module, "os", ModuleOs(fsync=fsync, replace=replace))
    ConditioningCache(0, tmp_path, 2**30).put(KEYS["a"], conditioning(), disk=True)
    entry = tmp_path / f"{KEYS['a']}.safetensors"
    assert events == [("fsync file", entry.stat().st_ino), ("replace", entry.name),
                      ("fsync folder", tmp_path.stat().st_ino)]


def test_stale_temporary_files_of_a_killed_writer_are_removed(tmp_path):
    cache = ConditioningCache(0, tmp_path, 2**30)
    two_hours_ago = time.time() - 7200
    stale = [tmp_path / f".{KEYS['a']}.safetensors.{os.getpid()}.140.partial",  # the old naming
             tmp_path / f".{KEYS['b']}.safetensors.77-0a1b2c3d.partial"]
    fresh = tmp_path / f".{KEYS['c']}.safetensors.78-0a1b2c3d.partial"  # may still be being written
    foreign = tmp_path / ".somebody-else.partial"
    for path in (*stale, fresh, foreign):
        path.write_bytes(b"half")
        if path is not fresh:
            os.utime(path, (two_hours_ago, two_hours_ago))
    cache.put(KEYS["d"], conditioning(), disk=True)
    assert [path.exists() for path in stale] == [False, False]
    assert fresh.exists()
    assert foreign.exists()


def test_the_report_never_raises_on_a_missing_or_unreadable_folder(tmp_path, monkeypatch):
    assert ConditioningCache(0, tmp_path / "missing", 2**30).report()["disk_files"] == 0
    (tmp_path / "a-file").write_bytes(b"")
    in_the_way = ConditioningCache(0, tmp_path / "a-file", 2**30)
    in_the_way.put(KEYS["a"], conditioning(), disk=True)  # no folder can be made: RAM only
    assert in_the_way.report()["disk_files"] == 0
    cache = ConditioningCache(0, tmp_path / "cache", 2**30)
    cache.put(KEYS["a"], conditioning(), disk=True)

    def scandir(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(conditioning_module, "os", ModuleOs(scandir=scandir))
    assert cache.report()["disk_files"] == 0
    assert same(cache.get(KEYS["a"], disk=True), conditioning()), "the entry itself is still read"
