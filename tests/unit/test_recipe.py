import os
import time

import pytest

from comfyui_memkit.model_cache.loads import loader_call
from comfyui_memkit.model_cache.recipe import FileIdentity, FileIdentityReader, LoadRecipe, ModelKind

VAE = loader_call(ModelKind.VAE, ["a.safetensors"], {})


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_same_file_and_options_give_the_same_key(tmp_path):
    path = _write(tmp_path / "a.safetensors", b"x" * 10)
    reader = FileIdentityReader()
    first = LoadRecipe.build(ModelKind.VAE, VAE, [path], reader)
    second = LoadRecipe.build(ModelKind.VAE, VAE, [path], reader)
    assert first.key == second.key
    assert first == second


def test_options_and_kind_are_part_of_the_key(tmp_path):
    path = _write(tmp_path / "a.safetensors", b"x")
    reader = FileIdentityReader()
    call = loader_call(ModelKind.DIFFUSION_MODEL, ["a.safetensors"], {"weight_dtype": "default"})
    default = LoadRecipe.build(ModelKind.DIFFUSION_MODEL, call, [path], reader)
    fp8 = LoadRecipe.build(ModelKind.DIFFUSION_MODEL, loader_call(
        ModelKind.DIFFUSION_MODEL, ["a.safetensors"], {"weight_dtype": "fp8_e4m3fn"}), [path], reader)
    as_vae = LoadRecipe.build(ModelKind.VAE, call, [path], reader)
    assert len({default.key, fp8.key, as_vae.key}) == 3
    assert default.lineage != fp8.lineage


def test_a_changed_file_keeps_its_lineage_but_changes_its_key(tmp_path):
    path = _write(tmp_path / "a.safetensors", b"x" * 10)
    reader = FileIdentityReader()
    before = LoadRecipe.build(ModelKind.VAE, VAE, [path], reader)
    _write(tmp_path / "a.safetensors", b"y" * 11)
    after = LoadRecipe.build(ModelKind.VAE, VAE, [path], reader)
    assert before.lineage == after.lineage
    assert before.key != after.key


def test_content_hash_sees_a_same_size_same_mtime_rewrite(tmp_path):
    path = _write(tmp_path / "a.safetensors", b"x" * 10)
    stat = os.stat(path)
    reader = FileIdentityReader(hash_contents=True)
    before = LoadRecipe.build(ModelKind.VAE, VAE, [path], reader)
    _write(tmp_path / "a.safetensors", b"z" * 10)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = LoadRecipe.build(ModelKind.VAE, VAE, [path], FileIdentityReader(hash_contents=True))
    assert before.key != after.key
    assert after.identities[0].sha256 is not None


def test_paths_are_resolved_so_links_share_an_entry(tmp_path):
    path = _write(tmp_path / "a.safetensors", b"x")
    link = tmp_path / "link.safetensors"
    link.symlink_to(path)
    reader = FileIdentityReader()
    assert LoadRecipe.build(ModelKind.VAE, VAE, [str(link)], reader).key == \
        LoadRecipe.build(ModelKind.VAE, VAE, [path], reader).key


def test_hash_contents_sees_a_file_rewritten_with_the_same_size_and_mtime(tmp_path):
    import os

    from comfyui_memkit.model_cache.recipe import FileIdentityReader

    path = tmp_path / "model.safetensors"
    path.write_bytes(b"A" * 4096)
    reader = FileIdentityReader(hash_contents=True)
    before = reader.read(str(path))
    stat = os.stat(path)
    with open(path, "r+b") as handle:  # rewritten in place: same inode, same size
        handle.write(b"B" * 4096)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and its mtime set back
    after = reader.read(str(path))
    assert (after.size, after.mtime_ns) == (before.size, before.mtime_ns)
    assert after.sha256 != before.sha256


def _wait_for_a_new_ctime(path) -> None:
    """The kernel stamps ctimes from a coarse clock (a few ms); wait until a change made now gets
    a later ctime than the file's current one."""
    ctime = os.stat(path).st_ctime_ns
    while time.time_ns() < ctime + 50_000_000:
        time.sleep(0.01)


def test_a_copy_in_place_that_keeps_size_and_mtime_is_a_new_key(tmp_path):
    path = _write(tmp_path / "a.safetensors", b"x" * 10)
    stat = os.stat(path)
    reader = FileIdentityReader()
    before = LoadRecipe.build(ModelKind.VAE, VAE, [path], reader)
    _wait_for_a_new_ctime(path)
    with open(path, "r+b") as handle:  # what `cp -p` does over an existing file: same inode
        handle.write(b"y" * 10)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the source's mtime
    after = LoadRecipe.build(ModelKind.VAE, VAE, [path], reader)
    assert (after.identities[0].size, after.identities[0].mtime_ns) == (10, stat.st_mtime_ns)
    assert after.identities[0].inode == before.identities[0].inode == stat.st_ino
    assert after.identities[0].ctime_ns > before.identities[0].ctime_ns
    assert after.key != before.key
    assert after.lineage == before.lineage


def test_a_file_replaced_by_rename_that_keeps_size_and_mtime_is_a_new_key(tmp_path):
    path = _write(tmp_path / "a.safetensors", b"x" * 10)
    stat = os.stat(path)
    reader = FileIdentityReader()
    before = LoadRecipe.build(ModelKind.VAE, VAE, [path], reader)
    temp = _write(tmp_path / ".a.safetensors.tmp", b"y" * 10)  # what `rsync -t` does: a new file, renamed over
    os.utime(temp, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(temp, path)
    after = LoadRecipe.build(ModelKind.VAE, VAE, [path], reader)
    assert (after.identities[0].size, after.identities[0].mtime_ns) == (10, stat.st_mtime_ns)
    assert after.identities[0].inode != before.identities[0].inode
    assert after.key != before.key
    assert after.lineage == before.lineage


@pytest.mark.parametrize("changed", [{"inode": 2}, {"ctime_ns": 6}, {"size": 11}, {"mtime_ns": 5}, {"sha256": "ab"}])
def test_every_part_of_a_file_identity_is_in_the_key_and_none_in_the_lineage(changed):
    same = {"size": 10, "mtime_ns": 4, "inode": 1, "ctime_ns": 5, "sha256": None}
    base = LoadRecipe(ModelKind.VAE, VAE, ("/m/a",), (FileIdentity(**same),))
    other = LoadRecipe(ModelKind.VAE, VAE, ("/m/a",), (FileIdentity(**{**same, **changed}),))
    assert other.key != base.key
    assert other.lineage == base.lineage
    assert LoadRecipe(ModelKind.VAE, VAE, ("/m/a",), (FileIdentity(**same),)).key == base.key


def test_reading_an_identity_is_one_stat(tmp_path, monkeypatch):
    path = _write(tmp_path / "a.safetensors", b"x" * 10)
    calls = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: calls.append(p) or real_stat(p, *a, **k))
    identity = FileIdentityReader().read(path)
    assert calls == [path]
    stat = real_stat(path)
    assert identity == FileIdentity(stat.st_size, stat.st_mtime_ns, inode=stat.st_ino, ctime_ns=stat.st_ctime_ns)


def test_the_portable_key_ignores_inode_and_ctime_but_not_size_mtime_or_hash():
    """Disk conditioning keys outlive the process: a copy to a new host keeps them (same size and
    mtime); the in-process key still tells the copies apart."""
    def made(**changes):
        fields = {"size": 10, "mtime_ns": 1, "inode": 5, "ctime_ns": 7, "sha256": None, **changes}
        return LoadRecipe(ModelKind.VAE, VAE, ("/m/a.safetensors",), (FileIdentity(**fields),))

    copied = made(inode=99, ctime_ns=100)
    assert copied.portable_key == made().portable_key
    assert copied.key != made().key
    for changes in ({"size": 11}, {"mtime_ns": 2}, {"sha256": "ab"}):
        assert made(**changes).portable_key != made().portable_key, changes
