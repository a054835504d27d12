import json
import logging

import pytest

from comfyui_memkit.model_cache.config import (
    CONFIG_ENV,
    PACKAGE_CONFIG,
    ConfigError,
    HostChoices,
    check_model_name,
    load_config,
    locate_config,
    parse_config,
)
from comfyui_memkit.model_cache.recipe import ModelKind

CHOICES = HostChoices(clip_types=("stable_diffusion", "sdxl", "flux"), weight_dtypes=("default", "fp8_e4m3fn"))


def parse(models=None, settings=None, **top) -> object:
    body = {"version": 1, "models": models or {}, **top}
    if settings is not None:
        body["settings"] = settings
    return parse_config(json.dumps(body), CHOICES, source="cfg.json")


def test_the_shipped_config_is_valid_and_preloads_nothing_by_default():
    config = parse_config(PACKAGE_CONFIG.read_text(), CHOICES, source="preload_config.json")
    assert config.problems == []
    assert len(config.entries) == 8
    assert config.enabled_entries() == []


def test_a_full_valid_config():
    config = parse({
        "checkpoints": [{"name": "sd15.safetensors", "cache_key": "sd"}],
        "text_encoders": [{"clip_names": ["l.safetensors", "g.safetensors"], "type": "sdxl", "device": "cpu"}],
        "diffusion_models": [{"model_name": "wan.safetensors", "weight_dtype": "fp8_e4m3fn", "pinned": False}],
        "vaes": [{"vae_name": "ae.safetensors", "enabled": False}],
    }, settings={"preload_mode": "blocking", "ram_budget_gb": 8, "auto_gpu_load": True})
    assert config.problems == []
    assert [e.kind for e in config.entries] == [ModelKind.CHECKPOINT, ModelKind.TEXT_ENCODER,
                                                ModelKind.DIFFUSION_MODEL, ModelKind.VAE]
    assert len(config.enabled_entries()) == 3
    assert config.settings.preload_mode == "blocking"
    assert config.entries[1].load_options() == {"type": "sdxl", "device": "cpu"}
    assert config.entries[2].pinned is False


@pytest.mark.parametrize(("models", "expected"), [
    ({"checkpoints": [{"name": "../secret.safetensors"}]}, "models.checkpoints[0]: field 'name': '../secret"),
    ({"checkpoints": [{"name": "/etc/passwd"}]}, "field 'name': '/etc/passwd' is an absolute path"),
    ({"vaes": [{"vae_name": "C:\\models\\ae.safetensors"}]}, "field 'vae_name'"),
    ({"checkpoints": [{}]}, "field 'name': Field required"),
    ({"checkpoints": [{"name": "a", "colour": "red"}]}, "field 'colour': Extra inputs are not permitted"),
    ({"checkpoints": [{"name": "a", "enabled": "yes please"}]}, "field 'enabled'"),
    ({"text_encoders": [{"clip_names": []}]}, "field 'clip_names'"),
    ({"text_encoders": [{"clip_names": ["a", "b", "c", "d"]}]}, "field 'clip_names'"),
    ({"text_encoders": [{"clip_names": ["a"], "type": "sdxxl"}]}, "field 'type': 'sdxxl' is not one of"),
    ({"text_encoders": [{"clip_names": ["a"], "device": "gpu7"}]}, "field 'device': 'gpu7' is not one of"),
    ({"diffusion_models": [{"model_name": "w", "weight_dtype": "fp4"}]}, "field 'weight_dtype': 'fp4' is not"),
    ({"vaes": ["ae.safetensors"]}, "models.vaes[0]: must be an object"),
    ({"loras": [{"name": "x"}]}, "models.loras: unknown section"),
    ({"vaes": {"vae_name": "x"}}, "models.vaes: must be a list"),
])
def test_each_bad_entry_is_named_and_skipped_while_the_rest_load(models, expected):
    good = {"name": "good.safetensors", "cache_key": "good"}
    merged = {"checkpoints": [good], **{k: v for k, v in models.items() if k != "checkpoints"}}
    if "checkpoints" in models:
        merged["checkpoints"] = [good, *models["checkpoints"]]
        expected = expected.replace("checkpoints[0]", "checkpoints[1]")
    config = parse(merged)
    assert len(config.problems) == 1, config.problems
    assert config.problems[0].startswith("cfg.json: ")
    assert expected in config.problems[0]
    assert [getattr(e, "cache_key", None) for e in config.entries][:1] == ["good"]


def test_a_duplicate_cache_key_is_reported_on_the_second_entry():
    config = parse({"checkpoints": [{"name": "a", "cache_key": "x"}], "vaes": [{"vae_name": "b", "cache_key": "x"}]})
    assert len(config.entries) == 1
    assert "models.vaes[0] (cache_key 'x'): field 'cache_key': 'x' is already used by models.checkpoints[0]" \
        in config.problems[0]


@pytest.mark.parametrize(("text", "expected"), [
    ("{not json", "not valid JSON (line 1, column 2"),
    ("[1, 2]", "the top level must be a JSON object"),
    ('{"models": []}', "field 'models' must be an object"),
    ('{"settings": {"preload_mode": "eager"}}', "field 'settings.preload_mode'"),
    ('{"settings": {"ram_budget_gb": -1}}', "field 'settings.ram_budget_gb'"),
    ('{"extra": 1}', "field 'extra'"),
])
def test_a_file_that_is_unusable_as_a_whole_raises_a_named_error(text, expected):
    with pytest.raises(ConfigError, match=r"cfg\.json") as caught:
        parse_config(text, CHOICES, source="cfg.json")
    assert expected in str(caught.value)


def test_load_config_logs_each_problem_and_never_raises(tmp_path, caplog):
    path = tmp_path / "preload_config.json"
    path.write_text("{broken")
    with caplog.at_level(logging.ERROR, logger="memkit.config"):
        config = load_config(path, CHOICES)
    assert config.entries == []
    assert len(caplog.records) == 1
    assert str(path) in caplog.records[0].getMessage()
    missing = load_config(tmp_path / "nope.json", CHOICES)
    assert "cannot be read" in missing.problems[0]


def test_config_location_order(tmp_path, monkeypatch):
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert locate_config(str(tmp_path)) == PACKAGE_CONFIG
    user_config = tmp_path / "memkit" / "preload_config.json"
    user_config.parent.mkdir()
    user_config.write_text("{}")
    assert locate_config(str(tmp_path)) == user_config
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "env.json"))
    assert locate_config(str(tmp_path)) == tmp_path / "env.json"


@pytest.mark.parametrize("name", ["a.safetensors", "sub/dir/a.safetensors", "sub\\a.safetensors", "a..b.safetensors"])
def test_names_inside_model_folders_are_accepted(name):
    assert check_model_name(name) == name


@pytest.mark.parametrize("name", ["", " ", "../a", "sub/../../a", "/abs/a", "C:\\a", "\\\\server\\share\\a"])
def test_names_that_leave_model_folders_are_rejected(name):
    with pytest.raises(ValueError, match=r"\S"):
        check_model_name(name)


def test_three_text_encoders_cannot_ask_for_a_device():
    config = parse({"text_encoders": [{"clip_names": ["l.safetensors", "g.safetensors", "t5.safetensors"],
                                       "type": "stable_diffusion", "device": "cpu", "cache_key": "sd3"}]})
    (problem,) = config.problems
    assert problem.startswith("cfg.json: models.text_encoders[0] (cache_key 'sd3'): field 'device': three text "
                              "encoders load through ComfyUI's TripleCLIPLoader, which has no device input")


WARMUP_API = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}


@pytest.mark.parametrize(("content", "reason"), [
    (None, "cannot read"),
    ("{nope", "is not valid JSON (line 1"),
    (json.dumps({"nodes": [], "links": []}), "is a UI-format workflow (as the page saves it); save it with "
                                             "'Export (API)' instead"),
    (json.dumps({"1": {"inputs": {}}}), "is not an API-format workflow"),
    (json.dumps([1, 2]), "is not an API-format workflow"),
])
def test_a_bad_warmup_workflow_is_one_problem_naming_the_field_and_the_rest_still_loads(tmp_path, content, reason):
    if content is not None:
        (tmp_path / "warmup.json").write_text(content)
    path = tmp_path / "preload_config.json"
    path.write_text(json.dumps({"settings": {"warmup_workflow": "warmup.json"},
                                "models": {"vaes": [{"vae_name": "ae.safetensors"}]}}))
    config = load_config(path, CHOICES)
    (problem,) = config.problems
    assert problem.startswith(f"{path}: field 'settings.warmup_workflow': ")
    assert reason in problem
    assert problem.endswith("; no warm-up")
    assert config.warmup_prompt is None
    assert len(config.enabled_entries()) == 1


@pytest.mark.parametrize("wrapped", [False, True], ids=["api", "prompt-body"])
def test_a_warmup_workflow_is_read_relative_to_the_config(tmp_path, wrapped):
    (tmp_path / "warm").mkdir()
    body = {"prompt": WARMUP_API} if wrapped else WARMUP_API
    (tmp_path / "warm" / "w.json").write_text(json.dumps(body))
    path = tmp_path / "preload_config.json"
    path.write_text(json.dumps({"settings": {"warmup_workflow": "warm/w.json"}}))
    config = load_config(path, CHOICES)
    assert config.problems == []
    assert config.warmup_prompt == WARMUP_API
