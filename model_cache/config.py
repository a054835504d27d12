"""preload_config.json: schema, location and validation.

Validation is per entry: a broken entry is reported in one log line that names the file, the
entry and the field, and is skipped; the others still load and ComfyUI still starts. Choices
that ComfyUI owns (clip types, weight dtypes, devices) are passed in from the running host, never
copied here, so they cannot go stale.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from .node_inputs import canonical_inputs
from .recipe import ModelKind

log = logging.getLogger("memkit.config")

CONFIG_ENV = "MEMKIT_PRELOAD_CONFIG"
CONFIG_FILE_NAME = "preload_config.json"
PACKAGE_CONFIG = Path(__file__).resolve().parent.parent / CONFIG_FILE_NAME


@dataclass(frozen=True)
class HostChoices:
    """The option lists of the running ComfyUI (see ``service.host_choices``)."""

    clip_types: tuple[str, ...]
    weight_dtypes: tuple[str, ...]
    devices: tuple[str, ...] = ("default", "cpu")


class ConfigError(ValueError):
    """The config file as a whole cannot be used (unreadable, not JSON, wrong top level)."""


def check_model_name(name: str) -> str:
    """Reject names that could leave ComfyUI's model folders (absolute paths, ``..``)."""
    if not name or not name.strip():
        raise ValueError("must be a non-empty file name")
    for flavour in (PurePosixPath(name), PureWindowsPath(name)):
        if flavour.is_absolute() or flavour.anchor:
            raise ValueError(f"{name!r} is an absolute path; give a name inside ComfyUI's model folders")
        if ".." in flavour.parts:
            raise ValueError(f"{name!r} leaves the model folder ('..'); give a name inside ComfyUI's model folders")
    return name


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: ClassVar[ModelKind]

    enabled: bool = True
    cache_key: str = ""
    description: str = ""
    pinned: bool = True

    def file_names(self) -> list[str]:
        raise NotImplementedError

    def load_options(self) -> dict[str, str]:
        return {}


class CheckpointEntry(_Entry):
    kind: ClassVar[ModelKind] = ModelKind.CHECKPOINT
    name: str

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_model_name(value)

    def file_names(self) -> list[str]:
        return [self.name]


class TextEncoderEntry(_Entry):
    kind: ClassVar[ModelKind] = ModelKind.TEXT_ENCODER
    clip_names: list[str] = Field(min_length=1, max_length=3)
    type: str = "stable_diffusion"
    device: str = "default"

    @field_validator("clip_names")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        return [check_model_name(v) for v in value]

    @field_validator("type")
    @classmethod
    def _type(cls, value: str, info: ValidationInfo) -> str:
        return _one_of(value, _choices(info).clip_types)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str, info: ValidationInfo) -> str:
        value = _one_of(value, _choices(info).devices)
        if value != "default" and len(info.data.get("clip_names") or ()) == 3:
            raise ValueError("three text encoders load through ComfyUI's TripleCLIPLoader, which has no device "
                             f"input; use 'default', not {value!r}")
        return value

    def file_names(self) -> list[str]:
        return list(self.clip_names)

    def load_options(self) -> dict[str, str]:
        return {"type": self.type, "device": self.device}


class DiffusionModelEntry(_Entry):
    kind: ClassVar[ModelKind] = ModelKind.DIFFUSION_MODEL
    model_name: str
    weight_dtype: str = "default"

    @field_validator("model_name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_model_name(value)

    @field_validator("weight_dtype")
    @classmethod
    def _dtype(cls, value: str, info: ValidationInfo) -> str:
        return _one_of(value, _choices(info).weight_dtypes)

    def file_names(self) -> list[str]:
        return [self.model_name]

    def load_options(self) -> dict[str, str]:
        return {"weight_dtype": self.weight_dtype}


class VAEEntry(_Entry):
    kind: ClassVar[ModelKind] = ModelKind.VAE
    vae_name: str

    @field_validator("vae_name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_model_name(value)

    def file_names(self) -> list[str]:
        return [self.vae_name]


WidgetValue = str | int | float | bool


class NodeEntry(_Entry):
    """Any other loader node (audio encoders, CLIP vision, upscalers, third-party loaders), called
    by its node id with these widget values. The node may come from a pack ComfyUI loads after
    MemKit, so the inputs are checked against its schema when it is loaded (on the executing
    thread), not here; a problem then fails the entry, naming the field."""

    kind: ClassVar[ModelKind] = ModelKind.NODE
    node: str = Field(min_length=1)
    inputs: dict[str, WidgetValue] = {}

    def file_names(self) -> list[str]:
        return []  # found among the inputs once the node's schema is known

    def load_options(self) -> dict[str, str]:
        return node_load_options(self.node, self.inputs)


def node_load_options(node_id: str, inputs: dict[str, object]) -> dict[str, str]:
    """How a node load is written into a recipe's options (and so into its cache key)."""
    return {"node": node_id, "inputs": canonical_inputs(inputs)}


ENTRY_TYPES: dict[str, type[_Entry]] = {
    entry_type.kind.section: entry_type
    for entry_type in (CheckpointEntry, TextEncoderEntry, DiffusionModelEntry, VAEEntry, NodeEntry)
}

PreloadEntry = CheckpointEntry | TextEncoderEntry | DiffusionModelEntry | VAEEntry | NodeEntry


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    preload_mode: Literal["background", "blocking", "off"] = "background"
    auto_gpu_load: bool = False
    verbose: bool = False
    ram_budget_gb: float | None = Field(default=None, gt=0)
    hash_contents: bool = False
    warmup_workflow: str | None = None
    conditioning_ram_gb: float = Field(default=1.0, ge=0)
    conditioning_disk_gb: float = Field(default=2.0, ge=0)


class _TopLevel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = 1
    description: str = ""
    settings: Settings = Settings()
    models: dict[Literal["checkpoints", "text_encoders", "diffusion_models", "vaes", "nodes"], list[Any]] = {}


@dataclass
class PreloadConfig:
    path: Path | None
    settings: Settings = field(default_factory=Settings)
    entries: list[PreloadEntry] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warmup_prompt: dict[str, Any] | None = None

    def enabled_entries(self) -> list[PreloadEntry]:
        return [e for e in self.entries if e.enabled]


def _choices(info: ValidationInfo) -> HostChoices:
    return (info.context or {})["choices"]


def _one_of(value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{value!r} is not one of: {', '.join(allowed)}")
    return value


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(entry)"
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"field '{where}': {message}")
    return "; ".join(parts)


def locate_config(user_directory: str | None) -> Path:
    """MEMKIT_PRELOAD_CONFIG > <user dir>/memkit/preload_config.json > the package's copy."""
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    if user_directory:
        user_config = Path(user_directory) / "memkit" / CONFIG_FILE_NAME
        if user_config.is_file():
            return user_config
    return PACKAGE_CONFIG


def parse_config(text: str, choices: HostChoices, source: str = CONFIG_FILE_NAME) -> PreloadConfig:
    """Validate a config; raises ConfigError only when nothing in it is usable."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno}, column {error.colno}"
        raise ConfigError(f"{source}: not valid JSON ({where}: {error.msg})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a JSON object")
    models_raw = raw.get("models", {})
    if not isinstance(models_raw, dict):
        raise ConfigError(f"{source}: field 'models' must be an object of lists")
    try:
        top = _TopLevel.model_validate({**raw, "models": {}})
    except ValidationError as error:
        raise ConfigError(f"{source}: {_describe(error)}") from None

    config = PreloadConfig(path=None, settings=top.settings)
    seen_keys: dict[str, str] = {}
    for section, items in models_raw.items():
        if section not in ENTRY_TYPES:
            config.problems.append(f"{source}: models.{section}: unknown section (expected one of "
                                   f"{', '.join(ENTRY_TYPES)}); skipped")
            continue
        if not isinstance(items, list):
            config.problems.append(f"{source}: models.{section}: must be a list; section skipped")
            continue
        for index, item in enumerate(items):
            where = f"{source}: models.{section}[{index}]"
            if isinstance(item, dict) and item.get("cache_key"):
                where += f" (cache_key {item['cache_key']!r})"
            if not isinstance(item, dict):
                config.problems.append(f"{where}: must be an object; entry skipped")
                continue
            try:
                entry = ENTRY_TYPES[section].model_validate(item, context={"choices": choices})
            except ValidationError as error:
                config.problems.append(f"{where}: {_describe(error)}; entry skipped")
                continue
            if entry.cache_key and entry.cache_key in seen_keys:
                config.problems.append(f"{where}: field 'cache_key': {entry.cache_key!r} is already used by "
                                       f"{seen_keys[entry.cache_key]}; entry skipped")
                continue
            if entry.cache_key:
                seen_keys[entry.cache_key] = f"models.{section}[{index}]"
            config.entries.append(entry)
    return config


class WorkflowError(ValueError):
    """A warm-up workflow that cannot be queued as it is."""


def read_api_workflow(path: Path) -> dict[str, Any]:
    """An API-format workflow (what ``POST /prompt`` takes) from a file, or a WorkflowError saying why not."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise WorkflowError(f"cannot read {path} ({error})") from None
    except json.JSONDecodeError as error:
        raise WorkflowError(f"{path} is not valid JSON (line {error.lineno}: {error.msg})") from None
    if isinstance(raw, dict) and isinstance(raw.get("prompt"), dict):
        raw = raw["prompt"]  # a saved /prompt body
    if isinstance(raw, dict) and isinstance(raw.get("nodes"), list):
        raise WorkflowError(f"{path} is a UI-format workflow (as the page saves it); save it with "
                            "'Export (API)' instead")
    if not isinstance(raw, dict) or not raw or not all(
            isinstance(node, dict) and isinstance(node.get("class_type"), str) and isinstance(node.get("inputs"), dict)
            for node in raw.values()):
        raise WorkflowError(f"{path} is not an API-format workflow (an object of nodes, each with class_type "
                            "and inputs)")
    return raw


def _attach_warmup(config: PreloadConfig, path: Path) -> None:
    name = config.settings.warmup_workflow
    if not name:
        return
    workflow = Path(name) if Path(name).is_absolute() else path.parent / name
    try:
        config.warmup_prompt = read_api_workflow(workflow)
    except WorkflowError as error:
        config.problems.append(f"{path}: field 'settings.warmup_workflow': {error}; no warm-up")


def load_config(path: Path, choices: HostChoices) -> PreloadConfig:
    """Read and validate ``path``; every problem is logged, never raised past this point."""
    try:
        text = path.read_text(encoding="utf-8")
        config = parse_config(text, choices, source=str(path))
    except (OSError, UnicodeDecodeError) as error:
        config = PreloadConfig(path=path, problems=[f"{path}: cannot be read ({error}); nothing preloaded"])
    except ConfigError as error:
        config = PreloadConfig(path=path, problems=[f"{error}; nothing preloaded"])
    config.path = path
    _attach_warmup(config, path)
    for problem in config.problems:
        log.error("[memkit] %s", problem)
    return config
