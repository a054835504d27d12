"""MemKitStepCache in the real ComfyUI sampler, on tiny seeded Wan 2.1, Flux and SD3 models.

The models are built here from seeded state dicts (a few blocks, small widths) and loaded the way
ComfyUI loads diffusion models (``comfy.sd.load_diffusion_model_state_dict``: detection, config,
``model_base`` class, ModelPatcher). Flux is the exception: its detection fixes 24 heads of 128
(width 3072), so the tiny Flux's config goes through ComfyUI's own config matching
(``model_config_from_unet_config``) with 2 heads of 128 instead. Everything runs through
``nodes.KSampler`` or ``comfy.sample.sample``; each test takes a second or two on 2 CPU cores.

The comparison with core's EasyCache puts a copy of the diffusion model's input in front of it
(``copy_input``, through the wrapper API). Core adds the cached diff in place into that input,
which for these float32 flow models without concat channels is the very tensor ``apply_model``
then uses as ``model_input`` (``calculate_input`` returns it and ``.to(float32)`` is a no-op), so
core's skipped steps come out shifted by the diff; with bf16/fp16 weights (the usual GPU case) the
input is a copy anyway. The step cache never writes into its input.
"""

from __future__ import annotations

import gc
import logging
import re
import weakref
from dataclasses import dataclass, replace

import pytest
import torch
from fixtures.generate import on_meta, seeded_state_dict

SEED = 20261219
STEPS = 12
CFG = 4.0
THRESHOLD = 1.0  # skips 4 of 12 steps on the tiny Wan and 5 on the tiny Flux, as core's EasyCache
WAN_DM = "memkit-wan21-t2v-tiny.safetensors"  # the fixture file MemKit's cached loader loads
TINY_FLUX = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=64, context_in_dim=64,
                 hidden_size=256, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56],
                 theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)


@dataclass(frozen=True)
class Tiny:
    name: str
    latent: tuple[int, ...]  # one sample's latent shape, batch first
    context_dim: int
    pooled_dim: int | None


WAN = Tiny("wan", (1, 16, 1, 16, 16), 4096, None)
FLUX = Tiny("flux", (1, 16, 16, 16), 64, 64)
SD3 = Tiny("sd3", (1, 16, 16, 16), 64, 64)


# --- tiny models ------------------------------------------------------------------------------

def _patcher(model):
    import comfy.model_management
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def _wan_state_dict(seed):
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    module = on_meta(lambda: WanModel(model_type="t2v", dim=256, ffn_dim=512, num_heads=2, num_layers=2,
                                      operations=comfy.ops.disable_weight_init))
    return seeded_state_dict(module, seed, dtype=torch.float32)


def _sd3_state_dict(seed):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    module = on_meta(lambda: MMDiT(
        in_channels=16, out_channels=16, patch_size=2, depth=2, num_patches=32 * 32, pos_embed_max_size=32,
        adm_in_channels=64, context_embedder_config={"target": "torch.nn.Linear",
                                                     "params": {"in_features": 64, "out_features": 128}},
        operations=comfy.ops.disable_weight_init))
    return seeded_state_dict(module, seed, dtype=torch.float32)


def _with_model_type(state_dict, model_class: str, model_type: str):
    """The detected config, but another ``model_base`` prediction kind (eps, v-prediction)."""
    import comfy.model_base
    import comfy.model_detection

    config = comfy.model_detection.model_config_from_unet(state_dict, "")
    config.set_inference_dtype(torch.float32, None)
    model = getattr(comfy.model_base, model_class)(config, model_type=comfy.model_base.ModelType[model_type])
    model.load_model_weights(state_dict, "")
    return _patcher(model)


@pytest.fixture(scope="module")
def wan(comfy_host):
    import comfy.sd

    return comfy.sd.load_diffusion_model_state_dict(_wan_state_dict(SEED))


@pytest.fixture(scope="module")
def sd3(comfy_host):
    import comfy.sd

    return comfy.sd.load_diffusion_model_state_dict(_sd3_state_dict(SEED + 1))


@pytest.fixture(scope="module")
def flux(comfy_host):
    import comfy.model_detection
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    state_dict = seeded_state_dict(on_meta(lambda: Flux(operations=comfy.ops.disable_weight_init, **TINY_FLUX)),
                                   SEED + 2, dtype=torch.float32)
    config = comfy.model_detection.model_config_from_unet_config(dict(TINY_FLUX), state_dict)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model(state_dict, "")
    model.load_model_weights(state_dict, "")
    return _patcher(model)


# --- sampling ---------------------------------------------------------------------------------

def conditioning(tiny: Tiny, tokens=(8, 8)):
    generator = torch.Generator().manual_seed(SEED + 10)

    def one(length):
        extra = {"pooled_output": torch.randn(1, tiny.pooled_dim, generator=generator)} if tiny.pooled_dim else {}
        return [[torch.randn(1, length, tiny.context_dim, generator=generator), extra]]

    return one(tokens[0]), one(tokens[1])


def ksample(model, tiny: Tiny, batch=1, tokens=(8, 8), seed=7):
    import nodes

    positive, negative = conditioning(tiny, tokens)
    latent = {"samples": torch.zeros((batch, *tiny.latent[1:]))}
    with torch.inference_mode():
        return nodes.KSampler().sample(model, seed, STEPS, CFG, "euler", "simple", positive, negative, latent)[0][
            "samples"]


def sample_with_callback(model, tiny: Tiny, callback, seed=7):
    import comfy.sample

    positive, negative = conditioning(tiny)
    latent = torch.zeros(tiny.latent)
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, STEPS, CFG, "euler", "simple", positive, negative, latent,
                                   callback=callback, disable_pbar=True, seed=seed)


def step_cache(model, **settings):
    from comfyui_memkit.nodes.step_cache import MemKitStepCache

    inputs = {"mode": "easycache", "threshold": THRESHOLD, "cache_interval": 3, "max_consecutive_skips": 0,
              "start_percent": 0.15, "end_percent": 0.95, "cache_device": "auto", "store_dtype": "same",
              "budget_mb": 0.0} | settings
    return MemKitStepCache.execute(model=model, **inputs).result[0]


def last_run():
    from comfyui_memkit.step_cache import report

    return report.last_runs()[-1]


def copy_input(executor, *args, **kwargs):
    """In front of core's EasyCache: it may then add its diff in place (see the module docstring)."""
    return executor(args[0].clone(), *args[1:], **kwargs)


def core_easycache(model, caplog, tiny: Tiny, threshold=THRESHOLD, **sample_args):
    """Core's EasyCache (comfy_extras/nodes_easycache.py): the latent and the steps it skipped."""
    import comfy.patcher_extension
    from comfy_extras.nodes_easycache import EasyCacheNode

    base = model.clone()
    base.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_copy_input", copy_input)
    easycache = EasyCacheNode.execute(base, threshold, 0.15, 0.95, False).result[0]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        latent = ksample(easycache, tiny, **sample_args)
    (skipped,) = re.findall(r"EasyCache - skipped (\d+)/\d+ steps", caplog.text)
    return latent, int(skipped)


def stored_bytes(run):
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in run.store.tensors()}
    return sum(storages.values())


# --- tests ------------------------------------------------------------------------------------

def test_threshold_zero_returns_the_same_model_and_the_same_latent(wan):
    assert step_cache(wan, threshold=0.0) is wan
    assert step_cache(wan, threshold=0.0, mode="interval") is wan
    assert torch.equal(ksample(step_cache(wan, threshold=0.0), WAN), ksample(wan, WAN))


@pytest.mark.parametrize("family", ["wan", "flux"])
def test_skips_the_steps_core_easycache_skips_and_gives_its_latent(family, request, caplog):
    model, tiny = request.getfixturevalue(family), {"wan": WAN, "flux": FLUX}[family]
    theirs, core_skipped = core_easycache(model, caplog, tiny)
    ours = ksample(step_cache(model), tiny)
    run = last_run()
    assert run["level"] == "diffusion_model"
    assert run["steps_skipped"] == core_skipped > 0
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, ksample(model, tiny)), "steps were really skipped"


def test_batch_two_matches_core_easycache(wan, caplog):
    theirs, core_skipped = core_easycache(wan, caplog, WAN, batch=2)
    ours = ksample(step_cache(wan), WAN, batch=2)
    assert last_run()["steps_skipped"] == core_skipped > 0
    assert ours.shape[0] == 2
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize(("tokens", "calls_per_step"), [((8, 8), 1), ((8, 77), 2)])
def test_cond_and_uncond_skip_together_batched_or_not(wan, caplog, tokens, calls_per_step):
    # 8 and 77 tokens cannot be batched (ComfyUI pads at most 4x): cond and uncond are then two
    # model calls per step, and uncond must follow the decision cond made in the first one
    theirs, core_skipped = core_easycache(wan, caplog, WAN, tokens=tokens)
    ours = ksample(step_cache(wan), WAN, tokens=tokens)
    run = last_run()
    assert run["model_calls"] == STEPS * calls_per_step
    assert run["conds"]["cond"] == run["conds"]["uncond"] == {"computed": STEPS - core_skipped,
                                                              "skipped": core_skipped}
    assert core_skipped > 0
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize(("mode", "max_consecutive_skips"), [("easycache", 1), ("easycache", 0), ("interval", 0)])
def test_huge_threshold_skips_exactly_what_the_rule_gives(wan, mode, max_consecutive_skips):
    import comfy.samplers

    from comfyui_memkit.step_cache.rule import Phase, SigmaWindow, predicted_skips

    model_sampling = wan.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, "simple", STEPS)
    window = SigmaWindow(model_sampling.percent_to_sigma(0.15), model_sampling.percent_to_sigma(0.95))
    active = sum(window.phase(sigma) is Phase.ACTIVE for sigma in sigmas[:-1])
    assert 0 < active < STEPS
    ksample(step_cache(wan, mode=mode, threshold=100.0, max_consecutive_skips=max_consecutive_skips), WAN)
    expected = predicted_skips(active, mode, 3, max_consecutive_skips)
    assert expected > 0
    assert last_run()["steps_skipped"] == expected


def test_sd3_caches_at_apply_model_and_skips(sd3):
    plain = ksample(sd3, SD3)
    ours = ksample(step_cache(sd3), SD3)
    run = last_run()
    assert run["level"] == "apply_model"
    assert run["steps_skipped"] > 0
    assert run["conds"]["cond"] == run["conds"]["uncond"]
    assert torch.isfinite(ours).all()
    assert not torch.equal(ours, plain)
    assert (ours - plain).abs().mean() < plain.abs().mean()  # a perturbation, not noise


@pytest.mark.parametrize("model_type", ["FLOW", "EPS"])
def test_apply_model_level_rebuilds_eps_and_flow_outputs_exactly(comfy_host, model_type):
    """The same decisions at apply_model (output recovered from denoised, rebuilt through
    calculate_input/calculate_denoised) give the diffusion-model level's latent, to rounding."""
    from comfyui_memkit.step_cache.hooks import patch
    from comfyui_memkit.step_cache.settings import StepCacheSettings

    model = _with_model_type(_wan_state_dict(SEED), "WAN21", model_type)
    every_other_step = StepCacheSettings(mode="interval", cache_interval=2)
    at_diffusion_model = ksample(patch(model, every_other_step), WAN)
    first = last_run()
    at_apply_model = ksample(patch(model, replace(every_other_step, level="apply_model")), WAN)
    second = last_run()
    assert (first["level"], second["level"]) == ("diffusion_model", "apply_model")
    assert first["steps_skipped"] == second["steps_skipped"] > 0
    scale = at_diffusion_model.abs().max()
    assert (at_apply_model - at_diffusion_model).abs().max() <= 1e-5 * scale
    assert not torch.equal(at_diffusion_model, ksample(model, WAN))


def test_other_prediction_kinds_without_a_diffusion_model_wrapper_are_refused_by_name(comfy_host):
    from comfyui_memkit.step_cache.hooks import check_rebuildable

    model = _with_model_type(_sd3_state_dict(SEED + 1), "SD3", "V_PREDICTION")
    with pytest.raises(ValueError, match=r"SD3 does not call DIFFUSION_MODEL wrappers.*V_PREDICTION"):
        ksample(step_cache(model), SD3)
    run = last_run()
    assert run["state"] == "failed: ValueError"
    assert sum(use["bytes"] for use in run["devices"].values()) == 0
    with pytest.raises(ValueError, match="V_PREDICTION"):
        check_rebuildable(model.model)


@pytest.mark.parametrize("store_dtype", ["same", "fp8"])
def test_bytes_held_are_counted_exactly_and_everything_is_freed_after_the_run(wan, store_dtype):
    from comfyui_memkit.step_cache import report

    diffusion_model = wan.model.diffusion_model
    attributes = set(diffusion_model.__dict__)
    options = repr(wan.model_options)
    seen, during = [], []

    def callback(step, x0, x, total_steps):
        (run,) = report.live_runs()
        held = run.report()["devices"]
        during.append((sum(use["bytes"] for use in held.values()), stored_bytes(run)))
        seen.extend(weakref.ref(t) for t in run.held_tensors())

    sample_with_callback(step_cache(wan, store_dtype=store_dtype), WAN, callback)
    gc.collect()
    assert len(during) == STEPS
    assert all(reported == actual for reported, actual in during)
    assert max(reported for reported, _ in during) > 0
    assert seen
    assert all(ref() is None for ref in seen), "every cached tensor is gone after the run"
    run = last_run()
    assert run["state"] == "done"
    assert sum(use["bytes"] for use in run["devices"].values()) == 0
    assert sum(use["peak_bytes"] for use in run["devices"].values()) == max(reported for reported, _ in during)
    assert report.live_runs() == []
    assert set(diffusion_model.__dict__) == attributes
    assert repr(wan.model_options) == options


def test_an_interrupted_run_frees_everything(wan):
    import comfy.model_management

    from comfyui_memkit.step_cache import report

    seen = []

    def callback(step, x0, x, total_steps):
        seen.extend(weakref.ref(t) for t in report.live_runs()[0].held_tensors())
        if step == STEPS // 2:
            raise comfy.model_management.InterruptProcessingException()

    patched = step_cache(wan, threshold=3.0)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        sample_with_callback(patched, WAN, callback)
    gc.collect()
    assert seen
    assert all(ref() is None for ref in seen)
    run = last_run()
    assert run["state"] == "interrupted"
    assert sum(use["bytes"] for use in run["devices"].values()) == 0
    assert report.live_runs() == []
    assert torch.equal(ksample(patched, WAN), ksample(patched, WAN)), "the next runs start afresh"


def test_a_plain_prompt_after_a_step_cached_one_on_the_memkit_cached_model_is_unchanged(comfy_host, make_service):
    from comfyui_memkit.nodes.cached_loaders import MemKitDiffusionModelLoader

    make_service()
    reference = ksample(comfy_host.nodes.UNETLoader().load_unet(WAN_DM, "default")[0], WAN)
    cached = MemKitDiffusionModelLoader.execute(WAN_DM, "default").result[0]
    stepped = ksample(step_cache(cached, threshold=3.0), WAN)
    assert last_run()["steps_skipped"] > 0
    assert not torch.equal(stepped, reference)
    again = MemKitDiffusionModelLoader.execute(WAN_DM, "default").result[0]
    assert again.model is cached.model, "the same cached model"
    assert torch.equal(ksample(again, WAN), reference)
    assert torch.equal(ksample(cached, WAN), reference)


def test_over_budget_diffs_spill_or_are_computed_and_the_run_completes(wan):
    one_diff_mb = 16 * 16 * 16 * 4 / 2**20  # one cond's float32 diff
    ksample(step_cache(wan, cache_device="compute", budget_mb=one_diff_mb), WAN)
    run = last_run()
    assert run["spilled"] > 0  # uncond's diff went to the offload device
    assert run["steps_skipped"] > 0
    ksample(step_cache(wan, cache_device="offload", budget_mb=one_diff_mb / 2), WAN)
    run = last_run()
    assert run["state"] == "done"
    assert run["dropped"] > 0
    assert run["steps_skipped"] == 0  # nothing could be kept: every step computed


def test_the_node_registers_with_a_tooltip_on_every_input(comfy_host):
    import asyncio

    from comfyui_memkit.nodes import extension

    nodes = asyncio.run(extension.MemKitExtension.get_node_list(object.__new__(extension.MemKitExtension)))
    (node,) = [n for n in nodes if n.GET_SCHEMA().node_id == "MemKitStepCache"]
    schema = node.GET_SCHEMA()
    assert schema.category == "memkit/sampling"
    assert [i.id for i in schema.inputs] == ["model", "mode", "threshold", "cache_interval", "max_consecutive_skips",
                                             "start_percent", "end_percent", "cache_device", "store_dtype",
                                             "budget_mb"]
    assert all(i.tooltip for i in schema.inputs)
    assert node.validate_inputs(start_percent=0.9, end_percent=0.5) == (
        "start_percent (0.9) is after end_percent (0.5): no step would be cached")
