"""The check of a config's node inputs against a node's schema (pure; schemas as INPUT_TYPES gives them)."""

import pytest

from comfyui_memkit.model_cache.cache_keys import entry_cache_key
from comfyui_memkit.model_cache.config import HostChoices, NodeEntry, parse_config
from comfyui_memkit.model_cache.loads import Load
from comfyui_memkit.model_cache.node_inputs import NodeInputsError, check_node_inputs
from comfyui_memkit.model_cache.recipe import ModelKind, NodeCall

V1_LOADER = {"required": {"model_name": (["a.safetensors", "b.safetensors"],),
                          "scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0}),
                          "steps": ("INT", {"default": 4, "min": 1, "max": 64}),
                          "mode": (["fast", "exact"],)},
             "optional": {"label": ("STRING", {"default": ""}), "flag": ("BOOLEAN", {"default": False}),
                          "model": ("MODEL",)},
             "hidden": {"unique_id": "UNIQUE_ID"}}
V3_LOADER = {"required": {"clip_name": ("COMBO", {"options": ["clip_vision_h.safetensors"]})}}


def problems(schema, inputs):
    with pytest.raises(NodeInputsError) as raised:
        check_node_inputs("Loader", schema, inputs)
    return raised.value.problems


def test_good_inputs_pass_and_required_defaults_are_filled_in():
    resolved = check_node_inputs("Loader", V1_LOADER, {"model_name": "b.safetensors", "mode": "exact", "flag": True})
    assert resolved == {"model_name": "b.safetensors", "scale": 1.0, "steps": 4, "mode": "exact", "flag": True}
    assert check_node_inputs("Clip", V3_LOADER, {"clip_name": "clip_vision_h.safetensors"}) == {
        "clip_name": "clip_vision_h.safetensors"}


def test_every_bad_field_is_named_at_once():
    found = problems(V1_LOADER, {"model_name": "c.safetensors", "scale": 11, "steps": 2.5, "colour": "red",
                                 "flag": "yes", "label": 3})
    text = "\n".join(found)
    assert "field 'inputs.colour': Loader has no input 'colour' (its inputs: model_name, scale, steps, mode" in text
    assert "field 'inputs.model_name': 'c.safetensors' is not one of: a.safetensors, b.safetensors" in text
    assert "field 'inputs.scale': 11 is above the maximum 10.0" in text
    assert "field 'inputs.steps': must be an integer, not 2.5" in text
    assert "field 'inputs.flag': must be true or false, not 'yes'" in text
    assert "field 'inputs.label': must be a string, not 3" in text
    assert "field 'inputs.mode': required by Loader and has no default; give it" in text
    assert len(found) == 7


def test_v3_combos_and_limits_are_checked():
    assert problems(V3_LOADER, {"clip_name": "other.safetensors"}) == [
        "field 'inputs.clip_name': 'other.safetensors' is not one of: clip_vision_h.safetensors"]
    assert problems(V1_LOADER, {"model_name": "a.safetensors", "mode": "fast", "steps": 0}) == [
        "field 'inputs.steps': 0 is below the minimum 1"]
    assert problems(V1_LOADER, {"model_name": "a.safetensors", "mode": "fast", "steps": True}) == [
        "field 'inputs.steps': must be an integer, not True"]


def test_a_link_input_cannot_be_given_in_a_config():
    found = problems(V1_LOADER, {"model_name": "a.safetensors", "mode": "fast", "model": "x"})
    assert found == ["field 'inputs.model': is a MODEL input (a link from another node), which a config cannot "
                     "give; only widget values (INT, FLOAT, STRING, BOOLEAN, COMBO) can be set"]


def test_long_option_lists_are_shortened_in_messages():
    schema = {"required": {"name": ([f"m{i}.safetensors" for i in range(40)],)}}
    message = problems(schema, {"name": "x"})[0]
    assert "m11.safetensors … (28 more)" in message
    assert "m12.safetensors" not in message


def test_canonical_inputs_do_not_depend_on_key_order():
    assert NodeCall.of("N", {"b": 1, "a": "x"}).canonical == NodeCall.of("N", {"a": "x", "b": 1}).canonical == \
        '["N",{"a":"x","b":1}]'


def test_a_nodes_section_in_the_config():
    choices = HostChoices(clip_types=("stable_diffusion",), weight_dtypes=("default",))
    config = parse_config("""{"models": {"nodes": [
        {"node": "CLIPVisionLoader", "inputs": {"clip_name": "clip_vision_h.safetensors"}, "cache_key": "cv"},
        {"node": "UpscaleModelLoader", "inputs": {"model_name": "4x.pth"}, "pinned": false},
        {"node": "", "inputs": {}},
        {"node": "X", "inputs": {"nested": {"a": 1}}},
        {"node": "X", "inputs": {}, "colour": 1}
    ]}}""", choices, source="cfg.json")
    assert [e.kind for e in config.entries] == [ModelKind.NODE, ModelKind.NODE]
    first, second = config.entries
    assert isinstance(first, NodeEntry)
    assert entry_cache_key(first) == "cv"
    assert first.pinned
    assert entry_cache_key(second) == "node:UpscaleModelLoader(model_name=4x.pth)"
    assert not second.pinned
    assert first.load().call == NodeCall.of("CLIPVisionLoader", {"clip_name": "clip_vision_h.safetensors"})
    assert [p.split(": ", 2)[1] for p in config.problems] == ["models.nodes[2]", "models.nodes[3]", "models.nodes[4]"]
    assert "field 'node'" in config.problems[0]
    assert "field 'inputs.nested" in config.problems[1]
    assert "field 'colour': Extra inputs are not permitted" in config.problems[2]


def test_the_default_name_of_a_node_load():
    load = Load.node("AudioEncoderLoader", {"audio_encoder_name": "w.safetensors"})
    assert load.name == "node:AudioEncoderLoader(audio_encoder_name=w.safetensors)"
