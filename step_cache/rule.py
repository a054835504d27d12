"""When to skip a diffusion step: the decisions only, no ComfyUI and no tensors of our own.

Two rules share one interface. ``ChangeRateRule`` is EasyCache's rule as ComfyUI implements it
(``comfy_extras/nodes_easycache.py``): after each computed step it learns k = (output change) /
(input change); before each step it adds k · (input change) / |previous output| to an
accumulated change and skips while that stays under the threshold. It needs two computed steps in
the window before it can skip. ``IntervalRule`` is DeepCache's fixed schedule: compute one step,
reuse it for ``interval - 1``. Both stop at ``max_consecutive_skips``.

The rule only sees the first cond's measurements (the "leader"); the other conds of the step
follow its decision (``StepGroup``), so cond and uncond are always skipped together.

Arithmetic is done with whatever scalars it is given, in the order core does it: given 0-d
tensors it reproduces core's float32 decisions exactly; floats work for tests.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol

MODES = ("easycache", "interval")


class Phase(enum.Enum):
    BEFORE = "before"  # sigma above start: compute, keep the diff, no decision
    ACTIVE = "active"  # inside the window: the rule decides
    AFTER = "after"    # sigma at or below end: compute, touch nothing (as core)


@dataclass(frozen=True)
class SigmaWindow:
    """start_percent/end_percent turned into sigmas by the model's ``percent_to_sigma``."""

    start_sigma: Any
    end_sigma: Any

    def phase(self, sigma: Any) -> Phase:
        # the same comparisons, in the same order, as EasyCacheHolder.is_past_end_timestep and
        # should_do_easycache (a tensor sigma compares in its own dtype, as there)
        if not bool(sigma > self.end_sigma):
            return Phase.AFTER
        return Phase.ACTIVE if bool(sigma <= self.start_sigma) else Phase.BEFORE


class StepRule(Protocol):
    uses_changes: bool  # whether it needs input/output change measurements

    def should_skip(self, input_change: Any, can_skip: bool) -> bool: ...

    def computed(self, input_change: Any, output_change: Any, output_norm: Any) -> None: ...


class _SkipLimit:
    def __init__(self, max_consecutive_skips: int) -> None:
        self.max_consecutive_skips = max_consecutive_skips
        self.consecutive = 0

    def allows_another(self) -> bool:
        return self.max_consecutive_skips <= 0 or self.consecutive < self.max_consecutive_skips


class ChangeRateRule(_SkipLimit):
    """EasyCache's accumulated relative change (see the module docstring)."""

    uses_changes = True

    def __init__(self, threshold: float, max_consecutive_skips: int = 0) -> None:
        super().__init__(max_consecutive_skips)
        self.threshold = threshold
        self.rate: Any = None          # k: output change / input change at the last computed step
        self.output_norm: Any = None   # mean |output| of the last computed step
        self.cumulative: Any = 0.0

    def should_skip(self, input_change: Any, can_skip: bool) -> bool:
        if self.output_norm is None or self.rate is None:
            return False
        self.cumulative += (self.rate * input_change) / self.output_norm
        if bool(self.cumulative < self.threshold) and can_skip and self.allows_another():
            self.consecutive += 1
            return True
        self.cumulative = 0.0
        return False

    def computed(self, input_change: Any, output_change: Any, output_norm: Any) -> None:
        if input_change is not None and output_change is not None:
            self.rate = output_change / input_change
        self.output_norm = output_norm
        self.consecutive = 0


class IntervalRule(_SkipLimit):
    """Compute one step, then reuse it for ``interval - 1`` steps (DeepCache's cache_interval)."""

    uses_changes = False

    def __init__(self, interval: int, max_consecutive_skips: int = 0) -> None:
        super().__init__(max_consecutive_skips)
        self.interval = interval
        self.has_computed = False

    def should_skip(self, input_change: Any, can_skip: bool) -> bool:
        if self.has_computed and self.consecutive < self.interval - 1 and can_skip and self.allows_another():
            self.consecutive += 1
            return True
        return False

    def computed(self, input_change: Any, output_change: Any, output_norm: Any) -> None:
        self.has_computed = True
        self.consecutive = 0


def make_rule(mode: str, threshold: float, cache_interval: int, max_consecutive_skips: int) -> StepRule:
    if mode == "easycache":
        return ChangeRateRule(threshold, max_consecutive_skips)
    if mode == "interval":
        return IntervalRule(cache_interval, max_consecutive_skips)
    raise ValueError(f"step cache mode {mode!r} is not one of {', '.join(MODES)}")


class StepGroup:
    """Which cond leads (the first one seen in the window, as in core) and whether the current
    step was skipped, so that the conds evaluated in later model calls of that step follow."""

    def __init__(self) -> None:
        self.leader: Any = None
        self.step_skipped = False

    def new_step(self) -> None:
        self.step_skipped = False

    def claim(self, keys: list) -> bool:
        """Whether this call carries the leader (the first call in the window appoints it)."""
        if self.leader is None:
            self.leader = keys[0]
        return self.leader in keys


def predicted_skips(active_steps: int, mode: str, cache_interval: int, max_consecutive_skips: int) -> int:
    """Skips the rule makes over ``active_steps`` steps when every accumulated change stays under
    the threshold (a huge threshold): the most it can skip. Used to check runs against the rule."""
    rule = make_rule(mode, float("inf"), cache_interval, max_consecutive_skips)
    skips, previous_input = 0, None
    for step in range(active_steps):
        change = None if previous_input is None else 1.0
        if rule.should_skip(change, can_skip=step > 0):
            skips += 1
            continue
        rule.computed(change, 1.0 if change is not None else None, 1.0)
        previous_input = step
    return skips
