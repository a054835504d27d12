"""One in-process measurement of text encoding and its cache, printed as JSON (run by benchmarks/run.py).

A fresh process per mode, so "after a restart" and "first load" mean exactly that.
Usage: conditioning_inprocess.py load-cold|encode|restart USER_DIR TEXT_ENCODER_DIR NAME [NAME]

- load-cold: drop the encoder files from the page cache, time ComfyUI's CLIP loader once;
- encode: load (files now in the page cache; timed), then CLIPTextEncode (median of 5),
  MemKitTextEncode's miss and RAM hit (median of 200), MemKitTextEncodeByName's miss and RAM hit,
  leaving the conditionings on disk in USER_DIR;
- restart: a new process with the same USER_DIR: MemKitTextEncodeByName's disk hits (the encoder is
  never loaded; the first one in a process, then the median of five more), and MemKitTextEncode's
  disk hit (which needs the encoder loaded first).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TEXT = "a red fox running through fresh snow in a pine forest, morning light, cinematic, highly detailed"
OTHER_TEXTS = [f"{TEXT}, take {n}" for n in range(1, 6)]  # more cached prompts: disk hits after the first


def timed(call, repeat: int = 1) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    mode, user_dir, folder, *names = sys.argv[1:]
    sys.path.insert(0, str(REPO / "tests"))
    from support.comfy_host import import_comfy

    import_comfy()
    import conftest  # noqa: F401  (imports this repository as comfyui_memkit)
    import folder_paths
    import nodes
    from support.memory import drop_from_page_cache

    from comfyui_memkit.model_cache.config import PreloadConfig
    from comfyui_memkit.model_cache.loads import Load
    from comfyui_memkit.model_cache.recipe import ModelKind
    from comfyui_memkit.model_cache.service import reset_service
    from comfyui_memkit.nodes.conditioning import MemKitTextEncode, MemKitTextEncodeByName

    folder_paths.add_model_folder_path("text_encoders", folder)
    folder_paths.set_user_directory(user_dir)
    clip_type = "sdxl" if len(names) == 2 else "stable_diffusion"
    paths = [str(Path(folder) / n) for n in names]
    result: dict = {"mode": mode, "names": names, "type": clip_type,
                    "file_bytes": sum(Path(p).stat().st_size for p in paths)}

    def core_load():
        if len(names) == 2:
            return nodes.DualCLIPLoader().load_clip(names[0], names[1], clip_type)[0]
        return nodes.CLIPLoader().load_clip(names[0], clip_type)[0]

    by_name_inputs = {"clip_name1": names[0], "clip_name2": names[1] if len(names) == 2 else "none",
                      "type": clip_type, "text": TEXT}
    if mode == "load-cold":
        for path in paths:
            drop_from_page_cache(path)
        result["load_seconds"] = timed(core_load)
    elif mode == "encode":
        core_load()  # the files are in the page cache from here on
        result["load_warm_seconds"] = timed(core_load, 3)
        clip = core_load()
        encode = nodes.CLIPTextEncode()
        encode.encode(clip, TEXT)  # first-call costs
        result["clip_text_encode_seconds"] = timed(lambda: encode.encode(clip, TEXT), 5)
        service = reset_service(PreloadConfig(path=None))
        memkit_clip = service.checkout(Load.loader(ModelKind.TEXT_ENCODER, names,
                                                    {"type": clip_type, "device": "default"}))[0]
        result["memkit_miss_seconds"] = timed(lambda: MemKitTextEncode.execute(memkit_clip, TEXT))
        result["memkit_ram_hit_seconds"] = timed(lambda: MemKitTextEncode.execute(memkit_clip, TEXT), 200)
        service = reset_service(PreloadConfig(path=None))  # by name: the miss loads the encoder itself
        result["by_name_miss_seconds"] = timed(lambda: MemKitTextEncodeByName.execute(**by_name_inputs))
        result["by_name_ram_hit_seconds"] = timed(lambda: MemKitTextEncodeByName.execute(**by_name_inputs), 200)
        for text in OTHER_TEXTS:
            MemKitTextEncodeByName.execute(**{**by_name_inputs, "text": text})
        result["conditioning_bytes"] = service.conditioning.report()["disk_bytes"]
    else:
        from comfyui_memkit.model_cache.comfy_models import prompt_token

        prompt_token()  # looks up ComfyUI's server module once (a running ComfyUI has it imported already)
        service = reset_service(PreloadConfig(path=None))
        result["by_name_disk_hit_seconds"] = timed(lambda: MemKitTextEncodeByName.execute(**by_name_inputs))
        later = [timed(lambda t=text: MemKitTextEncodeByName.execute(**{**by_name_inputs, "text": t}))
                 for text in OTHER_TEXTS]
        result["by_name_later_disk_hit_seconds"] = statistics.median(later)
        result["by_name_disk_hit_loads"] = service.cache.loads
        started = time.perf_counter()
        memkit_clip = service.checkout(Load.loader(ModelKind.TEXT_ENCODER, names,
                                                    {"type": clip_type, "device": "default"}))[0]
        MemKitTextEncode.execute(memkit_clip, TEXT)
        result["memkit_disk_hit_with_load_seconds"] = time.perf_counter() - started
        result["report"] = service.conditioning.report()
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
