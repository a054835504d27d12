"""An honest budget and a stale copy that keeps serving: the pure cache's rules."""

from __future__ import annotations

import pytest

from comfyui_memkit.model_cache.cache import BudgetExceededError, Footprint, ModelCache
from comfyui_memkit.model_cache.recipe import FileIdentity, LoadRecipe, ModelKind, NodeCall


def recipe(name: str, size: int = 100, mtime: int = 1) -> LoadRecipe:
    return LoadRecipe(ModelKind.CHECKPOINT, NodeCall.of("CheckpointLoaderSimple", {"ckpt_name": name}),
                      (f"/models/{name}",), (FileIdentity(size, mtime),))


class Value:
    def __init__(self, ram: int, mapped: int = 0) -> None:
        self.ram, self.mapped = ram, mapped


def measure(value: Value) -> Footprint:
    return Footprint(ram=value.ram, mapped=value.mapped)


def test_a_load_in_flight_reserves_the_estimate_not_the_file_size():
    """ComfyUI reads the file's tensors, then builds the model (fp16 becomes fp32 on a CPU)."""
    seen = {}
    cache = ModelCache(measure=measure, budget_bytes=10_000, estimate=lambda r: 2 * r.file_bytes)

    def load():
        seen["reserved"], seen["snapshot"] = cache.reserved_bytes(), cache.snapshot()
        return Value(200)

    cache.get_or_load(recipe("a", size=100), load, cache_key="a")
    assert seen["reserved"] == 200
    assert cache.reserved_bytes() == 0
    during, after = seen["snapshot"], cache.snapshot()  # status shows the load in flight with its reservation
    assert (during.entries, during.loading, during.reserved_bytes, during.loads) == ([], [("a", 0)], 200, 0)
    assert ([e.cache_key for e in after.entries], after.loading, after.reserved_bytes, after.loads) == (["a"], [], 0, 1)


def test_an_estimate_that_fails_falls_back_to_the_file_size():
    seen = {}
    cache = ModelCache(measure=measure, budget_bytes=10_000, estimate=lambda r: 1 / 0)

    def load():
        seen["reserved"] = cache.reserved_bytes()
        return Value(100)

    cache.get_or_load(recipe("a", size=100), load, cache_key="a")
    assert seen["reserved"] == 100


def test_mapped_memory_is_reported_but_not_budgeted():
    """A loader that memory-maps its file: the page cache can drop those pages, they are not private."""
    cache = ModelCache(measure=measure, budget_bytes=1000)
    cache.get_or_load(recipe("a"), lambda: Value(ram=400, mapped=5000), cache_key="a", pinned=True)
    cache.get_or_load(recipe("b"), lambda: Value(ram=400, mapped=5000), cache_key="b")
    assert [e.cache_key for e in cache.entries()] == ["a", "b"], "mapped bytes must not evict anything"
    assert cache.snapshot().footprint == Footprint(ram=800, mapped=10_000)
    assert cache.snapshot().over_budget_bytes == 0


def test_pinned_entries_over_the_budget_are_reported_with_the_amount():
    cache = ModelCache(measure=measure, budget_bytes=1000)
    cache.get_or_load(recipe("a"), lambda: Value(700), cache_key="a", pinned=True)
    cache.get_or_load(recipe("b"), lambda: Value(600), cache_key="b", pinned=True)
    assert len(cache.entries()) == 2
    assert cache.snapshot().over_budget_bytes == 300


def test_refuse_over_budget_fails_the_load_naming_the_budget_and_the_entry_before_loading():
    cache = ModelCache(measure=measure, budget_bytes=1000, refuse_over_budget=True)
    cache.get_or_load(recipe("a"), lambda: Value(700), cache_key="a", pinned=True)
    loads = []
    with pytest.raises(BudgetExceededError, match=r"loading b .*ram_budget_gb.*refuse_over_budget"):
        cache.get_or_load(recipe("b", size=600), lambda: loads.append(1) or Value(600), cache_key="b")
    assert loads == [], "refused from its estimate, before anything was read"
    assert [e.cache_key for e in cache.entries()] == ["a"]
    assert cache.snapshot().over_budget_bytes == 0
    assert cache.loading() == [], "a refused load leaves no flight behind"


def test_refuse_over_budget_also_refuses_a_load_larger_than_estimated():
    cache = ModelCache(measure=measure, budget_bytes=1000, refuse_over_budget=True)
    cache.get_or_load(recipe("a"), lambda: Value(700), cache_key="a", pinned=True)
    with pytest.raises(BudgetExceededError, match="loading b took"):
        cache.get_or_load(recipe("b", size=100), lambda: Value(600), cache_key="b")
    assert [e.cache_key for e in cache.entries()] == ["a"]


def test_refuse_over_budget_still_evicts_unpinned_entries_first():
    cache = ModelCache(measure=measure, budget_bytes=1000, refuse_over_budget=True)
    cache.get_or_load(recipe("a"), lambda: Value(700), cache_key="a")
    cache.get_or_load(recipe("b", size=600), lambda: Value(600), cache_key="b")
    assert [e.cache_key for e in cache.entries()] == ["b"]


def test_without_refusal_the_budget_evicts_after_measuring_the_new_load():
    cache = ModelCache(measure=measure, budget_bytes=1000)
    cache.get_or_load(recipe("a"), lambda: Value(500), cache_key="a")
    cache.get_or_load(recipe("b", size=10), lambda: Value(600), cache_key="b")  # estimated small, measured large
    assert [e.cache_key for e in cache.entries()] == ["b"]


def test_a_failed_reload_of_a_changed_file_serves_the_old_copy_as_stale():
    cache = ModelCache(measure=measure)
    old = cache.get_or_load(recipe("a", mtime=1), lambda: Value(10), cache_key="a").value
    changed = recipe("a", mtime=2)
    assert changed.lineage == recipe("a", mtime=1).lineage
    assert changed.key != recipe("a", mtime=1).key
    served = cache.serve_stale(changed, "truncated: header too short")
    assert served is not None
    assert served.value is old
    assert served.entry.stale == "truncated: header too short"
    assert cache.serve_stale(recipe("other"), "x") is None, "no earlier version: nothing to serve"
    fresh = cache.get_or_load(changed, lambda: Value(10), cache_key="a")  # the file is whole again
    assert [e.stale for e in cache.entries()] == [None]
    assert cache.entries()[0].value is fresh.value


def test_remeasure_updates_footprints_of_entries_still_cached():
    sizes = {"a": 100}
    cache = ModelCache(measure=lambda value: Footprint(ram=sizes[value]))
    cache.get_or_load(recipe("a"), lambda: "a", cache_key="a")
    sizes["a"] = 10  # ComfyUI moved most of it to the GPU
    assert cache.snapshot().footprint.ram == 100, "reading the footprint measures nothing"
    cache.remeasure()
    assert cache.snapshot().footprint.ram == 10


def test_evictions_before_a_load_give_their_memory_back_before_it_starts():
    events = []
    cache = ModelCache(measure=measure, budget_bytes=1000, reclaim=lambda: events.append("reclaim"),
                       estimate=lambda r: 2 * r.file_bytes)
    cache.get_or_load(recipe("a", size=100), lambda: events.append("load a") or Value(300), cache_key="a")
    cache.get_or_load(recipe("b", size=400), lambda: events.append("load b") or Value(600), cache_key="b")
    assert events == ["load a", "reclaim", "load b"], "a was evicted for b's peak, and freed before b loaded"
    assert [e.cache_key for e in cache.entries()] == ["b"]


def test_the_copy_of_a_file_that_is_gone_is_served_as_stale_by_its_cache_key():
    cache = ModelCache(measure=measure)
    kept = cache.get_or_load(recipe("a"), lambda: Value(10), cache_key="vae:a").value
    served = cache.serve_stale(None, "vae 'a' is not a file in ComfyUI's model folders", cache_key="vae:a")
    assert served is not None
    assert served.value is kept
    assert served.entry.stale.startswith("vae 'a' is not a file")
    assert cache.serve_stale(None, "x", cache_key="vae:other") is None


def test_a_snapshot_is_one_instant_that_later_changes_leave_alone():
    """Status is built from one snapshot: rows, totals and the budget must not come from
    different moments (a burst of loads and evictions once showed a cache over its budget with
    ``over_budget_bytes`` 0, read a moment later)."""
    cache = ModelCache(measure=measure, budget_bytes=1000)
    cache.get_or_load(recipe("a"), lambda: Value(ram=700), cache_key="a", pinned=True)
    cache.get_or_load(recipe("b"), lambda: Value(ram=600), cache_key="b")  # kept over the budget: it was just used
    snapshot = cache.snapshot()
    cache.set_pinned("a", False)
    cache.evict("b")
    assert [(e.cache_key, e.pinned) for e in snapshot.entries] == [("a", True), ("b", False)]
    assert snapshot.footprint.ram == 1300
    assert snapshot.over_budget_bytes == 300
    assert cache.snapshot().over_budget_bytes == 0
    assert cache.snapshot().evictions == 1
