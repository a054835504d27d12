"""The step cache's pure parts: skip decisions (step_cache/rule.py), diff storage and its accounting
(step_cache/store.py), the run registry (step_cache/report.py) and its section of /memkit/status
(model_cache/status.py). No ComfyUI here."""

from __future__ import annotations

import gc
import math
import sys
import weakref

import pytest
import torch

from comfyui_memkit.step_cache import report
from comfyui_memkit.step_cache.rule import (
    ChangeRateRule,
    IntervalRule,
    Phase,
    SigmaWindow,
    StepGroup,
    make_rule,
    predicted_skips,
)
from comfyui_memkit.step_cache.settings import StepCacheSettings
from comfyui_memkit.step_cache.store import FP8, DiffStore

HUGE = 1e9


def run_rule(rule, input_changes, output_changes=None, output_norms=None):
    """Drive a rule as the hooks do over a window of steps; returns the indices of skipped steps.
    ``input_changes[i]`` is the change of step i's input against the last computed step's."""
    skipped = []
    for step, change in enumerate(input_changes):
        change = None if step == 0 else change
        if rule.should_skip(change, can_skip=step > 0):
            skipped.append(step)
            continue
        output_change = None if step == 0 else (output_changes[step] if output_changes else 1.0)
        rule.computed(change, output_change, output_norms[step] if output_norms else 1.0)
    return skipped


# --- decisions --------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [3, 4, 9, 20])
def test_huge_threshold_with_one_consecutive_skip_alternates_after_two_computed_steps(steps):
    skipped = run_rule(ChangeRateRule(HUGE, max_consecutive_skips=1), [0.3] * steps)
    # two computed steps teach the rule its rate; then skip, compute, skip, ...
    assert skipped == list(range(2, steps, 2))
    assert len(skipped) == predicted_skips(steps, "easycache", 3, 1) == (steps - 1) // 2


def test_huge_threshold_without_a_limit_skips_everything_after_two_steps_and_limits_cut_runs():
    assert run_rule(ChangeRateRule(HUGE), [0.3] * 10) == list(range(2, 10))
    assert predicted_skips(10, "easycache", 3, 0) == 8
    assert run_rule(ChangeRateRule(HUGE, max_consecutive_skips=2), [0.3] * 10) == [2, 3, 5, 6, 8, 9]
    assert predicted_skips(10, "easycache", 3, 2) == 6


def test_accumulated_relative_change_is_easycaches_arithmetic():
    # step 1 teaches k = output change / input change = 0.2 / 1 = 0.2 with |previous output| = 1;
    # then each step adds k * input change / |output|: 0.2 (skip), 0.2 + 0.4 = 0.6 >= 0.5 (compute,
    # back to 0, k = 0.1 / 2 = 0.05, |output| = 0.5), 0.05 * 4 / 0.5 = 0.4 (skip), 0.4 + 0.2 (compute).
    rule = ChangeRateRule(0.5)
    assert not rule.should_skip(None, can_skip=False)
    rule.computed(None, None, 1.0)
    assert not rule.should_skip(1.0, can_skip=True)
    rule.computed(1.0, 0.2, 1.0)
    assert rule.rate == pytest.approx(0.2)
    assert rule.should_skip(1.0, can_skip=True)
    assert rule.cumulative == pytest.approx(0.2)
    assert not rule.should_skip(2.0, can_skip=True)
    assert rule.cumulative == 0.0
    rule.computed(2.0, 0.1, 0.5)
    assert rule.should_skip(4.0, can_skip=True)
    assert rule.cumulative == pytest.approx(0.4)
    assert not rule.should_skip(2.0, can_skip=True)


def test_tensor_scalars_decide_in_their_own_dtype():
    """Given float32 tensors (as the hooks pass them) the comparison with the threshold is made in
    float32, as core's is: a threshold a hair above float32(0.1) rounds to it and does not skip."""
    threshold = 0.1000000015  # above float32(0.1) = 0.10000000149..., within half a float32 ulp of it

    def decide(scalar):
        rule = ChangeRateRule(threshold)
        rule.computed(None, None, scalar(1.0))
        rule.computed(scalar(1.0), scalar(0.1), scalar(1.0))
        return rule.should_skip(scalar(1.0), can_skip=True)

    assert decide(lambda v: torch.tensor(v, dtype=torch.float32)) is False
    assert decide(lambda v: torch.tensor(v, dtype=torch.float32).item()) is True  # float64 would skip


def test_no_skip_without_a_cached_diff_and_the_accumulation_restarts():
    rule = ChangeRateRule(HUGE)
    rule.computed(None, None, 1.0)
    rule.computed(1.0, 1.0, 1.0)
    assert not rule.should_skip(1.0, can_skip=False)
    assert rule.cumulative == 0.0
    assert rule.should_skip(1.0, can_skip=True)


@pytest.mark.parametrize(("interval", "limit", "expected"), [
    (3, 0, [1, 2, 4, 5, 7, 8]),
    (3, 1, [1, 3, 5, 7, 9]),
    (2, 0, [1, 3, 5, 7, 9]),
    (1, 0, []),
])
def test_interval_rule_reuses_each_computed_step_interval_minus_one_times(interval, limit, expected):
    assert run_rule(IntervalRule(interval, limit), [0.0] * 10) == expected
    assert predicted_skips(10, "interval", interval, limit) == len(expected)


def test_unknown_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="'teacache' is not one of easycache, interval"):
        make_rule("teacache", 0.2, 3, 0)


def test_window_phases_follow_core_comparisons():
    window = SigmaWindow(start_sigma=0.8, end_sigma=0.1)
    assert [window.phase(s) for s in (1.0, 0.8, 0.5, 0.1, 0.0)] == [
        Phase.BEFORE, Phase.ACTIVE, Phase.ACTIVE, Phase.AFTER, Phase.AFTER]
    assert window.phase(torch.tensor([0.5])[0]) is Phase.ACTIVE


def test_the_first_cond_seen_leads_and_the_skip_flag_lasts_one_step():
    group = StepGroup()
    assert group.claim(["c", "u"])
    assert group.leader == "c"
    assert not group.claim(["u"])
    group.step_skipped = True
    group.new_step()
    assert not group.step_skipped


def test_settings_name_the_bad_input_and_zero_threshold_is_off():
    assert StepCacheSettings().problem() is None
    assert "start_percent (0.9) is after end_percent (0.5)" in StepCacheSettings(start_percent=0.9,
                                                                                 end_percent=0.5).problem()
    assert "store_dtype 'int4'" in StepCacheSettings(store_dtype="int4").problem()
    assert not StepCacheSettings(threshold=0.0).enabled
    assert not StepCacheSettings(mode="interval", cache_interval=1).enabled
    assert StepCacheSettings(mode="interval", cache_interval=2).enabled


# --- storage ----------------------------------------------------------------------------------

def wide_diff(seed=0, shape=(2, 4, 3, 16, 16)):
    """A diff whose channels span very different magnitudes (where a per-tensor scale would fail)."""
    generator = torch.Generator().manual_seed(seed)
    magnitudes = torch.tensor([1e-3, 0.1, 1.0, 40.0]).view(1, 4, 1, 1, 1)
    return torch.randn(shape, generator=generator) * magnitudes


def stored_bytes(store):
    """Bytes of the distinct storages the store keeps alive (what it really holds)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in store.tensors()}
    return sum(storages.values())


@pytest.mark.parametrize(("store_dtype", "relative", "absolute_floor"), [
    ("bf16", 2.0**-8, 0.0),    # 8 bits of significand: half an ulp is 2^-8 of the value
    ("fp16", 2.0**-11, 2.0**-25),  # below 2^-14 fp16 is subnormal: steps of 2^-24
])
def test_half_precision_error_is_within_half_an_ulp(store_dtype, relative, absolute_floor):
    diff = wide_diff()
    store = DiffStore("cpu", "cpu", "compute", store_dtype)
    assert store.put("c", diff)
    back = store.get("c", "cpu")
    assert back.dtype == torch.float32
    error = (back - diff).abs()
    assert error.max() > 0  # it was really rounded
    assert (error <= torch.maximum(diff.abs() * relative, torch.tensor(absolute_floor))).all()
    assert store.held["compute"] == diff.numel() * 2


def test_fp8_error_is_within_its_bound_with_a_scale_per_channel():
    diff = wide_diff()
    store = DiffStore("cpu", "cpu", "compute", "fp8")
    assert store.put("c", diff)
    back = store.get("c", "cpu")
    (data, scale), = [(e.data, e.scale) for e in store._entries.values()]
    assert data.dtype == FP8
    assert scale.shape == (2, 4, 1, 1, 1)
    # e4m3: 3 significand bits (half an ulp = 2^-4 of the value) down to 2^-6 of the channel's
    # largest magnitude (mapped to 448), subnormal steps of 2^-9 below that
    channel_max = diff.abs().amax(dim=(2, 3, 4), keepdim=True)
    bound = torch.maximum(diff.abs() * 2.0**-4, channel_max / 448 * 2.0**-10) * (1 + 1e-6)
    error = (back - diff).abs()
    assert (error <= bound).all()
    assert (error / channel_max).amax() > 1e-4  # quantised, not stored exactly
    assert store.held["compute"] == diff.numel() + scale.numel() * 4


def test_same_dtype_is_exact_and_keeps_an_owned_tensor_without_copying():
    diff = wide_diff()
    store = DiffStore("cpu", "cpu", "compute", "same")
    store.put("c", diff)
    assert store.get("c", "cpu") is diff or torch.equal(store.get("c", "cpu"), diff)
    assert store.tensors()[0].data_ptr() == diff.data_ptr()
    # a slice of a larger tensor is copied: otherwise it would keep the whole batch alive unaccounted
    store.put("u", diff[1:])
    assert store.tensors()[1].data_ptr() != diff[1:].data_ptr()
    assert torch.equal(store.get("u", "cpu"), diff[1:])
    assert store.held["compute"] == stored_bytes(store) == diff.numel() * 4 * 3 // 2


@pytest.mark.parametrize("store_dtype", ["same", "bf16", "fp16", "fp8"])
def test_bytes_reported_are_the_bytes_held_and_zero_after_clear(store_dtype):
    store = DiffStore("cpu", "cpu", "compute", store_dtype)
    for step in range(3):  # replacing a key does not add up
        diff = wide_diff(step)
        store.put("cond", diff[:1])
        store.put("uncond", diff[1:])
        assert sum(store.held.values()) == stored_bytes(store) > 0
    peak = store.peak["compute"]
    refs = [weakref.ref(t) for t in store.tensors()]
    store.clear()
    gc.collect()
    assert store.held == {"compute": 0, "offload": 0}
    assert store.tensors() == []
    assert all(ref() is None for ref in refs)
    assert store.usage()["compute"]["peak_bytes"] == peak > 0


def test_over_budget_spills_to_offload_then_computes_and_never_raises():
    diff = wide_diff(shape=(1, 4, 1, 8, 8))
    one = diff.numel() * 4
    store = DiffStore("cpu", "cpu", "compute", "same", budget_bytes=one)
    assert store.put("a", diff)
    assert store.put("b", diff.clone())  # compute is full: the offload device takes it
    assert store.put("c", diff.clone()) is False  # both full: not kept, that step is computed
    assert (store.has("a"), store.has("b"), store.has("c")) == (True, True, False)
    assert not store.has_all(["a", "c"])
    assert (store.spilled, store.dropped) == (1, 1)
    assert store.held == {"compute": one, "offload": one}
    assert store.put("a", diff * 2)  # a replacement frees its old bytes first, so it fits
    assert torch.equal(store.get("a", "cpu"), diff * 2)
    assert store.held == {"compute": one, "offload": one}
    assert stored_bytes(store) == 2 * one
    offload_only = DiffStore("cpu", "cpu", "offload", "same", budget_bytes=one - 1)
    assert offload_only.put("a", diff) is False
    assert offload_only.held == {"compute": 0, "offload": 0}


def test_offload_buffers_are_reused_step_after_step():
    diff = wide_diff(shape=(1, 4, 1, 8, 8))
    store = DiffStore("cpu", "meta", "offload", "bf16")  # the meta device stands in for a second device
    store.put("c", diff)
    first = store.tensors()[0]
    assert (first.device.type, first.dtype) == ("meta", torch.bfloat16)
    store.put("c", diff * 3)
    assert store.tensors()[0] is first
    assert store.held == {"compute": 0, "offload": diff.numel() * 2}


def test_auto_keeps_small_caches_on_the_compute_device_and_big_ones_offloaded():
    diff = wide_diff(shape=(1, 4, 1, 8, 8))
    roomy = DiffStore("cpu", "meta", "auto", "same", free_memory=lambda device: 10**9)
    roomy.put("c", diff)
    assert roomy.held == {"compute": diff.numel() * 4, "offload": 0}
    tight = DiffStore("cpu", "meta", "auto", "same", free_memory=lambda device: diff.numel() * 4)
    tight.put("c", diff)
    assert tight.held == {"compute": 0, "offload": diff.numel() * 4}

    def unknown(device):
        raise RuntimeError("no memory info")

    blind = DiffStore("cpu", "meta", "auto", "same", free_memory=unknown)
    assert blind.put("c", diff)
    assert blind.held["offload"] > 0


def test_bad_store_options_are_named():
    with pytest.raises(ValueError, match="cache_device 'gpu'"):
        DiffStore("cpu", "cpu", "gpu")
    with pytest.raises(ValueError, match="store_dtype 'fp4'"):
        DiffStore("cpu", "cpu", "auto", "fp4")


# --- the registry of runs ---------------------------------------------------------------------

class FakeRun:  # a stand-in for hooks.StepCacheRun: anything with report()
    def __init__(self, number):
        self.number = number

    def report(self):
        return {"run": self.number, "state": "running"}


def test_last_runs_lists_finished_runs_bounded_and_live_ones_weakly():
    report.clear()
    for number in range(report.KEEP + 3):
        report.finished(FakeRun(number), {"run": number, "state": "done"})
    live = FakeRun(999)
    report.started(live)
    runs = report.last_runs()
    assert len(runs) == report.KEEP + 1
    assert runs[0]["run"] == 3
    assert runs[-1] == {"run": 999, "state": "running"}
    del live
    gc.collect()
    assert all(r["state"] == "done" for r in report.last_runs())
    report.clear()
    assert report.last_runs() == []
    assert math.isfinite(report.next_run_number())


class HoldingRun(FakeRun):  # a run in progress that holds diffs on two devices
    def report(self):
        return {"run": self.number, "state": "running",
                "devices": {"compute": {"device": "cuda:0", "bytes": 3000, "peak_bytes": 5000},
                            "offload": {"device": "cpu", "bytes": 700, "peak_bytes": 700}}}


def test_listeners_are_told_when_a_run_starts_and_ends_and_a_failing_one_breaks_nothing():
    calls = []

    def failing():
        raise RuntimeError("listener down")

    def listener():
        calls.append("told")

    report.add_listener(listener)
    report.add_listener(failing)
    report.add_listener(listener)  # once per listener
    try:
        run = FakeRun(1)
        report.started(run)
        assert calls == ["told"]
        report.finished(run, {"run": 1, "state": "done"})
        assert calls == ["told", "told"]
    finally:
        report.remove_listener(listener)
        report.remove_listener(failing)
        report.clear()
    report.started(FakeRun(2))
    assert calls == ["told", "told"], "removed"


def test_status_section_lists_the_last_runs_bounded_and_the_bytes_runs_in_progress_hold():
    from comfyui_memkit.model_cache.status import STEP_CACHE_RUNS, step_cache_status

    report.clear()
    assert step_cache_status() == {"runs": [], "running": 0, "held_bytes": {}, "held_total_bytes": 0}
    for number in range(STEP_CACHE_RUNS + 4):
        report.finished(FakeRun(number), {"run": number, "state": "done",
                                          "devices": {"compute": {"device": "cpu", "bytes": 0, "peak_bytes": 9}}})
    live = [HoldingRun(100), HoldingRun(101)]
    for run in live:
        report.started(run)
    section = step_cache_status()
    assert [r["run"] for r in section["runs"]] == [*range(6, STEP_CACHE_RUNS + 4), 100, 101]
    assert len(section["runs"]) == STEP_CACHE_RUNS
    assert section["running"] == 2
    assert section["held_bytes"] == {"cuda:0": 6000, "cpu": 1400}
    assert section["held_total_bytes"] == 7400
    del live, run
    gc.collect()
    report.clear()


def test_status_section_reports_a_step_cache_that_cannot_report_instead_of_failing(monkeypatch):
    from comfyui_memkit import step_cache
    from comfyui_memkit.model_cache.status import step_cache_status

    def broken():
        raise RuntimeError("registry broken")

    monkeypatch.setattr(report, "last_runs", broken)
    assert step_cache_status() == {"runs": [], "running": 0, "held_bytes": {}, "held_total_bytes": 0,
                                   "error": "RuntimeError: registry broken"}
    monkeypatch.undo()
    monkeypatch.delattr(step_cache, "report")  # the step cache cannot be imported at all
    monkeypatch.setitem(sys.modules, "comfyui_memkit.step_cache.report", None)
    assert "import of comfyui_memkit.step_cache.report halted" in step_cache_status()["error"]
