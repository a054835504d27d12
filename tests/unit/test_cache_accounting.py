"""The cache's accounting and concurrency rules (issue: cache that holds under real conditions).

Threads are ordered with events, never sleeps: each test forces the interleaving it checks.
"""

from __future__ import annotations

import gc
import sys
import threading
import weakref

import pytest

from comfyui_memkit.model_cache.cache import CacheLoadError, Footprint, LoadWaitInterruptedError, ModelCache
from comfyui_memkit.model_cache.cache_keys import CacheKeyRegistry
from comfyui_memkit.model_cache.loads import Load
from comfyui_memkit.model_cache.preload import PreloadState
from comfyui_memkit.model_cache.recipe import FileIdentity, LoadRecipe, ModelKind, NodeCall


def recipe(name: str, size: int = 100, mtime: int = 1) -> LoadRecipe:
    return LoadRecipe(ModelKind.CHECKPOINT, NodeCall.of("CheckpointLoaderSimple", {"ckpt_name": name}),
                      (f"/models/{name}",), (FileIdentity(size, mtime),))


class Value:
    def __init__(self, ram: int, vram: int = 0) -> None:
        self.footprint = Footprint(ram, vram)


def make_cache(budget: int | None = None) -> ModelCache:
    return ModelCache(measure=lambda value: value.footprint, budget_bytes=budget, wait_poll_seconds=0.01)


def start(target) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def blocking_load(value, started: threading.Event, release: threading.Event):
    def load():
        started.set()
        assert release.wait(10)
        return value
    return load


def test_a_load_in_flight_counts_against_the_budget():
    cache = make_cache(budget=250)
    cache.get_or_load(recipe("x"), lambda: Value(100), cache_key="x")
    started, release = threading.Event(), threading.Event()
    owner = start(lambda: cache.get_or_load(recipe("a"), blocking_load(Value(100), started, release), cache_key="a"))
    assert started.wait(10)
    assert cache.reserved_bytes() == 100
    cache.get_or_load(recipe("b"), lambda: Value(100), cache_key="b")  # x + a (in flight) + b = 300 > 250
    assert [e.cache_key for e in cache.entries()] == ["b"], "x had to go while a was still loading"
    release.set()
    owner.join(10)
    assert cache.reserved_bytes() == 0
    assert cache.used_bytes <= 250


def test_vram_is_reported_apart_and_not_counted_as_ram():
    cache = make_cache(budget=150)
    cache.get_or_load(recipe("gpu"), lambda: Value(10, vram=1000), cache_key="gpu")
    cache.get_or_load(recipe("cpu"), lambda: Value(100), cache_key="cpu")
    assert {e.cache_key for e in cache.entries()} == {"gpu", "cpu"}, "VRAM must not push RAM entries out"
    assert cache.used_bytes == 110
    assert cache.snapshot().footprint == Footprint(110, 1000)


def test_footprints_are_measured_again_before_evicting():
    cache = make_cache(budget=150)
    moved = Value(100)
    cache.get_or_load(recipe("moved"), lambda: moved, cache_key="moved")
    moved.footprint = Footprint(0, 100)  # ComfyUI moved its weights to the GPU after we loaded it
    cache.get_or_load(recipe("b"), lambda: Value(100), cache_key="b")
    assert {e.cache_key for e in cache.entries()} == {"moved", "b"}


def test_an_evicted_value_still_alive_is_adopted_again_not_loaded_twice():
    cache = make_cache()
    held = cache.get_or_load(recipe("a"), lambda: Value(100), cache_key="a").value  # a prompt holds it
    cache.evict("a")
    (retired,) = cache.retired()
    assert retired.cache_key == "a"
    loads = []
    again = cache.get_or_load(recipe("a"), lambda: loads.append(1) or Value(100), cache_key="a")
    assert again.value is held
    assert loads == []
    assert cache.readoptions == 1
    assert cache.retired() == []


def test_an_evicted_value_nobody_holds_is_forgotten_and_loaded_again():
    cache = make_cache()
    cache.get_or_load(recipe("a"), lambda: Value(100), cache_key="a")
    cache.evict("a")
    gc.collect()
    assert cache.retired() == []
    loads = []
    cache.get_or_load(recipe("a"), lambda: loads.append(1) or Value(100), cache_key="a")
    assert loads == [1]


def test_an_old_version_that_finishes_loading_last_does_not_replace_the_new_one():
    cache = make_cache()
    started, release = threading.Event(), threading.Event()
    old = {}
    owner = start(lambda: old.setdefault("outcome", cache.get_or_load(
        recipe("m", mtime=1), blocking_load(Value(1), started, release), cache_key="m")))
    assert started.wait(10)
    new = cache.get_or_load(recipe("m", mtime=2), lambda: Value(2), cache_key="m")  # the file changed meanwhile
    release.set()
    owner.join(10)
    assert [e.key for e in cache.entries()] == [new.entry.key], "the newer file's model stays cached"
    assert old["outcome"].value.footprint.ram == 1, "the older request still gets what it asked for"


def test_a_newer_version_replaces_an_older_cached_one():
    cache = make_cache()
    cache.get_or_load(recipe("m", mtime=1), lambda: Value(1), cache_key="m")
    new = cache.get_or_load(recipe("m", mtime=2), lambda: Value(2), cache_key="m")
    assert [e.key for e in cache.entries()] == [new.entry.key]


def test_waiting_for_another_threads_load_can_be_interrupted_and_the_load_goes_on():
    cache = make_cache()
    started, release, interrupt = threading.Event(), threading.Event(), threading.Event()
    result = {}
    owner = start(lambda: result.setdefault("owner", cache.get_or_load(
        recipe("big"), blocking_load(Value(5), started, release), cache_key="big")))
    assert started.wait(10)
    waiter_error = {}

    def wait():
        try:
            cache.get_or_load(recipe("big"), lambda: Value(5), cache_key="big", interrupted=interrupt.is_set)
        except LoadWaitInterruptedError as error:
            waiter_error["error"] = error

    waiter = start(wait)
    interrupt.set()
    waiter.join(10)
    assert "stopped waiting for big, which another thread is loading" in str(waiter_error["error"])
    release.set()
    owner.join(10)
    assert result["owner"].hit is False
    assert [e.cache_key for e in cache.entries()] == ["big"]
    assert cache.get_or_load(recipe("big"), lambda: Value(5), cache_key="big").hit


def test_a_prompt_that_uses_an_entry_keeps_it_from_lru_eviction():
    cache = make_cache(budget=250)
    cache.get_or_load(recipe("every-prompt"), lambda: Value(100), cache_key="every-prompt", use_token="p0")
    cache.get_or_load(recipe("once"), lambda: Value(100), cache_key="once", use_token="p1")
    # ComfyUI's output cache answers the loader: only the fingerprint is evaluated, per prompt
    assert cache.touch(recipe("every-prompt").key, use_token="p2")
    cache.get_or_load(recipe("new"), lambda: Value(100), cache_key="new", use_token="p2")
    assert {e.cache_key for e in cache.entries()} == {"every-prompt", "new"}


def test_uses_count_once_per_prompt_and_hits_count_handouts():
    cache = make_cache()
    cache.get_or_load(recipe("a"), lambda: Value(1), cache_key="a", use_token="p1")
    key = recipe("a").key
    cache.touch(key, "p2")                                        # fingerprint, prompt 2
    cache.get_or_load(recipe("a"), lambda: Value(1), cache_key="a", use_token="p2")  # execute, prompt 2
    cache.touch(key, "p3")                                        # output cache answered prompt 3
    (entry,) = cache.entries()
    assert (entry.uses, entry.hits) == (3, 1)


def test_evict_unpinned_goes_least_recently_used_first_and_stops_when_enough():
    cache = make_cache()
    for name in ("old", "pinned", "mid", "new"):
        cache.get_or_load(recipe(name), lambda: Value(1), cache_key=name, pinned=name == "pinned")
    answers = iter([False, True])  # after "old": not enough yet; after "mid": enough
    assert cache.evict_unpinned(lambda: next(answers)) == ["old", "mid"]
    assert {e.cache_key for e in cache.entries()} == {"pinned", "new"}


@pytest.fixture
def frequent_thread_switches():
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def test_the_cache_key_registry_can_be_read_while_a_thread_writes_it(frequent_thread_switches):
    registry = CacheKeyRegistry([])
    errors, done = [], threading.Event()

    def write():
        for index in range(20000):
            registry.remember(f"vae:{index}", Load.loader(ModelKind.VAE, [f"{index}.safetensors"]))
        done.set()

    writer = start(write)
    while not done.is_set():
        try:
            registry.known(ModelKind.VAE)
        except RuntimeError as error:  # dictionary changed size during iteration
            errors.append(error)
            break
    writer.join(30)
    assert errors == []
    assert len(registry.known(ModelKind.VAE)) == 20000


def test_preload_progress_can_be_read_while_the_preload_writes_it(frequent_thread_switches):
    state = PreloadState("background")
    assert state.begin([f"m{index}" for index in range(2000)], "loading")
    errors, done = [], threading.Event()

    def write():
        for index in range(2000):
            state.entry_done(f"m{index}", "boom" if index % 2 else None)
        state.finish()
        done.set()

    writer = start(write)
    while not done.is_set():
        try:
            snapshot = state.snapshot()
            assert len(snapshot.failures) <= snapshot.done
        except RuntimeError as error:
            errors.append(error)
            break
    writer.join(30)
    assert errors == []
    final = state.snapshot()
    assert (final.done, len(final.failures), final.ready) == (2000, 1000, True)


def test_an_eviction_off_the_executing_thread_holds_the_value_until_released():
    """Dropping the last reference runs ComfyUI's finalizers: only the executing thread may do it."""
    cache = make_cache()
    cache.get_or_load(recipe("a"), lambda: Value(100), cache_key="a")
    assert cache.evict("a", defer=True) == ["a"]
    assert cache.entries() == []
    (held,) = cache.releasing()
    probe = weakref.ref(held.value)
    del held
    gc.collect()
    assert probe() is not None, "still held: nothing was finalized on the evicting thread"
    assert cache.release_deferred() == ["a"]
    gc.collect()
    assert probe() is None, "released on the thread that called release_deferred"
    assert cache.releasing() == []


def test_a_request_for_an_entry_waiting_for_release_takes_it_back_without_loading():
    cache = make_cache()
    first = cache.get_or_load(recipe("a"), lambda: Value(100), cache_key="a").value
    cache.clear(defer=True)
    loads = []
    again = cache.get_or_load(recipe("a"), lambda: loads.append(1) or Value(100), cache_key="a")
    assert (again.value is first, again.hit, loads) == (True, True, [])
    assert cache.release_deferred() == []


def test_waiters_wake_up_when_making_room_after_the_load_fails():
    measured = []

    def measure(value):  # re-measuring the other entry after the load (before storing it) fails
        measured.append(value)
        if measured.count("flaky") > 2:
            raise RuntimeError("cannot measure again")
        return Footprint(10)

    cache = ModelCache(measure=measure, budget_bytes=1000, wait_poll_seconds=0.01)
    cache.get_or_load(recipe("b"), lambda: "flaky", cache_key="b")
    started, release = threading.Event(), threading.Event()
    owner_error, waiter_error = {}, {}

    def own():
        try:
            cache.get_or_load(recipe("a"), blocking_load("flaky", started, release), cache_key="a")
        except RuntimeError as error:
            owner_error["e"] = error

    def wait():
        try:
            cache.get_or_load(recipe("a"), lambda: "never", cache_key="a")
        except CacheLoadError as error:
            waiter_error["e"] = error

    owner = start(own)
    assert started.wait(10)
    waiter = start(wait)
    while cache.loading() != [("a", 1)]:  # the waiter is inside the wait
        assert waiter.is_alive()
    release.set()
    owner.join(10)
    waiter.join(10)
    assert not waiter.is_alive(), "the waiter must not wait for ever"
    assert "cannot measure again" in str(owner_error["e"])
    assert "cannot measure again" in str(waiter_error["e"])
    assert cache.loading() == []


def test_pressure_release_keeps_what_the_running_prompt_uses():
    cache = make_cache()
    cache.get_or_load(recipe("old"), lambda: Value(1), cache_key="old", use_token="p1")
    cache.get_or_load(recipe("current"), lambda: Value(1), cache_key="current", use_token="p1")
    cache.touch(recipe("current").key, use_token="p2")
    released = cache.evict_unpinned(lambda: False, keep=lambda e: e.last_use_token == "p2")
    assert released == ["old"]
    assert [e.cache_key for e in cache.entries()] == ["current"]
