"""preload_config.json: schema, location and validation.

A config problem costs only the part it is in; ComfyUI always starts. What still loads:

* nothing, when the file cannot be read, is not JSON (or nests too deeply to parse) or its top
  level is not an object (a ``ConfigError``; ``load_config`` turns it into one problem);
* otherwise everything that is valid. An unknown top-level field (``modles``) or setting
  (``ram_budjet_gb``) is ignored, with a did-you-mean; a setting with a bad value keeps its
  default; every other setting applies. A bad entry is skipped, an unknown section or one that is
  not a list is skipped, ``models`` that is not an object gives no entries; the other entries load.

Each problem is one line naming the file, the field and the reason, and is what status shows. It
quotes at most ~200 characters of any input (``bounded``), is cut to 1000, and a config gives at
most ``MAX_PROBLEMS`` of them plus one line counting the rest, whatever its size. Numbers are
finite and bounded so that every value that validates works wherever it is used (``int(gb * 2**30)``
included). Choices that ComfyUI owns (clip types, weight dtypes, devices) are passed in from the
running host, never copied here, so they cannot go stale.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .bounded import cut, shown
from .loads import Load
from .recipe import ModelKind

log = logging.getLogger("memkit.config")

CONFIG_ENV = "MEMKIT_PRELOAD_CONFIG"
CONFIG_FILE_NAME = "preload_config.json"
PACKAGE_CONFIG = Path(__file__).resolve().parent.parent / CONFIG_FILE_NAME

MAX_PROBLEMS = 50  # a config's problems listed one by one; the rest are counted in one more line
MAX_NAME_CHARS = 4096  # a model file name (PATH_MAX on Linux)
MAX_CACHE_KEY_CHARS = 200
MAX_GB = 1048576.0  # 1 PiB: above any machine's RAM or disk, small enough that ``int(gb * 2**30)`` is exact
MAX_QUEUE_WAIT_MINUTES = 10080.0  # a week

# Characters no name may hold: controls (NUL, tab, newline, DEL, C1 such as NEL), line and paragraph
# separators (a name must stay one line wherever it is shown or split) and lone surrogates (not
# encodable as UTF-8, so no answer or log line could carry them).
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


@dataclass(frozen=True)
class HostChoices:
    """The option lists of the running ComfyUI (see ``service.host_choices``)."""

    clip_types: tuple[str, ...]
    weight_dtypes: tuple[str, ...]
    devices: tuple[str, ...] = ("default", "cpu")


class ConfigError(ValueError):
    """The config file as a whole cannot be used (unreadable, not JSON, wrong top level)."""


def _forbidden_character(text: str) -> str | None:
    """The first character of ``text`` that no name may hold, as ``U+XXXX``; None when there is none."""
    for char in text:
        if unicodedata.category(char) in _FORBIDDEN_CATEGORIES:
            return f"U+{ord(char):04X}"
    return None


def check_model_name(name: str) -> str:
    """Reject names that could leave ComfyUI's model folders (absolute paths, ``..``) and names no
    file can have (over ``MAX_NAME_CHARS``, control characters); the message quotes ~200 characters."""
    if not name or not name.strip():
        raise ValueError("must be a non-empty file name")
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"{shown(name)} is longer than {MAX_NAME_CHARS} characters; give a file name as "
                         "ComfyUI's loaders list it")
    bad = _forbidden_character(name)
    if bad:
        raise ValueError(f"{shown(name)} contains the control character {bad}; give a file name as ComfyUI's "
                         "loaders list it")
    for flavour in (PurePosixPath(name), PureWindowsPath(name)):
        if flavour.is_absolute() or flavour.anchor:
            raise ValueError(f"{shown(name)} is an absolute path; give a name inside ComfyUI's model folders")
        if ".." in flavour.parts:
            raise ValueError(f"{shown(name)} leaves the model folder ('..'); give a name inside ComfyUI's "
                             "model folders")
    return name


def check_cache_key(key: str) -> str:
    """A cache key is any one-line printable text of at most ``MAX_CACHE_KEY_CHARS`` characters, without
    leading or trailing whitespace (keys are compared exactly); commas are fine (keys travel as lists).
    "" means the default key, made from the files and options."""
    if key == "":
        return key
    if len(key) > MAX_CACHE_KEY_CHARS:
        raise ValueError(f"{shown(key, 60)} is longer than {MAX_CACHE_KEY_CHARS} characters")
    bad = _forbidden_character(key)
    if bad:
        raise ValueError(f"{shown(key)} contains the control character {bad} (a cache key is one line of "
                         "printable text)")
    if not key.strip():
        raise ValueError("is only whitespace; give a name, or leave it out for the default key")
    if key != key.strip():
        raise ValueError(f"{shown(key)} has leading or trailing whitespace; remove it (cache keys are compared "
                         "exactly)")
    return key


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: ClassVar[ModelKind]

    enabled: bool = True
    cache_key: str = ""
    description: str = ""
    pinned: bool = True

    @field_validator("cache_key")
    @classmethod
    def _cache_key(cls, value: str) -> str:
        return check_cache_key(value)

    def file_names(self) -> list[str]:
        raise NotImplementedError

    def load_options(self) -> dict[str, str]:
        return {}

    def load(self) -> Load:
        """What this entry loads: the sections of the four kinds are sugar for ComfyUI's own loaders."""
        return Load.loader(self.kind, self.file_names(), self.load_options())


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


WidgetValue = str | int | Annotated[float, Field(allow_inf_nan=False)] | bool


class NodeEntry(_Entry):
    """Any other loader node (audio encoders, CLIP vision, upscalers, third-party loaders), called
    by its node id with these widget values. The node may come from a pack ComfyUI loads after
    MemKit, so the inputs are checked against its schema when it is loaded (on the executing
    thread), not here; a problem then fails the entry, naming the field."""

    kind: ClassVar[ModelKind] = ModelKind.NODE
    node: str = Field(min_length=1, max_length=200)
    inputs: dict[str, WidgetValue] = {}

    def file_names(self) -> list[str]:
        return []  # found among the inputs once the node's schema is known

    def load(self) -> Load:
        return Load.node(self.node, self.inputs)


ENTRY_TYPES: dict[str, type[_Entry]] = {
    entry_type.kind.section: entry_type
    for entry_type in (CheckpointEntry, TextEncoderEntry, DiffusionModelEntry, VAEEntry, NodeEntry)
}

PreloadEntry = CheckpointEntry | TextEncoderEntry | DiffusionModelEntry | VAEEntry | NodeEntry


def _gigabytes(default: float | None, minimum: str) -> Any:
    """A size in GB: finite, at least/above 0 (``minimum`` "ge" or "gt"), at most ``MAX_GB``."""
    return Field(default=default, allow_inf_nan=False, le=MAX_GB, **{minimum: 0})


class SharedWeights(BaseModel):
    """``settings.shared_weights``: one copy of each cached model per host, mapped by every ComfyUI
    process and kept in RAM (``/dev/shm``) across restarts, after every process has exited too.
    Opt-in; ``true`` is short for ``{"enabled": true}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    max_gb: float | None = _gigabytes(None, "gt")  # the store's cap; None: half of the host's RAM
    directory: str | None = Field(default=None, min_length=1, max_length=MAX_NAME_CHARS)  # None: /dev/shm/...
    wait_minutes: float = Field(default=10.0, ge=0, le=MAX_QUEUE_WAIT_MINUTES, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value

    @field_validator("directory")
    @classmethod
    def _directory(cls, value: str | None) -> str | None:
        if value is None:
            return value
        bad = _forbidden_character(value)
        if bad:
            raise ValueError(f"contains the control character {bad}")
        if not PurePosixPath(value).is_absolute():
            raise ValueError(f"must be an absolute path, not {shown(value, 60)}")
        return value


class Settings(BaseModel):
    """The ``settings`` section. Every number is finite and bounded (see ``MAX_GB``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preload_mode: Literal["background", "blocking", "off"] = "background"
    auto_gpu_load: bool = False
    verbose: bool = False
    ram_budget_gb: float | None = _gigabytes(None, "gt")
    refuse_over_budget: bool = False  # a load that would take the cache over the budget fails instead
    hash_contents: bool = False
    warmup_workflow: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    conditioning_ram_gb: float = _gigabytes(1.0, "ge")
    conditioning_disk_gb: float = _gigabytes(2.0, "ge")
    # how long MemKit's own queued prompts (preload, release, warm-up) may wait behind user prompts
    queue_wait_minutes: float = Field(default=360.0, gt=0, le=MAX_QUEUE_WAIT_MINUTES, allow_inf_nan=False)
    shared_weights: SharedWeights = Field(default_factory=SharedWeights)

    @field_validator("warmup_workflow")
    @classmethod
    def _workflow_path(cls, value: str | None) -> str | None:
        bad = value and _forbidden_character(value)
        if bad:
            raise ValueError(f"contains the control character {bad}")
        return value


class _Header(BaseModel):
    """The top level's own fields (``settings`` and ``models`` are read apart)."""

    model_config = ConfigDict(extra="forbid")

    version: int = 1
    description: str = ""


TOP_LEVEL_FIELDS = ("version", "description", "settings", "models")


@dataclass
class PreloadConfig:
    path: Path | None
    settings: Settings = field(default_factory=Settings)
    entries: list[PreloadEntry] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warmup_prompt: dict[str, Any] | None = None

    def enabled_entries(self) -> list[PreloadEntry]:
        return [e for e in self.entries if e.enabled]


class _Problems:
    """A config's problems: each prefixed with the file and cut to a bounded size; the first
    ``MAX_PROBLEMS`` kept, the rest counted."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.kept: list[str] = []
        self.more = 0

    def add(self, message: str) -> None:
        if len(self.kept) < MAX_PROBLEMS:
            self.kept.append(cut(f"{self.source}: {message}"))
        else:
            self.more += 1

    def listed(self) -> list[str]:
        return self.kept + ([f"{self.source}: and {self.more} more problems"] if self.more else [])


def _choices(info: ValidationInfo) -> HostChoices:
    return (info.context or {})["choices"]


def _one_of(value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(cut(f"{shown(value)} is not one of: {', '.join(allowed)}"))
    return value


def _label(part: object) -> str:
    """A key or field name inside a message: as it is when short and printable, else quoted and cut."""
    text = str(part)
    return text if len(text) <= 60 and text.isprintable() else shown(text, 60)


def _did_you_mean(name: object, known: Iterable[str]) -> str:
    if not isinstance(name, str) or len(name) > 100:
        return ""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _describe(error: ValidationError, skip_loc: int = 0, most: int = 10) -> str:
    """Pydantic's errors as ``field 'a.b': reason``, the first ``most`` of them; bounded."""
    items = error.errors()
    parts = []
    for item in items[:most]:
        where = ".".join(_label(p) for p in item["loc"][skip_loc:])
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"field '{where}': {message}" if where else message)
    if len(items) > most:
        parts.append(f"and {len(items) - most} more")
    return cut("; ".join(parts))


def _kind_of(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _fields(model: type[BaseModel], raw: dict[Any, Any], prefix: str, known: str,
            problems: _Problems) -> dict[str, Any]:
    """The valid fields of ``raw``, each validated alone: an unknown or bad one is one problem and is
    left out (so it keeps its default) while the others apply."""
    good: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in model.model_fields:
            problems.add(f"{prefix}{_label(key)}: unknown {known}{_did_you_mean(key, model.model_fields)}; ignored")
            continue
        try:
            good[key] = getattr(model.model_validate({key: value}), key)
        except ValidationError as error:
            problems.add(f"{prefix}{key}: {_describe(error, skip_loc=1)} (got {shown(value, 60)}); ignored, "
                         "the default is used")
    return good


def _settings(raw: object, problems: _Problems) -> Settings:
    if not isinstance(raw, dict):
        problems.add(f"settings: must be an object (got {_kind_of(raw)}); every setting keeps its default")
        return Settings()
    return Settings(**_fields(Settings, raw, "settings.", "setting", problems))


def locate_config(user_directory: str | None) -> Path:
    """MEMKIT_PRELOAD_CONFIG > <user dir>/memkit/preload_config.json > the package's copy."""
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    if user_directory:
        user_config = Path(user_directory) / "memkit" / CONFIG_FILE_NAME
        if user_config.is_file():
            return user_config
    return PACKAGE_CONFIG


def _top_level_hint(key: object) -> str:
    """A did-you-mean for an unknown top-level field, also for a setting or a section put at the top."""
    if key in Settings.model_fields:
        return f" (did you mean 'settings.{key}'?)"
    if key in ENTRY_TYPES:
        return f" (did you mean 'models.{key}'?)"
    return _did_you_mean(key, TOP_LEVEL_FIELDS)


def parse_config(text: str, choices: HostChoices, source: str = CONFIG_FILE_NAME) -> PreloadConfig:
    """Validate a config; raises ConfigError only when nothing in it is usable (see the module doc)."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno}, column {error.colno}"
        raise ConfigError(f"{source}: not valid JSON ({where}: {error.msg})") from None
    except (ValueError, RecursionError) as error:  # an integer of over 4300 digits; nesting too deep
        raise ConfigError(cut(f"{source}: not usable JSON ({error})")) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a JSON object")
    problems = _Problems(source)
    for key in raw:
        if key not in TOP_LEVEL_FIELDS:
            problems.add(f"{_label(key)}: unknown top-level field{_top_level_hint(key)}; ignored")
    _fields(_Header, {k: raw[k] for k in ("version", "description") if k in raw}, "", "field", problems)
    config = PreloadConfig(path=None, settings=_settings(raw.get("settings", {}), problems))
    models_raw = raw.get("models", {})
    if isinstance(models_raw, dict):
        _read_entries(models_raw, choices, config, problems)
    else:
        problems.add(f"models: must be an object of lists (got {_kind_of(models_raw)}); no model entries")
    config.problems = problems.listed()
    return config


def _read_entries(models_raw: dict[Any, Any], choices: HostChoices, config: PreloadConfig,
                  problems: _Problems) -> None:
    seen_keys: dict[str, str] = {}
    for section, items in models_raw.items():
        if section not in ENTRY_TYPES:
            problems.add(f"models.{_label(section)}: unknown section{_did_you_mean(section, ENTRY_TYPES)}; "
                         f"the sections are {', '.join(ENTRY_TYPES)}; skipped")
            continue
        if not isinstance(items, list):
            problems.add(f"models.{section}: must be a list (got {_kind_of(items)}); section skipped")
            continue
        for index, item in enumerate(items):
            where = f"models.{section}[{index}]"
            if not isinstance(item, dict):
                problems.add(f"{where}: must be an object (got {_kind_of(item)}); entry skipped")
                continue
            if isinstance(item.get("cache_key"), str) and item["cache_key"]:
                where += f" (cache_key {shown(item['cache_key'], 60)})"
            try:
                entry = ENTRY_TYPES[section].model_validate(item, context={"choices": choices})
            except ValidationError as error:
                problems.add(f"{where}: {_describe(error)}; entry skipped")
                continue
            if entry.cache_key and entry.cache_key in seen_keys:
                problems.add(f"{where}: field 'cache_key': {shown(entry.cache_key, 60)} is already used by "
                             f"{seen_keys[entry.cache_key]}; entry skipped")
                continue
            if entry.cache_key:
                seen_keys[entry.cache_key] = f"models.{section}[{index}]"
            config.entries.append(entry)


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
    except (ValueError, RecursionError) as error:
        raise WorkflowError(cut(f"{path} is not usable JSON ({error})")) from None
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
        config.problems.append(cut(f"{path}: field 'settings.warmup_workflow': {error}; no warm-up"))


def load_config(path: Path, choices: HostChoices) -> PreloadConfig:
    """Read and validate ``path``; every problem is logged, never raised past this point."""
    try:
        text = path.read_text(encoding="utf-8")
        config = parse_config(text, choices, source=str(path))
    except (OSError, UnicodeDecodeError) as error:
        config = PreloadConfig(path=path, problems=[cut(f"{path}: cannot be read ({error}); nothing preloaded")])
    except ConfigError as error:
        config = PreloadConfig(path=path, problems=[f"{error}; nothing preloaded"])
    config.path = path
    _attach_warmup(config, path)
    for problem in config.problems:
        log.error("[memkit] %s", problem)
    return config
