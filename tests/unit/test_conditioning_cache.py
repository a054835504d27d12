"""The conditioning cache core: round trips, disk failures that never fail a prompt, caps."""

from __future__ import annotations

import torch

from comfyui_memkit.model_cache.conditioning import ConditioningCache, conditioning_key


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


def test_corrupt_truncated_or_foreign_files_are_ignored_and_rewritten(tmp_path):
    from safetensors.torch import save_file

    cache = ConditioningCache(0, tmp_path, 2**30)
    key = conditioning_key("enc", "text")
    path = tmp_path / f"{key}.safetensors"
    for broken in (b"\x00garbage", None, "foreign"):
        if broken is None:  # a file cut short
            cache.put(key, conditioning(), disk=True)
            path.write_bytes(path.read_bytes()[:200])
        elif broken == "foreign":  # a valid safetensors file someone else wrote
            save_file({"x": torch.zeros(2)}, str(path), metadata={"format": "other"})
        else:
            path.write_bytes(broken)
        reader = ConditioningCache(0, tmp_path, 2**30)
        assert reader.get(key, disk=True) is None
        assert not path.exists(), "the unreadable file is removed"
        reader.put(key, conditioning(), disk=True)
        assert same(ConditioningCache(0, tmp_path, 2**30).get(key, disk=True), conditioning())


def test_objects_that_are_not_data_stay_in_ram_only(tmp_path):
    cache = ConditioningCache(2**30, tmp_path, 2**30)
    hooked = [[torch.zeros(1, 2, 3), {"hooks": object()}]]
    cache.put("k", hooked, disk=True)
    assert list(tmp_path.glob("*.safetensors")) == []
    assert cache.get("k", disk=True) is not None


def test_the_disk_cap_evicts_the_least_recently_used_files(tmp_path):
    one = conditioning()
    size_probe = ConditioningCache(0, tmp_path / "probe", 2**30)
    size_probe.put("probe", one, disk=True)
    file_size = (tmp_path / "probe" / "probe.safetensors").stat().st_size
    cache = ConditioningCache(0, tmp_path / "cache", int(2.5 * file_size))
    for name in ("a", "b"):
        cache.put(name, one, disk=True)
    assert cache.get("a", disk=True) is not None  # a is used again
    cache.put("c", one, disk=True)
    names = sorted(p.stem for p in (tmp_path / "cache").glob("*.safetensors"))
    assert names == ["a", "c"]
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
