"""One tiled/untiled decode in a fresh process (so its peak RSS is its own); prints one JSON line.

Usage: vae_worker.py VAE_FILE SHAPE METHOD OUT.pt
  SHAPE   comma-separated latent shape, e.g. 1,4,80,80 or 1,16,3,24,40
  METHOD  untiled | comfy:TILE:OVERLAP | memkit-PRECISION:TILE_X:TILE_Y:STRIDE_X:STRIDE_Y | memkit-PRECISION:auto
          (PRECISION: fast or precise). MemKit rows also report, from a second (untimed) decode, the
          peak of what is alive on the decode device: tensors the decode allocates, less the tiles
          parked on the offload device (``support.live_tensors``).
"""

from __future__ import annotations

import ctypes
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from support.comfy_host import import_comfy  # noqa: E402
from support.latents import structured_latent  # noqa: E402


def rss_now_and_peak() -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def reset_peak_rss() -> None:
    """Give freed heap back to the OS (glibc keeps it otherwise, and a decode that reuses it would
    not show in RSS), then reset VmHWM (Linux: write 5 to clear_refs): the peak below is the decode's."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def main() -> None:
    vae_file, shape_text, method, out_file = sys.argv[1:5]
    import_comfy()
    import comfy.sd
    import comfy.utils
    import conftest  # noqa: F401  (imports this repository as comfyui_memkit)
    import nodes
    import torch

    from comfyui_memkit.vae_tiling.decode import TiledVAEDecoder
    from comfyui_memkit.vae_tiling.plan import TileSettings

    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(vae_file))
    shape = tuple(int(n) for n in shape_text.split(","))
    latent = structured_latent(shape, seed=20261123)
    # first-call costs (kernels, allocator) out of the timing: one small frame, so it leaves little behind
    warm = structured_latent((*shape[:2], *(1 for _ in shape[2:-2]), 8, 8), seed=1)
    vae.decode(warm)
    plan_text = method
    kind, _, rest = method.partition(":")
    if kind.startswith("memkit"):
        decoder = TiledVAEDecoder(vae, kind.partition("-")[2] or "precise")
        settings = None if rest == "auto" else TileSettings(*(int(n) for n in rest.split(":")))
        plan = decoder.plan(shape, settings, free_memory=decoder.prepare(shape))
        plan_text = plan.describe()
    cuda = vae.device.type == "cuda"
    if cuda:  # the decode's own peak on the GPU (the loaded VAE is in the baseline)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_baseline = torch.cuda.memory_allocated()
    reset_peak_rss()
    baseline, _ = rss_now_and_peak()
    started = time.perf_counter()
    with torch.inference_mode():
        if kind == "untiled":
            images = nodes.VAEDecode().decode(vae, {"samples": latent})[0]
        elif kind == "comfy":
            tile, overlap = (int(n) for n in rest.split(":"))
            images = nodes.VAEDecodeTiled().decode(vae, {"samples": latent}, tile, overlap)[0]
        else:
            images = decoder.decode(latent, plan)
            if images.ndim == 5:
                images = images.reshape(-1, *images.shape[-3:])
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    _, peak = rss_now_and_peak()
    torch.save(images.cpu(), out_file)
    result = {"seconds": seconds, "baseline_rss": baseline, "peak_rss": peak, "plan": plan_text,
              "shape": list(images.shape)}
    if cuda:
        result["cuda_peak_allocated"] = torch.cuda.max_memory_allocated() - cuda_baseline
    if kind.startswith("memkit") and "--working-set" in sys.argv:
        from support.live_tensors import LiveTensors

        del images
        with torch.inference_mode(), LiveTensors(excluded=lambda: decoder.ledger.parked) as live:
            decoder.decode(latent, plan)
        result.update(device_working_set=live.peak, parked_peak=decoder.ledger.peak)
    if kind == "untiled" and "--working-set" in sys.argv:
        from support.live_tensors import LiveTensors

        with torch.inference_mode(), LiveTensors() as live:
            nodes.VAEDecode().decode(vae, {"samples": latent})
        result.update(device_working_set=live.peak)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
