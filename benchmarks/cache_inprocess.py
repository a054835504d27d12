"""One in-process measurement of checkpoint loading, printed as JSON (run by benchmarks/run.py).

Each call runs in a fresh process so "first load in a process" means exactly that.
Usage: cache_inprocess.py core-cold|core-fresh|core-warm|memkit-hit CHECKPOINT_PATH

``core-fresh`` and ``memkit-hit``'s miss are the like-for-like pair: the first load in a fresh
process with the file already in the page cache.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support.memory import drop_from_page_cache  # noqa: E402


def read_into_page_cache(path: str) -> None:
    with open(path, "rb") as handle:
        while handle.read(1 << 24):
            pass


def main() -> None:
    mode, checkpoint = sys.argv[1], sys.argv[2]
    from support.comfy_host import import_comfy

    import_comfy()
    import folder_paths
    import nodes
    import psutil

    folder_paths.add_model_folder_path("checkpoints", str(Path(checkpoint).parent))
    name = Path(checkpoint).name
    result: dict = {"mode": mode}
    if mode == "core-cold":
        drop_from_page_cache(checkpoint)
        started = time.perf_counter()
        nodes.CheckpointLoaderSimple().load_checkpoint(name)
        result["seconds"] = time.perf_counter() - started
    elif mode == "core-fresh":
        read_into_page_cache(checkpoint)
        started = time.perf_counter()
        nodes.CheckpointLoaderSimple().load_checkpoint(name)
        result["seconds"] = time.perf_counter() - started
    elif mode == "core-warm":
        nodes.CheckpointLoaderSimple().load_checkpoint(name)  # file now in the page cache
        times = []
        for _ in range(3):
            started = time.perf_counter()
            nodes.CheckpointLoaderSimple().load_checkpoint(name)
            times.append(time.perf_counter() - started)
        result["seconds"] = statistics.median(times)
    else:
        import conftest  # noqa: F401  (imports this repository as comfyui_memkit)

        from comfyui_memkit.model_cache.config import PreloadConfig
        from comfyui_memkit.model_cache.service import reset_service
        from comfyui_memkit.nodes.cached_loaders import MemKitCheckpointLoader

        service = reset_service(PreloadConfig(path=None))
        read_into_page_cache(checkpoint)
        started = time.perf_counter()
        MemKitCheckpointLoader.execute(name)
        result["miss_seconds"] = time.perf_counter() - started
        times = []
        for _ in range(200):
            started = time.perf_counter()
            MemKitCheckpointLoader.fingerprint_inputs(name)
            MemKitCheckpointLoader.execute(name)
            times.append(time.perf_counter() - started)
        result["seconds"] = statistics.median(times)
        result["p95_seconds"] = sorted(times)[int(len(times) * 0.95)]
        result["loads"] = service.cache.loads
        result["cached_bytes"] = service.cache.used_bytes
    result["rss_bytes"] = psutil.Process().memory_info().rss
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
