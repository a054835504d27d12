"""The step cache's options, as the node takes them (one frozen value per patched model)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .rule import MODES
from .store import CACHE_DEVICES, STORE_DTYPES

LEVELS = ("auto", "apply_model")


@dataclass(frozen=True)
class StepCacheSettings:
    mode: str = "easycache"
    threshold: float = 0.2          # EasyCache's reuse_threshold; 0 turns the step cache off in every mode
    cache_interval: int = 3         # interval mode: compute one step in this many
    max_consecutive_skips: int = 0  # 0: no limit
    start_percent: float = 0.15
    end_percent: float = 0.95
    cache_device: str = "auto"
    store_dtype: str = "same"
    budget_mb: float = 0.0          # per device; 0: no limit
    # where to cache: "auto" (the diffusion model's DIFFUSION_MODEL wrapper where the family calls it, else
    # apply_model) or "apply_model" (always; for models whose DIFFUSION_MODEL wrappers clash with another pack's)
    level: str = "auto"

    @property
    def enabled(self) -> bool:
        """Whether this would ever skip a step (if not, the node hands the model back unchanged)."""
        return self.threshold > 0 and (self.mode != "interval" or self.cache_interval > 1)

    @property
    def budget_bytes(self) -> int:
        return int(self.budget_mb * 2**20)

    def problem(self) -> str | None:
        """What is wrong with these settings, naming the input; None when they are usable."""
        if self.mode not in MODES:
            return f"mode {self.mode!r} is not one of {', '.join(MODES)}"
        if self.cache_device not in CACHE_DEVICES:
            return f"cache_device {self.cache_device!r} is not one of {', '.join(CACHE_DEVICES)}"
        if self.store_dtype not in STORE_DTYPES:
            return f"store_dtype {self.store_dtype!r} is not one of {', '.join(STORE_DTYPES)}"
        if self.level not in LEVELS:
            return f"level {self.level!r} is not one of {', '.join(LEVELS)}"
        if self.threshold < 0:
            return f"threshold must be 0 or more, not {self.threshold}"
        if self.cache_interval < 1:
            return f"cache_interval must be 1 or more, not {self.cache_interval}"
        if self.max_consecutive_skips < 0:
            return f"max_consecutive_skips must be 0 (no limit) or more, not {self.max_consecutive_skips}"
        if not 0.0 <= self.start_percent <= 1.0 or not 0.0 <= self.end_percent <= 1.0:
            return "start_percent and end_percent must be between 0 and 1"
        if self.start_percent > self.end_percent:
            return (f"start_percent ({self.start_percent}) is after end_percent ({self.end_percent}): "
                    "no step would be cached")
        if self.budget_mb < 0:
            return f"budget_mb must be 0 (no limit) or more, not {self.budget_mb}"
        return None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
