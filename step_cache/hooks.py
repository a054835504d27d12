"""The step cache inside one sampling run, plugged in through ComfyUI's wrapper API only.

``patch(model, settings)`` clones the ModelPatcher and adds one OUTER_SAMPLE wrapper. Each run
(each ``CFGGuider.sample``) that wrapper builds a ``StepCacheRun`` and adds wrappers bound to it to
a copy of the guider's model options: CALC_COND_BATCH (a new step starts), DIFFUSION_MODEL (where
the model family calls it: the same place as core's EasyCache) and APPLY_MODEL (for families whose
diffusion model never calls DIFFUSION_MODEL wrappers, such as SD3). Whichever the first model call
reaches decides the level for the run. When the run ends, by success, error or interrupt, the
options are put back and every cached tensor is released: nothing is left on the ModelPatcher, the
model or its ``diffusion_model``.

At the APPLY_MODEL level the model output is recovered from apply_model's denoised result, and a
skipped step is rebuilt through the model's own ``calculate_input`` / ``calculate_denoised``. That is
exact for eps and flow (CONST) models, where denoised = input - output · sigma; other kinds are
refused with a ValueError naming the model.

Unlike core's EasyCache, a skipped step's output is a new tensor: core adds the cached diff in place
into the diffusion model's input, which on flow models run in float32 without concat channels is
the very tensor apply_model then uses as ``model_input`` (its skipped steps come out shifted by the
diff). Where that tensor is a copy (bf16/fp16 weights, the usual GPU case) both give the same bits.
"""

from __future__ import annotations

import enum
import functools
import logging
import time
from collections.abc import Callable, Hashable
from typing import Any

import torch

from . import report
from .rule import Phase, SigmaWindow, StepGroup, make_rule
from .settings import StepCacheSettings
from .store import DiffStore

log = logging.getLogger("memkit")

KEY = "memkit_step_cache"
SUBSAMPLE = 8  # as core's EasyCache: the change measurements look at every 8th row and column
COND_NAMES = {0: "cond", 1: "uncond"}


class Level(enum.Enum):
    DIFFUSION_MODEL = "diffusion_model"
    APPLY_MODEL = "apply_model"


def _transformer_options(args: tuple, kwargs: dict) -> dict:
    options = kwargs.get("transformer_options")
    if isinstance(options, dict):
        return options
    for value in reversed(args):
        if isinstance(value, dict) and "uuids" in value:
            return value
    return {}


def _sampling_kinds(model_sampling: Any) -> str:
    import comfy.model_sampling

    names = [c.__name__ for c in type(model_sampling).__mro__ if c.__module__ == comfy.model_sampling.__name__]
    return "/".join(names) or type(model_sampling).__name__


def check_rebuildable(base_model: Any) -> Any:
    """The model's model_sampling when a skipped step can be rebuilt from apply_model's output
    (eps and flow models); else a ValueError naming the model and its kind."""
    import comfy.model_sampling as sampling

    model_sampling = base_model.model_sampling
    denoise = type(model_sampling).calculate_denoised
    if denoise is sampling.EPS.calculate_denoised or denoise is sampling.CONST.calculate_denoised:
        return model_sampling
    raise ValueError(
        f"MemKitStepCache: {type(base_model).__name__} does not call DIFFUSION_MODEL wrappers, so the step cache "
        f"works on apply_model's output, which it can rebuild exactly only for eps and flow (CONST) models; this "
        f"model's sampling is {_sampling_kinds(model_sampling)}. Remove MemKitStepCache from this model.")


def _slices(batch: int, count: int) -> list[slice]:
    per = batch // count
    return [slice(i * per, (i + 1) * per) for i in range(count)]


def _trailing(shape: torch.Size, like: torch.Size) -> tuple[slice, ...]:
    """Index of the last ``shape[d]`` entries of every non-batch dim of a tensor shaped ``like``
    (core's rule when a model's output and input differ in size, e.g. Cosmos)."""
    return (slice(None), *(slice(x - s, None) if s != x else slice(None) for s, x in zip(shape[1:], like[1:])))


class ChangeProbe:
    """The leader's subsampled input and output of the last computed step, to measure how much
    they change (mean absolute difference over every 8th row/column, as core)."""

    def __init__(self) -> None:
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None

    @staticmethod
    def _sample(t: torch.Tensor, keys: list, leader: Hashable) -> torch.Tensor:
        part = _slices(t.shape[0], len(keys))[keys.index(leader)]
        return t[part, ..., ::SUBSAMPLE, ::SUBSAMPLE]

    def input_change(self, x: torch.Tensor, keys: list, leader: Hashable) -> torch.Tensor | None:
        if self.input is None:
            return None
        return (self._sample(x, keys, leader) - self.input).flatten().abs().mean()

    def output_change(self, out: torch.Tensor, keys: list, leader: Hashable) -> torch.Tensor | None:
        if self.output is None:
            return None
        return (self._sample(out, keys, leader) - self.output).flatten().abs().mean()

    def remember(self, x: torch.Tensor, out: torch.Tensor, keys: list, leader: Hashable) -> None:
        self.input = self._sample(x, keys, leader).clone()
        self.output = self._sample(out, keys, leader).clone()

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.input, self.output) if t is not None]


class StepCacheRun:
    """All the state of one sampling run; gone (and every tensor freed) when the run ends."""

    def __init__(self, settings: StepCacheSettings, model_patcher: Any, sigmas: torch.Tensor | None) -> None:
        import comfy.model_management

        base = model_patcher.model
        self.settings = settings
        self.model_name = type(base).__name__
        self.output_channels = base.latent_format.latent_channels
        model_sampling = base.model_sampling
        self.window = SigmaWindow(model_sampling.percent_to_sigma(settings.start_percent),
                                  model_sampling.percent_to_sigma(settings.end_percent))
        self.store = DiffStore(model_patcher.load_device, model_patcher.offload_device, settings.cache_device,
                               settings.store_dtype, settings.budget_bytes,
                               free_memory=getattr(model_patcher, "get_free_memory", None)
                               or comfy.model_management.get_free_memory)  # the patcher's own: 0.38's dynamic VRAM
        self._fresh_decisions()
        self.level: Level | None = None
        self.model_sampling: Any = None
        if settings.level == Level.APPLY_MODEL.value:
            self.model_sampling, self.level = check_rebuildable(base), Level.APPLY_MODEL
        self._probing = False
        self.steps_total = max(0, len(sigmas) - 1) if sigmas is not None else 0
        self.steps_skipped = 0
        self.model_calls = 0
        self.calls: dict[str, dict[str, int]] = {}
        self.state = "running"
        self.number = report.next_run_number()
        self.started = time.monotonic()
        self.seconds: float | None = None

    def _fresh_decisions(self) -> None:
        s = self.settings
        self.rule = make_rule(s.mode, s.threshold, s.cache_interval, s.max_consecutive_skips)
        self.group = StepGroup()
        self.probe = ChangeProbe() if self.rule.uses_changes else None
        self.metadata: tuple | None = None

    # --- wiring --------------------------------------------------------------------------
    def install(self, model_options: dict) -> None:
        """Add this run's wrappers to the guider's (already copied) model options."""
        import comfy.patcher_extension as extension

        wrappers = extension.WrappersMP
        for kind, wrapper in ((wrappers.CALC_COND_BATCH, self.calc_cond_batch_wrapper),
                              (wrappers.APPLY_MODEL, self.apply_model_wrapper),
                              (wrappers.DIFFUSION_MODEL, self.diffusion_model_wrapper)):
            extension.add_wrapper_with_key(kind, KEY, wrapper, model_options, is_model_options=True)

    def calc_cond_batch_wrapper(self, executor: Callable, *args: Any, **kwargs: Any) -> Any:
        self.group.new_step()
        return executor(*args, **kwargs)

    def diffusion_model_wrapper(self, executor: Callable, *args: Any, **kwargs: Any) -> Any:
        if self.level is None and self._probing:
            self.level = Level.DIFFUSION_MODEL
        if self.level is not Level.DIFFUSION_MODEL or not isinstance(args[0], torch.Tensor):
            return executor(*args, **kwargs)
        channels = self.output_channels

        def compute() -> tuple[Any, torch.Tensor]:
            full = executor(*args, **kwargs)
            return full, full[:, :channels]

        return self._call(args[0][:, :channels], _transformer_options(args, kwargs), compute, self._with_diffs)

    def apply_model_wrapper(self, executor: Callable, *args: Any, **kwargs: Any) -> Any:
        if self.level is Level.DIFFUSION_MODEL:
            return executor(*args, **kwargs)
        if self.level is None:  # the first call tells whether the diffusion model calls our wrapper
            self._probing = True
            try:
                denoised = executor(*args, **kwargs)
            finally:
                self._probing = False
            if self.level is not None:
                return denoised
            self.model_sampling = check_rebuildable(executor.class_obj)
            self.level = Level.APPLY_MODEL
            log.info("[memkit] step cache: %s has no DIFFUSION_MODEL wrapper; caching at apply_model", self.model_name)
            return self._apply_call(executor, args, kwargs, denoised)
        return self._apply_call(executor, args, kwargs)

    def _apply_call(self, executor: Callable, args: tuple, kwargs: dict, denoised: torch.Tensor | None = None) -> Any:
        x, sigma, model_sampling = args[0], args[1], self.model_sampling
        x_in = model_sampling.calculate_input(sigma, x)
        sigma_b = sigma.reshape(sigma.shape[:1] + (1,) * (x.ndim - 1))

        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            out = denoised if denoised is not None else executor(*args, **kwargs)
            return out, (x - out) / sigma_b  # the model output: denoised = input - output * sigma

        def rebuild(model_input: torch.Tensor, keys: list) -> torch.Tensor:
            return model_sampling.calculate_denoised(sigma, self._with_diffs(model_input, keys).float(), x)

        return self._call(x_in, _transformer_options(args, kwargs), compute, rebuild)

    # --- one model call ------------------------------------------------------------------
    def _call(self, x: torch.Tensor, options: dict, compute: Callable[[], tuple[Any, torch.Tensor]],
              rebuild: Callable[[torch.Tensor, list], Any]) -> Any:
        """EasyCache's protocol for one model call (comfy_extras/nodes_easycache.py, in its order)."""
        self.model_calls += 1
        sigmas, keys = options.get("sigmas"), list(options.get("uuids") or ())
        conds = list(options.get("cond_or_uncond") or range(len(keys)))
        if sigmas is None or not keys or x.shape[0] % len(keys):
            return compute()[0]
        phase = self.window.phase(sigmas[0])
        if phase is Phase.AFTER:
            self._count(conds, "computed")
            return compute()[0]
        leader = self.group.leader in keys
        input_change = None
        if phase is Phase.ACTIVE:
            self._check_metadata(x)
            can_skip = self.store.has_all(keys)
            if self.group.step_skipped and can_skip:  # the leader skipped this step: follow it
                return self._skip(x, keys, conds, rebuild)
            leader = self.group.claim(keys)
            if leader:
                if self.probe is not None:
                    input_change = self.probe.input_change(x, keys, self.group.leader)
                if self.rule.should_skip(input_change, can_skip):
                    self.group.step_skipped = True
                    self.steps_skipped += 1
                    # the conds this step evaluates in later calls will follow: start their copies now
                    self.store.prefetch([k for k in self.store.held_keys() if k not in keys], x.device)
                    return self._skip(x, keys, conds, rebuild)
        full, out = compute()
        if leader:
            output_change, norm = None, None
            if self.probe is not None:
                output_change = self.probe.output_change(out, keys, self.group.leader)
                norm = out.flatten().abs().mean()
            self.rule.computed(input_change, output_change, norm)
        self._keep(out, x, keys)
        if leader and self.probe is not None:
            self.probe.remember(x, out, keys, self.group.leader)
        self._count(conds, "computed")
        return full

    def _skip(self, x: torch.Tensor, keys: list, conds: list, rebuild: Callable[[torch.Tensor, list], Any]) -> Any:
        self._count(conds, "skipped")
        return rebuild(x, keys)

    def _with_diffs(self, x: torch.Tensor, keys: list) -> torch.Tensor:
        parts = []
        for key, part in zip(keys, _slices(x.shape[0], len(keys))):
            xs, diff = x[part], self.store.get(key, x.device, x.dtype)
            if diff.shape[1:] == xs.shape[1:]:
                parts.append(xs + diff)
            else:
                rebuilt = xs.clone()
                rebuilt[_trailing(diff.shape, xs.shape)] += diff
                parts.append(rebuilt)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _keep(self, out: torch.Tensor, x: torch.Tensor, keys: list) -> None:
        if out.shape[1:] != x.shape[1:]:
            x = x[_trailing(out.shape, x.shape)]
        diff = out - x
        if len(keys) == 1:
            self.store.put(keys[0], diff)
            return
        for key, part in zip(keys, _slices(diff.shape[0], len(keys))):
            self.store.put(key, diff[part])

    def _check_metadata(self, x: torch.Tensor) -> None:
        metadata = (x.device, x.dtype, tuple(x.shape[1:]))
        if self.metadata is None:
            self.metadata = metadata
        elif metadata != self.metadata:
            log.warning("[memkit] step cache: the latent's shape, dtype or device changed in the run; starting over")
            self.store.clear()
            self._fresh_decisions()
            self.metadata = metadata

    def _count(self, conds: list, what: str) -> None:
        for cond in conds:
            counts = self.calls.setdefault(COND_NAMES.get(cond, f"cond{cond}"), {"computed": 0, "skipped": 0})
            counts[what] += 1

    # --- end of run ----------------------------------------------------------------------
    def held_tensors(self) -> list[torch.Tensor]:
        """Every tensor the run keeps between model calls (diffs and change measurements)."""
        return self.store.tensors() + (self.probe.tensors() if self.probe is not None else [])

    def finish(self, error: BaseException | None) -> dict[str, Any]:
        """Release everything and record the report (called from the OUTER_SAMPLE wrapper's finally)."""
        if error is None:
            self.state = "done"
        elif type(error).__name__ == "InterruptProcessingException":
            self.state = "interrupted"
        else:
            self.state = f"failed: {type(error).__name__}"
        self.store.clear()
        self._fresh_decisions()
        self.model_sampling = None
        self.seconds = round(time.monotonic() - self.started, 3)
        result = self.report()
        report.finished(self, result)
        peaks = ", ".join(f"{tier} ({use['device']}) {use['peak_bytes'] / 2**20:.2f} MB"
                          for tier, use in result["devices"].items())
        log.info("[memkit] step cache (%s, %s): skipped %d of %d steps (%.2fx) on %s at %s; peak held: %s",
                 self.settings.mode, self.state, self.steps_skipped, self.steps_total, result["estimated_speedup"],
                 self.model_name, result["level"], peaks)
        return result

    def report(self) -> dict[str, Any]:
        total, skipped = self.steps_total, self.steps_skipped
        return {
            "run": self.number,
            "model": self.model_name,
            "state": self.state,
            "level": self.level.value if self.level is not None else None,
            "settings": self.settings.as_dict(),
            "steps_total": total,
            "steps_skipped": skipped,
            "estimated_speedup": round(total / (total - skipped), 2) if total > skipped else 1.0,
            # model evaluations per cond (copied in one call: the server thread may read while sampling counts)
            "conds": {name: dict(counts) for name, counts in dict(self.calls).items()},
            "model_calls": self.model_calls,
            "devices": self.store.usage(),
            "spilled": self.store.spilled,
            "dropped": self.store.dropped,
            "seconds": self.seconds if self.seconds is not None else round(time.monotonic() - self.started, 3),
        }


def outer_sample_wrapper(settings: StepCacheSettings, on_finish: Callable[[dict[str, Any]], None] | None,
                         executor: Callable, *args: Any, **kwargs: Any) -> Any:
    """One sampling run: a fresh ``StepCacheRun`` on a copy of the guider's model options; the
    original options back and everything released when it ends, however it ends. ``on_finish``
    then gets the run's report (the node's text); its failure never hides the run's outcome."""
    import comfy.model_patcher

    guider = executor.class_obj
    original = guider.model_options
    sigmas = args[3] if len(args) > 3 else kwargs.get("sigmas")
    run = StepCacheRun(settings, guider.model_patcher, sigmas)
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    run.install(guider.model_options)
    report.started(run)
    error: BaseException | None = None
    try:
        return executor(*args, **kwargs)
    except BaseException as caught:
        error = caught
        raise
    finally:
        guider.model_options = original
        result = run.finish(error)
        if on_finish is not None:
            try:
                on_finish(result)
            except Exception as failed:
                log.warning("[memkit] step cache: could not show the run's report: %s: %s", type(failed).__name__,
                            failed)


def patch(model: Any, settings: StepCacheSettings,
          on_finish: Callable[[dict[str, Any]], None] | None = None) -> Any:
    """A clone of ``model`` (a ModelPatcher) with the step cache; ``model`` itself is untouched.
    Settings that never skip give ``model`` back, the same object. ``on_finish(report)`` is called
    after each run, once everything is released."""
    import comfy.patcher_extension

    problem = settings.problem()
    if problem is not None:
        raise ValueError(f"MemKitStepCache: {problem}")
    if not settings.enabled:
        return model
    patched = model.clone()
    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, KEY)  # one step cache per model
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, KEY,
                                 functools.partial(outer_sample_wrapper, settings, on_finish))
    return patched
