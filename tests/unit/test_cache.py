import threading
import time

import pytest

from comfyui_memkit.model_cache.cache import CacheLoadError, Footprint, ModelCache
from comfyui_memkit.model_cache.recipe import FileIdentity, LoadRecipe, ModelKind, NodeCall


def recipe(name: str, size: int = 100, mtime: int = 1, **options) -> LoadRecipe:
    return LoadRecipe(ModelKind.CHECKPOINT, NodeCall.of("CheckpointLoaderSimple", {"ckpt_name": name, **options}),
                      (f"/models/{name}",), (FileIdentity(size, mtime),))


class Payload:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


class NamedCache(ModelCache):
    """Names entries ``checkpoint:<file>`` as the service does, so the assertions read well."""

    def get_or_load(self, recipe, load, **kwargs):
        kwargs.setdefault("cache_key", f"{recipe.kind.value}:{recipe.paths[0].rsplit('/', 1)[-1]}")
        return super().get_or_load(recipe, load, **kwargs)


def make_cache(budget: int | None = None) -> ModelCache:
    return NamedCache(measure=lambda value: Footprint(ram=value.nbytes), budget_bytes=budget)


def test_second_request_is_a_hit_without_loading():
    cache = make_cache()
    calls = []
    first = cache.get_or_load(recipe("a"), lambda: calls.append(1) or Payload(10))
    second = cache.get_or_load(recipe("a"), lambda: calls.append(1) or Payload(10))
    assert calls == [1]
    assert not first.hit
    assert second.hit
    assert second.value is first.value
    assert second.entry.hits == 1


def test_eight_threads_asking_for_one_recipe_load_it_once():
    cache = make_cache()
    started = threading.Event()
    release = threading.Event()
    loads = []

    def slow_load():
        loads.append(threading.current_thread().name)
        started.set()
        release.wait(5)
        return Payload(10)

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_load(recipe("a"), slow_load)))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    assert started.wait(5)
    time.sleep(0.1)  # let the other seven reach the wait
    release.set()
    for thread in threads:
        thread.join(5)
    assert len(loads) == 1
    assert len(results) == 8
    assert len({id(r.value) for r in results}) == 1
    assert sum(not r.hit for r in results) == 1
    assert cache.loads == 1


def test_a_failed_load_reaches_every_waiter_and_leaves_no_entry():
    cache = make_cache()
    started = threading.Event()
    release = threading.Event()

    def broken_load():
        started.set()
        release.wait(5)
        raise OSError("header too large in /models/a")

    errors = []

    def request():
        try:
            cache.get_or_load(recipe("a"), broken_load)
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=request) for _ in range(4)]
    for thread in threads:
        thread.start()
    assert started.wait(5)
    time.sleep(0.1)
    release.set()
    for thread in threads:
        thread.join(5)
    assert len(errors) == 4
    assert sum(isinstance(e, OSError) for e in errors) == 1
    waiters = [e for e in errors if isinstance(e, CacheLoadError)]
    assert len(waiters) == 3
    assert all("header too large" in str(e) for e in waiters)
    assert cache.entries() == []
    assert cache.loading() == []
    # and the next request tries again
    assert cache.get_or_load(recipe("a"), lambda: Payload(1)).hit is False


def test_lru_unpinned_entries_are_evicted_to_fit_the_budget():
    cache = make_cache(budget=250)
    cache.get_or_load(recipe("a", size=100), lambda: Payload(100))
    cache.get_or_load(recipe("b", size=100), lambda: Payload(100))
    cache.get_or_load(recipe("a", size=100), lambda: Payload(100))  # a is now the most recent
    cache.get_or_load(recipe("c", size=100), lambda: Payload(100))
    cache_keys = {e.cache_key for e in cache.entries()}
    assert "checkpoint:a" in cache_keys
    assert "checkpoint:c" in cache_keys
    assert "checkpoint:b" not in cache_keys
    assert cache.evictions == 1
    assert cache.used_bytes <= 250


def test_pinned_entries_are_never_evicted_by_the_budget():
    cache = make_cache(budget=150)
    cache.get_or_load(recipe("pinned", size=100), lambda: Payload(100), pinned=True)
    cache.get_or_load(recipe("b", size=100), lambda: Payload(100))
    cache.get_or_load(recipe("c", size=100), lambda: Payload(100))
    cache_keys = {e.cache_key for e in cache.entries()}
    assert cache_keys == {"checkpoint:pinned", "checkpoint:c"}


def test_budget_uses_measured_bytes_not_file_size():
    cache = make_cache(budget=300)
    cache.get_or_load(recipe("a", size=10), lambda: Payload(200))  # fp16 file loaded as fp32
    cache.get_or_load(recipe("b", size=10), lambda: Payload(200))
    assert [e.cache_key for e in cache.entries()] == ["checkpoint:b"]


def test_a_changed_file_replaces_its_stale_entry():
    cache = make_cache()
    cache.get_or_load(recipe("a", mtime=1), lambda: Payload(1), cache_key="mine")
    reloaded = cache.get_or_load(recipe("a", mtime=2), lambda: Payload(2), cache_key="mine")
    assert not reloaded.hit
    assert [e.value.nbytes for e in cache.entries()] == [2]
    assert cache.loads == 2


def test_evict_by_cache_key_key_or_file_name_and_clear_keeps_pinned():
    cache = make_cache()
    a = cache.get_or_load(recipe("a.safetensors"), lambda: Payload(1), cache_key="alpha").entry
    cache.get_or_load(recipe("b.safetensors"), lambda: Payload(1))
    cache.get_or_load(recipe("c.safetensors"), lambda: Payload(1))
    cache.get_or_load(recipe("p.safetensors"), lambda: Payload(1), pinned=True)
    assert cache.evict("alpha") == ["alpha"]
    assert cache.evict(a.key) == []
    assert cache.evict("b.safetensors") == ["checkpoint:b.safetensors"]
    assert cache.evict("nothing") == []
    assert cache.clear() == ["checkpoint:c.safetensors"]
    assert [e.cache_key for e in cache.entries()] == ["checkpoint:p.safetensors"]
    assert cache.clear(include_pinned=True) == ["checkpoint:p.safetensors"]
    assert cache.used_bytes == 0


@pytest.mark.parametrize("pinned_later", [True, False])
def test_a_pinned_request_pins_an_existing_entry(pinned_later):
    cache = make_cache()
    cache.get_or_load(recipe("a"), lambda: Payload(1))
    entry = cache.get_or_load(recipe("a"), lambda: Payload(1), pinned=pinned_later).entry
    assert entry.pinned is pinned_later


def test_a_users_unpin_sticks_when_a_config_entry_asks_for_it_again():
    cache = make_cache(budget=150)
    cache.get_or_load(recipe("a"), lambda: Payload(100), pinned=True)
    assert cache.set_pinned("checkpoint:a", False) == ["checkpoint:a"]
    cache.get_or_load(recipe("a"), lambda: Payload(100), pinned=True)  # e.g. its selector, or a preload
    assert cache.entries()[0].pinned is False
    cache.get_or_load(recipe("b"), lambda: Payload(100))
    assert [e.cache_key for e in cache.entries()] == ["checkpoint:b"], "unpinned: evicted under the budget"
    assert cache.set_pinned("nothing", True) == []
