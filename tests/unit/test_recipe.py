import os

from comfyui_memkit.model_cache.recipe import FileIdentityReader, LoadRecipe, ModelKind


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_same_file_and_options_give_the_same_key(tmp_path):
    path = _write(tmp_path / "a.safetensors", b"x" * 10)
    reader = FileIdentityReader()
    first = LoadRecipe.build(ModelKind.VAE, [path], {}, reader)
    second = LoadRecipe.build(ModelKind.VAE, [path], {}, reader)
    assert first.key == second.key
    assert first == second


def test_options_and_kind_are_part_of_the_key(tmp_path):
    path = _write(tmp_path / "a.safetensors", b"x")
    reader = FileIdentityReader()
    default = LoadRecipe.build(ModelKind.DIFFUSION_MODEL, [path], {"weight_dtype": "default"}, reader)
    fp8 = LoadRecipe.build(ModelKind.DIFFUSION_MODEL, [path], {"weight_dtype": "fp8_e4m3fn"}, reader)
    as_vae = LoadRecipe.build(ModelKind.VAE, [path], {"weight_dtype": "default"}, reader)
    assert len({default.key, fp8.key, as_vae.key}) == 3
    assert default.lineage != fp8.lineage


def test_a_changed_file_keeps_its_lineage_but_changes_its_key(tmp_path):
    path = _write(tmp_path / "a.safetensors", b"x" * 10)
    reader = FileIdentityReader()
    before = LoadRecipe.build(ModelKind.VAE, [path], {}, reader)
    _write(tmp_path / "a.safetensors", b"y" * 11)
    after = LoadRecipe.build(ModelKind.VAE, [path], {}, reader)
    assert before.lineage == after.lineage
    assert before.key != after.key


def test_content_hash_sees_a_same_size_same_mtime_rewrite(tmp_path):
    path = _write(tmp_path / "a.safetensors", b"x" * 10)
    stat = os.stat(path)
    reader = FileIdentityReader(hash_contents=True)
    before = LoadRecipe.build(ModelKind.VAE, [path], {}, reader)
    _write(tmp_path / "a.safetensors", b"z" * 10)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = LoadRecipe.build(ModelKind.VAE, [path], {}, FileIdentityReader(hash_contents=True))
    assert before.key != after.key
    assert after.identities[0].sha256 is not None


def test_paths_are_resolved_so_links_share_an_entry(tmp_path):
    path = _write(tmp_path / "a.safetensors", b"x")
    link = tmp_path / "link.safetensors"
    link.symlink_to(path)
    reader = FileIdentityReader()
    assert LoadRecipe.build(ModelKind.VAE, [str(link)], {}, reader).key == \
        LoadRecipe.build(ModelKind.VAE, [path], {}, reader).key


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
