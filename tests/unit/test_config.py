import json
import logging

import pytest

from comfyui_memkit.model_cache.config import (
    CONFIG_ENV,
    MAX_GB,
    MAX_PROBLEMS,
    PACKAGE_CONFIG,
    ConfigError,
    HostChoices,
    Settings,
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
    ("[" * 100_000 + "]" * 100_000, "not usable JSON"),
    ('{"version": ' + "9" * 5000 + "}", "not usable JSON"),
])
def test_a_file_that_is_unusable_as_a_whole_raises_a_named_error(text, expected):
    with pytest.raises(ConfigError, match=r"cfg\.json") as caught:
        parse_config(text, CHOICES, source="cfg.json")
    assert expected in str(caught.value)
    assert len(str(caught.value)) <= 1100


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


# --- every value that validates works --------------------------------------------------------------

GOOD_ENTRY = {"checkpoints": [{"name": "good.safetensors", "cache_key": "good"}]}
NUMBERS = ("ram_budget_gb", "conditioning_ram_gb", "conditioning_disk_gb", "queue_wait_minutes")


def parse_text(text: str):
    return parse_config(text, CHOICES, source="cfg.json")


@pytest.mark.parametrize("setting", NUMBERS)
@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN", "1e300", "1" + "0" * 400, "-1"])
def test_a_number_that_would_not_work_is_one_problem_naming_the_setting(setting, literal):
    text = f'{{"settings": {{"preload_mode": "blocking", "{setting}": {literal}}}, "models": {json.dumps(GOOD_ENTRY)}}}'
    config = parse_text(text)
    (problem,) = config.problems
    assert problem.startswith(f"cfg.json: settings.{setting}: ")
    assert problem.endswith("; ignored, the default is used")
    if literal in ("Infinity", "-Infinity", "NaN"):
        assert "Input should be a finite number" in problem  # said as such, not as a bound that NaN fails
    assert getattr(config.settings, setting) == Settings.model_fields[setting].default
    assert config.settings.preload_mode == "blocking"
    assert [e.cache_key for e in config.entries] == ["good"]


def test_the_largest_numbers_accepted_still_work_where_they_are_used():
    config = parse({}, settings={"ram_budget_gb": MAX_GB, "conditioning_ram_gb": MAX_GB,
                                 "conditioning_disk_gb": MAX_GB, "queue_wait_minutes": 10080})
    assert config.problems == []
    settings = config.settings
    for gb in (settings.ram_budget_gb, settings.conditioning_ram_gb, settings.conditioning_disk_gb):
        assert int(gb * 2**30) == 2**50  # what the service does with them: exact, no overflow
    assert settings.queue_wait_minutes * 60 == 604800
    over = parse({}, settings={"ram_budget_gb": MAX_GB * 1.001, "queue_wait_minutes": 10081})
    assert [p.split(": ")[1] for p in over.problems] == ["settings.ram_budget_gb", "settings.queue_wait_minutes"]


def test_the_new_settings_and_their_defaults():
    assert Settings().refuse_over_budget is False
    assert Settings().queue_wait_minutes == 360
    config = parse({}, settings={"refuse_over_budget": True, "queue_wait_minutes": 0.5})
    assert config.problems == []
    assert (config.settings.refuse_over_budget, config.settings.queue_wait_minutes) == (True, 0.5)
    zero = parse({}, settings={"queue_wait_minutes": 0, "refuse_over_budget": "maybe"})
    assert [p.split(": ")[1] for p in zero.problems] == ["settings.queue_wait_minutes", "settings.refuse_over_budget"]
    assert (zero.settings.refuse_over_budget, zero.settings.queue_wait_minutes) == (False, 360)


def test_a_node_input_must_be_a_finite_number():
    config = parse_text('{"models": {"nodes": [{"node": "X", "inputs": {"scale": Infinity}}]}}')
    (problem,) = config.problems
    assert "models.nodes[0]: field 'inputs.scale" in problem
    assert config.entries == []


# --- a typo costs only itself ----------------------------------------------------------------------

def test_a_typo_in_settings_is_one_problem_and_everything_else_still_loads():
    config = parse(GOOD_ENTRY, settings={"ram_budjet_gb": 8, "preload_mode": "blocking", "hash_contents": True})
    assert config.problems == ["cfg.json: settings.ram_budjet_gb: unknown setting (did you mean 'ram_budget_gb'?); "
                               "ignored"]
    assert config.settings.ram_budget_gb is None  # keeps its default
    assert (config.settings.preload_mode, config.settings.hash_contents) == ("blocking", True)
    assert [e.cache_key for e in config.enabled_entries()] == ["good"]  # still preloaded


def test_a_bad_setting_value_keeps_that_settings_default_and_the_rest_applies():
    config = parse(GOOD_ENTRY, settings={"preload_mode": "eager", "ram_budget_gb": 8})
    (problem,) = config.problems
    assert problem == ("cfg.json: settings.preload_mode: Input should be 'background', 'blocking' or 'off' "
                       "(got 'eager'); ignored, the default is used")
    assert (config.settings.preload_mode, config.settings.ram_budget_gb) == ("background", 8)
    assert len(config.entries) == 1


@pytest.mark.parametrize(("top", "expected"), [
    ({"modles": {}}, "cfg.json: modles: unknown top-level field (did you mean 'models'?); ignored"),
    ({"ram_budget_gb": 3}, "cfg.json: ram_budget_gb: unknown top-level field (did you mean "
                           "'settings.ram_budget_gb'?); ignored"),
    ({"vaes": []}, "cfg.json: vaes: unknown top-level field (did you mean 'models.vaes'?); ignored"),
    ({"version": "one"}, "cfg.json: version: Input should be a valid integer"),
    ({"settings": [1]}, "cfg.json: settings: must be an object (got a list); every setting keeps its default"),
])
def test_a_top_level_problem_is_one_problem_and_the_rest_loads(top, expected):
    body = {"settings": {"verbose": True}, "models": GOOD_ENTRY, **top}
    config = parse_text(json.dumps(body))
    (problem,) = config.problems
    assert problem.startswith(expected)
    assert config.settings.verbose is ("settings" not in top)
    assert [e.cache_key for e in config.entries] == ["good"]


def test_models_that_are_not_an_object_give_no_entries_but_the_settings_apply():
    config = parse_text('{"settings": {"verbose": true}, "models": []}')
    assert config.problems == ["cfg.json: models: must be an object of lists (got a list); no model entries"]
    assert config.entries == []
    assert config.settings.verbose is True


# --- cache keys ------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["sd15, fp16", "wan 2.1 / t2v", "模型-1", "👨‍👩‍👧 family", "a" * 200, "x"])
def test_any_one_line_printable_text_is_a_cache_key(key):
    config = parse({"vaes": [{"vae_name": "ae.safetensors", "cache_key": key}]})
    assert config.problems == []
    assert config.entries[0].cache_key == key


@pytest.mark.parametrize(("literal", "reason"), [
    ('"a\\nb"', "contains the control character U+000A"),
    ('"a\\tb"', "contains the control character U+0009"),
    ('"a\\u0000b"', "contains the control character U+0000"),
    ('"a\\u2028b"', "contains the control character U+2028"),
    ('"a\\u0085b"', "contains the control character U+0085"),
    ('"a\\ud800b"', "contains the control character U+D800"),
    ('"' + "k" * 201 + '"', "is longer than 200 characters"),
    ('"   "', "is only whitespace"),
    ('" lead"', "has leading or trailing whitespace"),
    ('"trail "', "has leading or trailing whitespace"),
])
def test_a_cache_key_that_cannot_travel_or_compare_is_a_problem(literal, reason):
    config = parse_text('{"models": {"vaes": [{"vae_name": "ae.safetensors", "cache_key": ' + literal + "}]}}")
    (problem,) = config.problems
    assert "models.vaes[0]" in problem
    assert "field 'cache_key': " in problem
    assert reason in problem
    assert problem.endswith("; entry skipped")
    assert config.entries == []


# --- bounded messages ------------------------------------------------------------------------------

def test_a_huge_name_gives_a_bounded_problem():
    config = parse({"checkpoints": [{"name": "n" * 2**20, "cache_key": "k" * 2**20}]})
    (problem,) = config.problems
    assert len(problem) <= 1000
    assert "is longer than 4096 characters" in problem
    assert "(1048576 characters)" in problem


def test_thousands_of_problems_are_listed_up_to_a_cap_with_a_count():
    settings = {f"unknown_{i}": i for i in range(20_000)}
    config = parse({"vaes": [{"vae_name": "../x"}] * 10_000, **GOOD_ENTRY}, settings=settings)
    assert len(config.problems) == MAX_PROBLEMS + 1
    assert config.problems[-1] == f"cfg.json: and {30_000 - MAX_PROBLEMS} more problems"
    assert sum(len(p) for p in config.problems) < 60_000
    assert [e.cache_key for e in config.entries] == ["good"]


def test_an_entry_with_thousands_of_unknown_fields_and_huge_keys_is_one_bounded_problem():
    entry = {"vae_name": "ae.safetensors", **{f"extra_{i}": 1 for i in range(20_000)}, "K" * 2**20: 1}
    config = parse({"vaes": [entry]}, settings={"s" * 2**20: 1}, **{"t" * 2**20: 1})
    assert len(config.problems) == 3
    assert all(len(p) <= 1000 for p in config.problems)
    assert "and 19991 more" in config.problems[-1]


def test_check_model_name_is_bounded_and_refuses_what_no_file_can_be_called():
    with pytest.raises(ValueError, match="longer than 4096 characters") as caught:
        check_model_name("m" * 2**20)
    assert len(str(caught.value)) < 320
    assert str(caught.value).count("m") <= 201
    assert check_model_name("m" * 4096) == "m" * 4096
    with pytest.raises(ValueError, match="longer than 4096"):
        check_model_name("m" * 4097)
    with pytest.raises(ValueError, match="is an absolute path") as caught:
        check_model_name("/" + "a" * 4000)
    assert len(str(caught.value)) < 320


@pytest.mark.parametrize("name", ["a\x00.safetensors", "a\n.safetensors", "a\t.safetensors", "a\x7f", "a\ud800"])
def test_names_with_control_characters_are_rejected(name):
    with pytest.raises(ValueError, match="contains the control character U\\+"):
        check_model_name(name)


def test_a_warmup_workflow_path_with_a_nul_is_a_problem_not_a_crash(tmp_path):
    path = tmp_path / "preload_config.json"
    path.write_text(json.dumps({"settings": {"warmup_workflow": "w\x00.json"}, "models": GOOD_ENTRY}))
    config = load_config(path, CHOICES)
    (problem,) = config.problems
    assert "settings.warmup_workflow: contains the control character U+0000" in problem
    assert config.warmup_prompt is None
    assert len(config.entries) == 1


def test_shared_weights_is_off_by_default_and_true_is_short_for_enabled():
    assert parse(GOOD_ENTRY).settings.shared_weights.enabled is False
    config = parse(GOOD_ENTRY, settings={"shared_weights": True})
    assert config.problems == []
    assert config.settings.shared_weights.enabled is True
    assert config.settings.shared_weights.max_gb is None  # half of the host's RAM
    full = parse(GOOD_ENTRY, settings={"shared_weights": {"enabled": True, "max_gb": 40, "directory": "/dev/shm/x",
                                                          "wait_minutes": 2}}).settings.shared_weights
    assert (full.max_gb, full.directory, full.wait_minutes) == (40, "/dev/shm/x", 2)


@pytest.mark.parametrize(("value", "reason"), [
    ({"enabled": True, "dirctory": "/dev/shm/x"}, "dirctory"),
    ({"enabled": True, "directory": "shm/relative"}, "must be an absolute path"),
    ({"enabled": True, "max_gb": -1}, "greater than 0"),
    ({"enabled": "yes please"}, "enabled"),
])
def test_a_bad_shared_weights_setting_is_one_problem_and_sharing_stays_off(value, reason):
    config = parse(GOOD_ENTRY, settings={"shared_weights": value, "preload_mode": "blocking"})
    (problem,) = config.problems
    assert problem.startswith("cfg.json: settings.shared_weights: ")
    assert reason in problem
    assert config.settings.shared_weights.enabled is False
    assert config.settings.preload_mode == "blocking"
