"""Every load is a node call: the four kinds as ComfyUI's own loaders, their readable names (pure)."""

import pytest

from comfyui_memkit.model_cache.cache_keys import CacheKeyRegistry, entry_cache_key
from comfyui_memkit.model_cache.config import DiffusionModelEntry, NodeEntry, TextEncoderEntry, VAEEntry
from comfyui_memkit.model_cache.loads import Load, loader_call, shown_options
from comfyui_memkit.model_cache.recipe import ModelKind, NodeCall

CLIP = {"type": "sdxl", "device": "default"}


@pytest.mark.parametrize(("kind", "names", "options", "node", "inputs"), [
    (ModelKind.CHECKPOINT, ["sd.safetensors"], {}, "CheckpointLoaderSimple", {"ckpt_name": "sd.safetensors"}),
    (ModelKind.DIFFUSION_MODEL, ["wan.safetensors"], {"weight_dtype": "fp8_e4m3fn"}, "UNETLoader",
     {"unet_name": "wan.safetensors", "weight_dtype": "fp8_e4m3fn"}),
    (ModelKind.DIFFUSION_MODEL, ["wan.safetensors"], {}, "UNETLoader",
     {"unet_name": "wan.safetensors", "weight_dtype": "default"}),
    (ModelKind.VAE, ["ae.safetensors"], {}, "VAELoader", {"vae_name": "ae.safetensors"}),
    (ModelKind.TEXT_ENCODER, ["l.safetensors"], {}, "CLIPLoader",
     {"clip_name": "l.safetensors", "type": "stable_diffusion", "device": "default"}),
    (ModelKind.TEXT_ENCODER, ["l.safetensors", "g.safetensors"], {"type": "sdxl", "device": "cpu"}, "DualCLIPLoader",
     {"clip_name1": "l.safetensors", "clip_name2": "g.safetensors", "type": "sdxl", "device": "cpu"}),
    (ModelKind.TEXT_ENCODER, ["l", "g", "t5"], {"type": "sd3"}, "TripleCLIPLoader",
     {"clip_name1": "l", "clip_name2": "g", "clip_name3": "t5"}),
])
def test_the_four_kinds_are_calls_of_comfyuis_own_loaders(kind, names, options, node, inputs):
    assert loader_call(kind, names, options) == NodeCall.of(node, inputs)


def test_three_text_encoders_take_no_device_and_a_node_has_no_loader_of_its_own():
    names = ["l.safetensors", "g.safetensors", "t5.safetensors"]
    with pytest.raises(ValueError, match="TripleCLIPLoader, which has no device input; use device 'default', not"):
        loader_call(ModelKind.TEXT_ENCODER, names, {"device": "cpu"})
    with pytest.raises(ValueError, match="one to three text encoders"):
        loader_call(ModelKind.TEXT_ENCODER, [*names, "x.safetensors"], {})
    with pytest.raises(ValueError, match="no loader of its own"):
        loader_call(ModelKind.NODE, [], {})


@pytest.mark.parametrize(("load", "name"), [
    (Load.loader(ModelKind.VAE, ["file.safetensors"]), "vae:file.safetensors"),
    (Load.loader(ModelKind.CHECKPOINT, ["sd.safetensors"], {}), "checkpoint:sd.safetensors"),
    (Load.loader(ModelKind.TEXT_ENCODER, ["a", "b"], CLIP), "text_encoder:a+b[type=sdxl]"),
    (Load.loader(ModelKind.TEXT_ENCODER, ["clip_l.safetensors"], {"type": "sd3", "device": "cpu"}),
     "text_encoder:clip_l.safetensors[device=cpu,type=sd3]"),
    (Load.loader(ModelKind.TEXT_ENCODER, ["a", "b", "c"], {"type": "sd3", "device": "default"}),
     "text_encoder:a+b+c[type=sd3]"),
    (Load.loader(ModelKind.DIFFUSION_MODEL, ["w"], {"weight_dtype": "default"}), "diffusion_model:w"),
    (Load.loader(ModelKind.DIFFUSION_MODEL, ["w"], {"weight_dtype": "fp8_e4m3fn"}),
     "diffusion_model:w[weight_dtype=fp8_e4m3fn]"),
    (Load.node("CLIPVisionLoader", {"clip_name": "x"}), "node:CLIPVisionLoader(clip_name=x)"),
    (Load.node("Loader", {"scale": 1.5, "mode": "fast", "on": True}), "node:Loader(mode=fast,on=True,scale=1.5)"),
])
def test_the_readable_name_is_made_from_what_was_asked_for(load, name):
    assert load.name == name


def test_a_calls_inputs_keep_their_type():
    assert NodeCall.of("N", {"scale": 1}) != NodeCall.of("N", {"scale": 1.0})
    assert NodeCall.of("N", {"scale": 1}) != NodeCall.of("N", {"scale": True})
    assert len({NodeCall.of("N", {"a": 1, "b": "x"}), NodeCall.of("N", {"b": "x", "a": 1})}) == 1


def test_status_shows_the_options_as_the_config_writes_them():
    def shown(load):
        return shown_options(load.kind, load.call)

    assert shown(Load.loader(ModelKind.VAE, ["ae"])) == {}
    assert shown(Load.loader(ModelKind.TEXT_ENCODER, ["a", "b"], CLIP)) == CLIP
    assert shown(Load.loader(ModelKind.DIFFUSION_MODEL, ["w"], {"weight_dtype": "fp8_e4m3fn"})) == {
        "weight_dtype": "fp8_e4m3fn"}
    assert shown(Load.node("CLIPVisionLoader", {"clip_name": "x"})) == {"node": "CLIPVisionLoader",
                                                                       "inputs": {"clip_name": "x"}}


def test_entries_load_through_the_same_calls_as_the_nodes():
    vae = VAEEntry(vae_name="ae.safetensors")
    dm = DiffusionModelEntry.model_construct(model_name="w", weight_dtype="default")
    te = TextEncoderEntry.model_construct(clip_names=["a", "b"], type="sdxl", device="default")
    node = NodeEntry(node="CLIPVisionLoader", inputs={"clip_name": "x"})
    assert vae.load() == Load.loader(ModelKind.VAE, ["ae.safetensors"])
    assert dm.load().call == loader_call(ModelKind.DIFFUSION_MODEL, ["w"], {})
    assert te.load() == Load.loader(ModelKind.TEXT_ENCODER, ["a", "b"], CLIP)
    assert node.load() == Load.node("CLIPVisionLoader", {"clip_name": "x"})
    assert [entry_cache_key(e) for e in (vae, dm, te, node)] == [
        "vae:ae.safetensors", "diffusion_model:w", "text_encoder:a+b[type=sdxl]", "node:CLIPVisionLoader(clip_name=x)"]


def test_a_load_making_a_configured_call_gets_the_configured_cache_key():
    registry = CacheKeyRegistry([DiffusionModelEntry.model_construct(model_name="w", weight_dtype="default",
                                                                     cache_key="wan", pinned=True)])
    assert registry.cache_key_for(Load.loader(ModelKind.DIFFUSION_MODEL, ["w"], {"weight_dtype": "default"})) == "wan"
    assert registry.cache_key_for(Load.loader(ModelKind.DIFFUSION_MODEL, ["w"])) == "wan", "the same call"
    fp8 = Load.loader(ModelKind.DIFFUSION_MODEL, ["w"], {"weight_dtype": "fp8_e4m3fn"})
    assert registry.cache_key_for(fp8) == "diffusion_model:w[weight_dtype=fp8_e4m3fn]"
    registry.remember(fp8.name, fp8)
    assert list(registry.known(ModelKind.DIFFUSION_MODEL)) == ["wan", fp8.name]
    assert registry.lookup(ModelKind.DIFFUSION_MODEL, fp8.name).load is fp8


def test_the_kind_says_which_outputs_an_entry_keeps():
    assert ModelKind.CHECKPOINT.kept_outputs == 3
    assert {ModelKind.TEXT_ENCODER.kept_outputs, ModelKind.DIFFUSION_MODEL.kept_outputs,
            ModelKind.VAE.kept_outputs} == {1}
    assert ModelKind.NODE.kept_outputs is None
