"""MemKitStepCache: skip diffusion steps by reusing cached output-minus-input (logic in step_cache/).

The node runs before the sampler, so its own output cannot say what a run did: after each run the
sampler's wrapper puts the run's report on the node as its text (ComfyUI's progress text, as core's
GetImageSize shows sizes), sent to the page that queued the prompt. The same reports are in
/memkit/status and the panel.
"""

from __future__ import annotations

import functools
from typing import Any

from comfy_api.latest import io

from ..step_cache import report
from ..step_cache.hooks import patch
from ..step_cache.rule import MODES
from ..step_cache.settings import StepCacheSettings
from ..step_cache.store import CACHE_DEVICES, STORE_DTYPES

DEFAULTS = StepCacheSettings()


def show_on_node(node_id: str, result: dict[str, Any]) -> None:
    """The run's summary as the node's text, on the page that queued the prompt (nothing without a server)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return
    server.send_progress_text(report.summary(result), node_id, getattr(server, "client_id", None))


class MemKitStepCache(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MemKitStepCache",
            display_name="Step Cache (MemKit)",
            category="memkit/sampling",
            description="Skips diffusion steps whose output can be predicted from the last computed one (core "
                        "EasyCache's rule, or a fixed interval), for cond and uncond together. The cache lives on "
                        "the device and in the dtype you choose, within a budget, and is freed when each run ends, "
                        "even on error: nothing stays on the (cached) model. Works with models that call "
                        "DIFFUSION_MODEL wrappers (Wan, Flux, HunyuanVideo, LTXV, SD/SDXL UNets, ...) and, through "
                        "apply_model, with eps and flow models that do not (SD3). After each run the node shows the "
                        "steps it skipped and the memory it held (also in the MemKit panel and /memkit/status).",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to add the step cache to (it is cloned)."),
                io.Combo.Input("mode", options=list(MODES), default=DEFAULTS.mode,
                               tooltip="easycache: skip while EasyCache's accumulated relative change of the input "
                                       "stays under the threshold (on the same model and seed it skips the steps "
                                       "core's EasyCache skips). interval: compute one step in cache_interval "
                                       "(DeepCache-style)."),
                io.Float.Input("threshold", default=DEFAULTS.threshold, min=0.0, max=100.0, step=0.01,
                               tooltip="easycache: EasyCache's reuse_threshold; higher skips more. 0 turns the step "
                                       "cache off in every mode (the model is passed through unchanged)."),
                io.Int.Input("cache_interval", default=DEFAULTS.cache_interval, min=1, max=10,
                             tooltip="interval mode: compute one step, reuse it for the next cache_interval - 1 "
                                     "(1: never skip)."),
                io.Int.Input("max_consecutive_skips", default=DEFAULTS.max_consecutive_skips, min=0, max=100,
                             tooltip="Compute a step after this many skipped in a row (0: no limit)."),
                io.Float.Input("start_percent", default=DEFAULTS.start_percent, min=0.0, max=1.0, step=0.01,
                               tooltip="Where in the schedule skipping may start (as core's EasyCache)."),
                io.Float.Input("end_percent", default=DEFAULTS.end_percent, min=0.0, max=1.0, step=0.01,
                               tooltip="Where it stops: later steps are always computed."),
                io.Combo.Input("cache_device", options=list(CACHE_DEVICES), default=DEFAULTS.cache_device,
                               tooltip="Where the cached diffs live. compute: the GPU (fastest). offload: the offload "
                                       "device (CPU RAM; pinned on CUDA, copied back asynchronously). auto: the GPU "
                                       "while the cache stays under 10 % of its free memory, else the offload device."),
                io.Combo.Input("store_dtype", options=list(STORE_DTYPES), default=DEFAULTS.store_dtype,
                               tooltip="Storage dtype of the diffs. same: exact. bf16/fp16: half the bytes of fp32. "
                                       "fp8: float8_e4m3fn with a scale per channel (a quarter of fp32, about 6 % "
                                       "relative error)."),
                io.Float.Input("budget_mb", default=DEFAULTS.budget_mb, min=0.0, max=1048576.0, step=1.0,
                               tooltip="Most MB of diffs per device (0: no limit). Over it a diff spills to the "
                                       "offload device; if that is over too, the step is computed instead."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the step cache (the same model when threshold is 0).")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, start_percent: float, end_percent: float) -> bool | str:
        # the settings' own check, so the node and the settings never disagree on what is usable
        return StepCacheSettings(start_percent=start_percent, end_percent=end_percent).problem() or True

    @classmethod
    def execute(cls, model, mode: str, threshold: float, cache_interval: int, max_consecutive_skips: int,
                start_percent: float, end_percent: float, cache_device: str, store_dtype: str,
                budget_mb: float) -> io.NodeOutput:
        settings = StepCacheSettings(mode, threshold, cache_interval, max_consecutive_skips, start_percent,
                                     end_percent, cache_device, store_dtype, budget_mb)
        node_id = getattr(cls.hidden, "unique_id", None)  # None when called outside a prompt
        on_finish = functools.partial(show_on_node, str(node_id)) if node_id is not None else None
        return io.NodeOutput(patch(model, settings, on_finish))


NODES = [MemKitStepCache]
