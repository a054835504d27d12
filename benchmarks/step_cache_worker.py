"""The step cache benchmark (issue 19) in a fresh process; prints one JSON line.

A Wan 2.1 diffusion model at the 1.3B model's width (dim 1536, FFN 8960, 12 heads) with ``LAYERS``
blocks, built from seeded weights and loaded through ComfyUI's own loader
(``comfy.sd.load_diffusion_model_state_dict``), samples one latent for ``STEPS`` steps with CFG
(cond and uncond in one batch of 2) through ``comfy.sample.sample``, once per method (and a
second no-cache run at the end, to show the drift):

* no cache;
* MemKitStepCache in **interval** mode (``cache_interval`` 2) on a window chosen so that it
  computes step 3, skips 4, computes 5, ... skips 18 (``SKIPPED``), with its diffs on the compute
  or the offload device, stored as they are or in fp8;
* core's EasyCache (``comfy_extras.nodes_easycache``) **forced** to skip the same steps: a wrapper
  in front of it sets its threshold to +inf on those steps and -inf on the others (and hands it a
  copy of its input, as the host tests do, so that its in-place add cannot shift the sampler's
  latent);
* a **reimplementation** of the TeaCache residual pattern, forced to the same steps: through
  ComfyUI's block-replace patches it keeps the hidden-state residual of the blocks (and the last
  time modulation) between steps and, as TeaCache does, frees it only at step 0 of the next run.

Random weights make adaptive decisions meaningless, hence the fixed skip set; a forward hook on the
first block records which steps really ran the blocks, so each method's skipped steps are checked,
not assumed. Memory held between steps: the bytes of the tensors each method keeps (unique
storages), read after every step by the sampler's callback; for MemKit also per device tier as its
report gives them. On a CPU the compute and the offload device are both the CPU.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from support.comfy_host import import_comfy  # noqa: E402

log = logging.getLogger("memkit.bench")

DIM, FFN, HEADS, LAYERS = 1536, 8960, 12, 3  # Wan 2.1 1.3B's width; ComfyUI reads heads as dim // 128
LATENT = (1, 16, 2, 16, 24)  # 5 frames of 192x128 pixels: 2x8x12 = 192 tokens of 1x2x2 patches
TEXT_TOKENS, TEXT_DIM = 32, 4096
STEPS, CFG, SAMPLER, SCHEDULER = 20, 5.0, "euler", "simple"
SKIPPED = (4, 6, 8, 10, 12, 14, 16, 18)
WINDOW = (3, 18)  # MemKit's interval window: first and last active step
SEED = 20261219
# One torch thread: this 2-core machine is often shared with a test run, and two OpenMP threads
# beside another busy process made a small Wan model's step up to 18x slower (13.7 s against 0.76 s
# for 20 steps), which would measure the contention, not the methods.
THREADS = 1


def storage_bytes(tensors: list[Any]) -> int:
    """Bytes of the distinct storages behind these tensors (views of one storage count once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(storages.values())


def build_model() -> Any:
    import comfy.ops
    import comfy.sd
    import torch
    from comfy.ldm.wan.model import WanModel
    from fixtures.generate import on_meta, seeded_state_dict

    module = on_meta(lambda: WanModel(model_type="t2v", dim=DIM, ffn_dim=FFN, num_heads=HEADS, num_layers=LAYERS,
                                      operations=comfy.ops.disable_weight_init))
    return comfy.sd.load_diffusion_model_state_dict(seeded_state_dict(module, SEED, dtype=torch.float32))


def conditioning() -> tuple[list, list]:
    import torch

    generator = torch.Generator().manual_seed(SEED + 1)
    return ([[torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=generator), {}]],
            [[torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=generator), {}]])


def percent_between(model_sampling: Any, above: float, at_or_below: float) -> float:
    """A percent whose sigma lies strictly between two schedule sigmas (bisection: sigma falls as
    percent grows), so the window's phases do not depend on rounding."""
    target = (above + at_or_below) / 2
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if float(model_sampling.percent_to_sigma(middle)) > target:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def interval_window(model_sampling: Any, sigmas: Any) -> tuple[float, float]:
    """start_percent and end_percent that make steps WINDOW[0]..WINDOW[1] the active ones."""
    from comfyui_memkit.step_cache.rule import Phase, SigmaWindow

    first, last = WINDOW
    start = percent_between(model_sampling, float(sigmas[first - 1]), float(sigmas[first]))
    end = percent_between(model_sampling, float(sigmas[last]), float(sigmas[last + 1]))
    window = SigmaWindow(model_sampling.percent_to_sigma(start), model_sampling.percent_to_sigma(end))
    active = [i for i, sigma in enumerate(sigmas[:-1]) if window.phase(sigma) is Phase.ACTIVE]
    if active != list(range(first, last + 1)):
        raise RuntimeError(f"the window covers steps {active}, not {first}..{last}")
    return start, end


def transformer_options(args: tuple, kwargs: dict) -> dict:
    options = kwargs.get("transformer_options")
    return options if isinstance(options, dict) else args[-1]


class StepClock:
    """The step being sampled (the sampler's callback moves it on) and which steps ran the blocks."""

    def __init__(self, schedule: Any) -> None:
        self.schedule = schedule
        self.step = 0
        self.ran: list[int] = []

    def of(self, sigmas: Any) -> int:
        """The step whose sigma this is."""
        return int((self.schedule[:-1] - float(sigmas[0])).abs().argmin())


# --- methods: each returns (model to sample, what it holds now, what to free after measuring) -----

Held = Callable[[], dict[str, int]]


def no_cache(model: Any, clock: StepClock) -> tuple[Any, Held, Callable[[], None]]:
    return model, dict, lambda: None


def memkit(model: Any, clock: StepClock, window: tuple[float, float], cache_device: str, store_dtype: str
           ) -> tuple[Any, Held, Callable[[], None]]:
    from comfyui_memkit.nodes.step_cache import MemKitStepCache
    from comfyui_memkit.step_cache import report

    patched = MemKitStepCache.execute(model=model, mode="interval", threshold=1.0, cache_interval=2,
                                      max_consecutive_skips=0, start_percent=window[0], end_percent=window[1],
                                      cache_device=cache_device, store_dtype=store_dtype, budget_mb=0.0).result[0]

    def held() -> dict[str, int]:
        runs = report.live_runs()
        if not runs:
            return {"total": 0}
        run = runs[-1]
        tiers = {f"{tier} ({use['device']})": use["bytes"] for tier, use in run.report()["devices"].items()}
        return {"total": storage_bytes(run.held_tensors()), **tiers}

    return patched, held, lambda: None


def core_easycache(model: Any, clock: StepClock) -> tuple[Any, Held, Callable[[], None]]:
    import comfy.patcher_extension
    from comfy_extras.nodes_easycache import EasyCacheNode

    holder: dict[str, Any] = {}

    def force(executor: Callable, *args: Any, **kwargs: Any) -> Any:
        easycache = transformer_options(args, kwargs)["easycache"]
        holder["run"] = easycache
        skip = clock.of(transformer_options(args, kwargs)["sigmas"]) in SKIPPED
        easycache.reuse_threshold = math.inf if skip else -math.inf
        return executor(args[0].clone(), *args[1:], **kwargs)

    base = model.clone()
    base.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "bench_force", force)
    patched = EasyCacheNode.execute(base, 0.2, 0.0, 1.0, False).result[0]

    def held() -> dict[str, int]:
        easycache = holder.get("run")
        if easycache is None:
            return {"total": 0}
        tensors = [*easycache.uuid_cache_diffs.values(), easycache.x_prev_subsampled,
                   easycache.output_prev_subsampled, easycache.output_prev_norm]
        return {"total": storage_bytes(tensors)}

    return patched, held, holder.clear


class ResidualCache:
    """TeaCache's state for one model: the blocks' hidden-state residual and the last time
    modulation, kept between steps and between runs (freed at step 0 of the next run)."""

    def __init__(self, clock: StepClock, blocks: int) -> None:
        self.clock = clock
        self.blocks = blocks
        self.residual: Any = None
        self.modulation: Any = None
        self.start: Any = None  # the blocks' input during a computed step (not held between steps)
        self.skipping = False
        self.last_step: int | None = None

    def tensors(self) -> list[Any]:
        return [self.residual, self.modulation]

    def free(self) -> None:
        self.residual = self.modulation = self.start = None

    def block(self, index: int, args: dict, extra: dict) -> dict:
        x = args["img"]
        if index == 0:
            step = self.clock.of(args["transformer_options"]["sigmas"])
            if self.last_step is None or step < self.last_step:
                self.free()  # a new run: TeaCache drops the last run's state at its step 0
            self.last_step = step
            self.modulation = args["vec"].clone()  # TeaCache compares the modulated input step to step
            self.skipping = (step in SKIPPED and self.residual is not None and self.residual.shape == x.shape)
            if self.skipping:
                return {"img": x + self.residual}
            self.start = x.clone()
        elif self.skipping:
            return {"img": x}
        out = extra["original_block"](args)
        if index == self.blocks - 1 and not self.skipping:
            self.residual, self.start = out["img"] - self.start, None
        return out


def teacache_pattern(model: Any, clock: StepClock) -> tuple[Any, Held, Callable[[], None]]:
    blocks = len(model.model.diffusion_model.blocks)
    cache = ResidualCache(clock, blocks)
    patched = model.clone()
    for index in range(blocks):
        patched.set_model_patch_replace(functools.partial(cache.block, index), "dit", "double_block", index)
    return patched, lambda: {"total": storage_bytes(cache.tensors())}, cache.free


# --- the run --------------------------------------------------------------------------------------

def sample(model: Any, clock: StepClock, held: Held, positive: list, negative: list, steps: int = STEPS
           ) -> dict[str, Any]:
    import comfy.sample
    import torch

    latent = torch.zeros(LATENT)
    noise = comfy.sample.prepare_noise(latent, SEED)
    peaks: dict[str, int] = {}
    clock.step, clock.ran = 0, []

    def callback(step: int, x0: Any, x: Any, total_steps: int) -> None:
        clock.step = step + 1
        for name, nbytes in held().items():
            peaks[name] = max(peaks.get(name, 0), nbytes)

    started = time.perf_counter()
    with torch.inference_mode():
        samples = comfy.sample.sample(model, noise, steps, CFG, SAMPLER, SCHEDULER, positive, negative, latent,
                                      callback=callback, disable_pbar=True, seed=SEED)
    seconds = time.perf_counter() - started
    after = held().get("total", 0)
    skipped = [step for step in range(steps) if step not in clock.ran]
    return {"seconds": seconds, "skipped_steps": skipped, "held_peak": peaks, "held_after_bytes": after,
            "samples": samples}


def main() -> None:
    import_comfy()
    import comfy.samplers
    import conftest  # noqa: F401  (imports this repository as comfyui_memkit)
    import torch

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(THREADS)
    load_before = os.getloadavg()
    built = time.perf_counter()
    model = build_model()
    build_seconds = time.perf_counter() - built
    model_sampling = model.get_model_object("model_sampling")
    schedule = comfy.samplers.calculate_sigmas(model_sampling, SCHEDULER, STEPS)
    window = interval_window(model_sampling, schedule)
    clock = StepClock(schedule)
    hook = model.model.diffusion_model.blocks[0].register_forward_hook(lambda *_: clock.ran.append(clock.step))
    positive, negative = conditioning()
    methods: list[tuple[str, str, Callable]] = [
        ("none", "no cache", no_cache),
        ("memkit-compute-same", "MemKitStepCache, compute device, same dtype",
         functools.partial(memkit, window=window, cache_device="compute", store_dtype="same")),
        ("memkit-offload-same", "MemKitStepCache, offload device, same dtype",
         functools.partial(memkit, window=window, cache_device="offload", store_dtype="same")),
        ("memkit-compute-fp8", "MemKitStepCache, compute device, fp8",
         functools.partial(memkit, window=window, cache_device="compute", store_dtype="fp8")),
        ("memkit-offload-fp8", "MemKitStepCache, offload device, fp8",
         functools.partial(memkit, window=window, cache_device="offload", store_dtype="fp8")),
        ("easycache", "core EasyCache (forced to the same steps)", core_easycache),
        ("teacache", "TeaCache residual pattern (reimplementation, forced to the same steps)", teacache_pattern),
        ("none-again", "no cache, again (drift check)", no_cache),
    ]
    try:
        warm = sample(model, clock, dict, positive, negative, steps=2)  # first-call costs out of the timings
        rows, latents = [], {}
        for key, label, make in methods:
            patched, held, free = make(model, clock)
            result = sample(patched, clock, held, positive, negative)
            free()
            latents[key] = result.pop("samples")
            rows.append({"key": key, "label": label, **result})
            log.warning("%s: %.1f s, skipped %s", label, result["seconds"], result["skipped_steps"])
    finally:
        hook.remove()
    reference = latents["none"]
    for row in rows:
        latent = latents[row["key"]]
        row["relative_difference"] = float((latent - reference).abs().mean() / reference.abs().mean())
        row["max_abs_vs_memkit_same"] = float((latent - latents["memkit-compute-same"]).abs().max())
    parameters = sum(p.numel() for p in model.model.diffusion_model.parameters())
    tokens = LATENT[2] * (LATENT[3] // 2) * (LATENT[4] // 2)
    sys.stdout.write(json.dumps({
        "model": {"dim": DIM, "ffn_dim": FFN, "heads": HEADS, "blocks": LAYERS, "parameters": parameters,
                  "dtype": str(next(model.model.diffusion_model.parameters()).dtype).removeprefix("torch."),
                  "class": type(model.model).__name__, "build_seconds": build_seconds},
        "latent": list(LATENT), "tokens": tokens, "text_tokens": TEXT_TOKENS, "steps": STEPS, "cfg": CFG,
        "sampler": SAMPLER, "scheduler": SCHEDULER, "skipped": list(SKIPPED), "window_steps": list(WINDOW),
        "window_percents": list(window), "warmup_seconds": warm["seconds"], "threads": torch.get_num_threads(),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "rows": rows,
    }) + "\n")


if __name__ == "__main__":
    main()
