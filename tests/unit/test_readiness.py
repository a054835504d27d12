"""What /memkit/ready reports through a preload run (PreloadState is plain Python)."""

from comfyui_memkit.model_cache.preload import PreloadState


def test_a_run_with_a_warmup_goes_starting_preloading_warming_ready():
    state = PreloadState("background", expected=True)
    seen = [state.snapshot().state]
    assert state.begin(2, "reading", run_id="r1", warmup=True)
    seen.append(state.snapshot().state)
    state.set_phase("loading")
    state.entry_done("a")
    state.entry_done("b")
    state.finish()
    seen.append(state.snapshot().state)
    assert not state.snapshot().ready, "models loaded, but the warm-up has not run"
    state.warmup_finished()
    seen.append(state.snapshot().state)
    assert seen == ["starting", "preloading", "warming", "ready"]
    assert state.snapshot().ready


def test_failures_or_a_failed_warmup_make_it_degraded_but_ready():
    state = PreloadState("blocking", expected=True)
    state.begin(1, "loading", warmup=True)
    state.entry_done("a", "file missing")
    state.finish()
    state.warmup_finished("KSampler: out of memory")
    snapshot = state.snapshot()
    assert (snapshot.state, snapshot.ready) == ("degraded", True)
    assert snapshot.failures == {"a": "file missing"}
    assert snapshot.warmup_error == "KSampler: out of memory"


def test_nothing_configured_is_ready_at_once():
    state = PreloadState("off")
    assert (state.snapshot().state, state.snapshot().ready) == ("ready", True)


def test_only_the_run_in_progress_owns_its_id_until_its_models_are_reported():
    state = PreloadState("background", expected=True)
    state.begin(1, "queued", run_id="r1", warmup=True)
    assert state.owns("r1")
    assert not state.owns("")
    assert not state.owns("r2")
    state.finish()
    assert state.snapshot().state == "warming"
    assert not state.owns("r1"), "the models are reported; the warm-up is not the preload prompt's business"
