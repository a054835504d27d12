"""What /memkit/ready reports through a preload run (PreloadState is plain Python)."""

from comfyui_memkit.model_cache.preload import NOT_LOADED, PreloadState


def test_a_run_with_a_warmup_goes_starting_preloading_warming_ready():
    state = PreloadState("background", expected=True)
    seen = [state.snapshot().state]
    assert state.begin(["a", "b"], "reading", run_id="r1", warmup=True)
    seen.append(state.snapshot().state)
    state.set_phase("loading", "r1")
    state.entry_done("a")
    state.entry_done("b")
    state.finish("r1")
    seen.append(state.snapshot().state)
    assert not state.snapshot().ready, "models loaded, but the warm-up has not run"
    state.warmup_finished()
    seen.append(state.snapshot().state)
    assert seen == ["starting", "preloading", "warming", "ready"]
    assert state.snapshot().ready


def test_failures_or_a_failed_warmup_make_it_degraded_but_ready():
    state = PreloadState("blocking", expected=True)
    state.begin(["a"], "loading", warmup=True)
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


def test_a_run_that_ends_early_fails_every_entry_it_did_not_report():
    """The node raised early (or was interrupted): never `ready` with done < total."""
    state = PreloadState("background", expected=True)
    state.begin(["a", "b", "c"], "queued", run_id="r1")
    state.entry_done("a")
    assert state.finish("r1", "interrupted (/interrupt) before it was loaded")
    snapshot = state.snapshot()
    assert (snapshot.done, snapshot.total) == (3, 3)
    assert snapshot.failures == {"b": "interrupted (/interrupt) before it was loaded",
                                 "c": "interrupted (/interrupt) before it was loaded"}
    assert snapshot.state == "degraded"


def test_finish_without_a_reason_still_accounts_for_every_entry():
    state = PreloadState("background", expected=True)
    state.begin(["a", "b"], "loading", run_id="r1")
    state.entry_done("a")
    state.finish("r1")
    assert state.snapshot().failures == {"b": NOT_LOADED}
    assert state.snapshot().state == "degraded"


def test_only_the_open_run_is_finished_and_only_once():
    state = PreloadState("background", expected=True)
    state.begin(["a"], "queued", run_id="r1")
    assert not state.finish("r2", "not mine"), "another run's id must not end this run"
    assert state.owns("r1")
    state.entry_done("a")
    assert state.finish("r1")  # the node's finally
    assert not state.finish("r1", "the prompt did not run"), "the queue thread comes second: nothing to end"
    assert state.snapshot().failures == {}
    assert state.snapshot().state == "ready"


def test_repeated_keys_count_once():
    state = PreloadState("background", expected=True)
    state.begin(["a", "a", "a"], "loading", run_id="r1")
    state.entry_done("a")
    state.finish("r1")
    snapshot = state.snapshot()
    assert (snapshot.done, snapshot.total, snapshot.state) == (1, 1, "ready")


def test_keys_travel_as_a_list_commas_and_all():
    state = PreloadState("background", expected=True)
    state.begin(["text_encoder:clip_l.safetensors[device=cpu,type=sd3]", "b"], "reading", run_id="r1")
    state.queue("r1", ["text_encoder:clip_l.safetensors[device=cpu,type=sd3]", "b"])
    assert state.queued("r1") == ["text_encoder:clip_l.safetensors[device=cpu,type=sd3]", "b"]
    assert state.queued("r2") is None
    state.finish("r1")
    assert state.queued("r1") is None, "an ended run hands out no keys (its late prompt loads nothing)"


def test_a_later_success_clears_a_failure_wherever_it_happened():
    state = PreloadState("background", expected=True)
    state.begin(["a"], "loading", run_id="r1")
    state.entry_done("a", "file missing")
    state.finish("r1")
    assert state.snapshot().state == "degraded"
    state.clear_failure("a")  # e.g. a selector or a user's MemKitPreload loaded it later
    assert state.snapshot().failures == {}
    assert state.snapshot().state == "ready"
    state.entry_done("x", "boom")  # a failure outside any run is kept too
    assert state.snapshot().failures == {"x": "boom"}
    state.entry_done("x")
    assert state.snapshot().failures == {}


def test_queued_placements_have_no_outcome_until_reported():
    """A blocking preload loaded `a`; its placement on the device waits for the queued prompt."""
    state = PreloadState("blocking", expected=True)
    state.begin(["a", "b"], "loading", run_id="r1")
    state.entry_done("a")
    state.entry_done("b", "file missing")
    state.queue("r1", ["a"])
    assert state.snapshot().done == 1
    state.finish("r1", "the preload prompt did not run: refused")
    assert state.snapshot().failures == {"a": "the preload prompt did not run: refused", "b": "file missing"}


def test_a_start_up_that_never_began_a_run_is_not_ready_but_degraded():
    state = PreloadState("background", expected=True)
    assert state.snapshot().state == "starting"
    assert state.finish(reason="the start-up preload could not start (OSError: boom)")
    snapshot = state.snapshot()
    assert (snapshot.state, snapshot.error) == ("degraded", "the start-up preload could not start (OSError: boom)")


def test_every_transition_is_reported():
    calls = []
    state = PreloadState("background", expected=True, on_change=lambda: calls.append(state.snapshot().phase))
    state.begin(["a"], "reading", run_id="r1")
    state.set_phase("queued", "r1")
    state.set_phase("loading", "r1")
    state.entry_done("a")
    state.finish("r1")
    assert calls == ["reading", "queued", "loading", "loading", "done"]


def test_a_phase_change_after_the_run_ended_is_ignored():
    state = PreloadState("background", expected=True)
    state.begin(["a"], "queued", run_id="r1")
    state.finish("r1", "deadline")
    state.set_phase("loading", "r1")  # a late prompt
    assert state.snapshot().phase == "done"


def test_a_new_run_of_a_failed_key_starts_it_afresh():
    """The page toasts a failure when it appears: a retry that fails again must show as new."""
    state = PreloadState("background", expected=True)
    state.begin(["a", "b"], "loading", run_id="r1")
    state.entry_done("a", "file missing")
    state.entry_done("b", "boom")
    state.finish("r1")
    state.begin(["a"], "loading", run_id="r2")
    assert state.snapshot().failures == {"b": "boom"}, "only the keys of the new run start afresh"
    state.entry_done("a", "file missing")
    state.finish("r2")
    assert state.snapshot().failures == {"a": "file missing", "b": "boom"}
