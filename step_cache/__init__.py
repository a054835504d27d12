"""Step cache: skip diffusion steps by reusing the last computed output-minus-input (EasyCache's
rule or a fixed interval), with the cache on a chosen device and dtype, within a budget, and freed
when every run ends.

``rule`` (when to skip), ``store`` (where the diffs live) and ``report`` (the last runs, for
/memkit/status) import no ComfyUI; ``hooks`` wires them into a run through ComfyUI's wrapper API.
"""

from .settings import StepCacheSettings

__all__ = ["StepCacheSettings"]
