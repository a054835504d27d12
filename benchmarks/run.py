"""`make bench`: measure, then write BENCHMARKS.md from every results/*.json.

Each benchmark writes its own results file (with the machine it ran on), so running one
benchmark refreshes its section and keeps the others.
Usage: run.py [cache] [serverless] [conditioning] [vae] [budget] [reliability] [step_cache] [user] [sharing]
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(REPO / "tests"))

from support.comfy_host import put_comfy_first_on_path  # noqa: E402
from support.comfy_server import ComfyServer  # noqa: E402
from support.metrics import psnr  # noqa: E402

put_comfy_first_on_path()

MODELS = Path(os.environ["MEMKIT_MODELS"])
HEAVY_LOCK = os.environ.get("MEMKIT_HEAVY_LOCK", "/tmp/memkit-heavy.lock")
CKPT_A, CKPT_B = "memkit-sd15.safetensors", "memkit-sd15-b.safetensors"


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    comfy_version = (Path(os.environ["MEMKIT_COMFYUI"]) / "comfyui_version.py").read_text().split('"')[1]
    return {"date": date.today().isoformat(), "cpu": cpu, "cores": psutil.cpu_count(),
            "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU run)",
            "python": platform.python_version(), "torch": torch.__version__, "comfyui": comfy_version}


def inprocess(mode: str) -> dict:
    out = subprocess.run([sys.executable, str(HERE / "cache_inprocess.py"), mode, str(MODELS / "checkpoints" / CKPT_A)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_prompt(loader: str, checkpoint: str, width: int) -> dict:
    """Load a checkpoint and decode a small latent: the load dominates; the width varies the work."""
    node = {"class_type": "MemKitCheckpointLoader", "inputs": {"ckpt_name": checkpoint}} if loader == "memkit" \
        else {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}}
    return {
        "1": node,
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": 64, "batch_size": 1}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }


def timed_prompt(server: ComfyServer, prompt: dict) -> float:
    started = time.perf_counter()
    server.run_prompt(prompt)
    return time.perf_counter() - started


def server_run(name: str, loader: str, extra_args: list[str], preload: list[str] | None, prompts: list[str],
               warmup: dict | None = None, during_first: Callable[[ComfyServer], dict] | None = None,
               **settings) -> dict:
    """Boot a server (with a preload of ``preload`` and a warm-up workflow if given), wait until
    /memkit/ready, time the prompts. Times are from the process start."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        config = None
        if preload is not None:
            config = base / "preload.json"
            if warmup is not None:
                (base / "warmup.json").write_text(json.dumps(warmup))
                settings["warmup_workflow"] = "warmup.json"
            config.write_text(json.dumps({"settings": {"preload_mode": "blocking", **settings},
                                          "models": {"checkpoints": [{"name": n} for n in preload]}}))
        server = ComfyServer(base, MODELS, config, extra_args)
        started = time.perf_counter()
        server.start()
        try:
            startup = time.perf_counter() - started
            server.wait_ready()
            ready = time.perf_counter() - started
            times = [timed_prompt(server, load_prompt(loader, ckpt, 64 + 8 * i)) for i, ckpt in enumerate(prompts)]
            extra = during_first(server) if during_first is not None else {}
            rss = psutil.Process(server.process.pid).memory_info().rss
            core_loads = server.log().count("model_type EPS")
            memkit = server.get("/memkit/status")["totals"]
        finally:
            server.stop()
    return {"name": name, "startup_seconds": startup, "ready_seconds": ready, "prompt_seconds": times,
            "rss_bytes": rss, "checkpoint_loads": core_loads, "memkit_loads": memkit["loads"], **extra}


CACHE_MODES = [("default (classic)", []), ("--cache-lru 8", ["--cache-lru", "8"]), ("--cache-ram", ["--cache-ram"]),
               ("--cache-none", ["--cache-none"])]


def bench_cache() -> dict:
    results = {"machine": machine(), "checkpoint": CKPT_A,
               "checkpoint_bytes": (MODELS / "checkpoints" / CKPT_A).stat().st_size}
    results["core_cold"] = inprocess("core-cold")
    results["core_warm"] = inprocess("core-warm")
    results["memkit_hit"] = inprocess("memkit-hit")
    abab = [CKPT_A, CKPT_B, CKPT_A, CKPT_B]
    results["first_prompt"] = [
        server_run("core loader, no preload", "core", [], None, [CKPT_A, CKPT_A]),
        server_run("MemKit, blocking preload, auto_gpu_load off", "memkit", [], [CKPT_A], [CKPT_A, CKPT_A]),
        server_run("MemKit, blocking preload, auto_gpu_load on", "memkit", [], [CKPT_A], [CKPT_A, CKPT_A],
                   auto_gpu_load=True),
        server_run("MemKit, background preload, auto_gpu_load on", "memkit", [], [CKPT_A], [CKPT_A, CKPT_A],
                   auto_gpu_load=True, preload_mode="background"),
    ]
    results["alternating"] = []
    for mode, args in CACHE_MODES:
        results["alternating"].append(server_run(f"CheckpointLoaderSimple, {mode}", "core", args, None, abab))
        results["alternating"].append(server_run(f"MemKitCheckpointLoader, {mode}", "memkit", args, None, abab))
    return results


def render_cache(r: dict) -> str:
    cold, warm, hit = r["core_cold"]["seconds"], r["core_warm"]["seconds"], r["memkit_hit"]
    lines = [
        "## Model cache (issues 3 and 8)",
        "",
        f"Checkpoint: seeded SD1.5-layout `{r['checkpoint']}` ({r['checkpoint_bytes'] / 2**30:.2f} GB fp16 on disk).",
        "",
        "| load | time | vs CheckpointLoaderSimple (warm) |",
        "|---|---|---|",
        f"| CheckpointLoaderSimple, first load in a fresh process, file evicted from page cache | {cold:.2f} s | "
        f"{cold / warm:.2f}× |",
        f"| CheckpointLoaderSimple, file in page cache (median of 3) | {warm:.2f} s | 1.00× |",
        f"| MemKitCheckpointLoader miss (first load, through ComfyUI) | {hit['miss_seconds']:.2f} s | "
        f"{hit['miss_seconds'] / warm:.2f}× |",
        f"| MemKitCheckpointLoader hit (fingerprint + execute, median of 200) | {hit['seconds'] * 1000:.3f} ms | "
        f"{hit['seconds'] / warm:.5f}× |",
        f"| MemKitCheckpointLoader hit, 95th percentile | {hit['p95_seconds'] * 1000:.3f} ms | |",
        "",
        f"The cached checkpoint holds {hit['cached_bytes'] / 2**30:.2f} GB of tensors in RAM (ComfyUI keeps the UNet "
        "in fp32 on a CPU-only machine).",
        "",
        "First prompt after start-up (load checkpoint + decode a 64×64 latent, through `/prompt`):",
        "",
        "| server | serving after | /memkit/ready after | first prompt | second prompt (warm) | first / warm |",
        "|---|---|---|---|---|---|",
    ]
    for run in r["first_prompt"]:
        first, second = run["prompt_seconds"]
        lines.append(f"| {run['name']} | {run['startup_seconds']:.1f} s | {run['ready_seconds']:.1f} s | "
                     f"{first:.2f} s | {second:.2f} s | {first / second:.1f}× |")
    base = r["alternating"][0]["prompt_seconds"]
    lines += [
        "",
        "Column B is the second checkpoint's first load while the first checkpoint is kept in RAM (by MemKit, and by "
        "core under `--cache-lru`/`--cache-ram`); the files are in the page cache.",
        "",
        "Prompts alternating checkpoints A, B, A, B through `/prompt` under each of ComfyUI's output caches (each "
        "prompt also decodes a latent of a new width, so only the loader's output can be reused):",
        "",
        "| server | A | B | A | B | total | vs default cache | checkpoint loads | server RSS after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in r["alternating"]:
        times = run["prompt_seconds"]
        loads = run["memkit_loads"] if run["name"].startswith("MemKit") else run["checkpoint_loads"]
        lines.append(f"| {run['name']} | " + " | ".join(f"{t:.2f} s" for t in times)
                     + f" | {sum(times):.2f} s | {sum(times) / sum(base):.2f}× | {loads} | "
                     f"{run['rss_bytes'] / 2**30:.1f} GB |")
    return "\n".join(lines)


def ready_latency_under_load(server: ComfyServer, threads: int = 4, requests: int = 250) -> dict:
    """GET /memkit/ready from several threads while a prompt (a 768x768 decode) runs."""
    prompt = load_prompt("memkit", CKPT_A, 768)
    prompt["2"]["inputs"]["height"] = 768
    status, answer = server.request("POST", "/prompt", {"prompt": prompt, "client_id": server.client_id})
    if status != 200:
        raise RuntimeError(f"the load prompt was refused: {answer}")
    latencies: list[float] = []

    def hammer() -> None:
        for _ in range(requests):
            started = time.perf_counter()
            server.request("GET", "/memkit/ready")
            latencies.append(time.perf_counter() - started)

    workers = [threading.Thread(target=hammer) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    busy = server.get("/queue")["queue_running"] != []
    server.wait_for(answer["prompt_id"])
    latencies.sort()
    return {"ready_latency": {"requests": len(latencies), "threads": threads, "prompt_running_at_end": busy,
                              "median": statistics.median(latencies), "p95": latencies[int(len(latencies) * 0.95)],
                              "p99": latencies[int(len(latencies) * 0.99)], "max": latencies[-1]}}


def bench_serverless() -> dict:
    warmup = load_prompt("memkit", CKPT_A, 48)  # the same path as the real prompts, smaller
    two = [CKPT_A, CKPT_A]
    return {"machine": machine(), "checkpoint": CKPT_A, "runs": [
        server_run("core ComfyUI, CheckpointLoaderSimple", "core", [], None, two),
        server_run("MemKit, background preload", "memkit", [], [CKPT_A], two, preload_mode="background"),
        server_run("MemKit, blocking preload", "memkit", [], [CKPT_A], two),
        server_run("MemKit, blocking preload + warm-up", "memkit", [], [CKPT_A], two, warmup=warmup,
                   during_first=ready_latency_under_load),
    ]}


def render_serverless(r: dict) -> str:
    lines = ["## Serverless cold start (issue 11)", "",
             f"Process start → first image through `/prompt` (load `{r['checkpoint']}` + decode a 64×64 latent; the "
             "first prompt is sent when `/memkit/ready` answers 200). Times from the process start; *first / second* "
             "compares the two prompts' own durations (goal ≤ 1.05).", "",
             "| server | serving | ready | first image | second image | first prompt | second prompt | "
             "first / second |", "|---|---|---|---|---|---|---|---|"]
    for run in r["runs"]:
        first, second = run["prompt_seconds"]
        lines.append(f"| {run['name']} | {run['startup_seconds']:.1f} s | {run['ready_seconds']:.1f} s | "
                     f"{run['ready_seconds'] + first:.1f} s | {run['ready_seconds'] + first + second:.1f} s | "
                     f"{first:.2f} s | {second:.2f} s | {first / second:.2f} |")
    latency = next(run["ready_latency"] for run in r["runs"] if "ready_latency" in run)
    lines += ["", f"`GET /memkit/ready` while a prompt runs ({latency['threads']} client threads, "
              f"{latency['requests']} requests; prompt still running at the end: {latency['prompt_running_at_end']}): "
              f"median {latency['median'] * 1000:.2f} ms, p95 {latency['p95'] * 1000:.2f} ms, p99 "
              f"{latency['p99'] * 1000:.2f} ms, max {latency['max'] * 1000:.2f} ms (goal < 5 ms).",
              "", "No GPU run: no GPU machine was available to this session, so the per-GB cost of `auto_gpu_load` "
              "after start is not measured."]
    return "\n".join(lines)


TEXT_ENCODERS = {"CLIP-L + CLIP-G (SDXL)": ["memkit-clip-l.safetensors", "memkit-clip-g.safetensors"],
                 "CLIP-L": ["memkit-clip-l.safetensors"]}
# Published sizes of Wan's text encoder files (Comfy-Org/Wan_2.1_ComfyUI_repackaged), for the estimate.
UMT5_FILES_GB = {"umt5_xxl_fp8_e4m3fn_scaled.safetensors": 6.74, "umt5_xxl_fp16.safetensors": 11.4}


def conditioning_worker(mode: str, user_dir: str, names: list[str]) -> dict:
    cmd = [sys.executable, str(HERE / "conditioning_inprocess.py"), mode, user_dir, str(MODELS / "text_encoders"),
           *names]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def sd15_text_prompt(by_name: bool) -> dict:
    """SD1.5 image (64×64, 4 steps) whose prompts are encoded by CLIPLoader + CLIPTextEncode or by name."""
    prompt = {
        "1": {"class_type": "MemKitCheckpointLoader", "inputs": {"ckpt_name": CKPT_A}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                    "latent_image": ["4", 0], "seed": 1, "steps": 4, "cfg": 6.0,
                                                    "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "bench"}},
    }
    texts = {"2": "a red fox in the snow, golden hour", "3": "blurry"}
    for node, text in texts.items():
        if by_name:
            prompt[node] = {"class_type": "MemKitTextEncodeByName", "inputs": {
                "clip_name1": "memkit-clip-l.safetensors", "type": "stable_diffusion", "text": text}}
        else:
            prompt[node] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["8", 0], "text": text}}
            prompt["8"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": "memkit-clip-l.safetensors",
                                                                   "type": "stable_diffusion"}}
    return prompt


def first_image_after_restart(base: Path, by_name: bool) -> dict:
    server = ComfyServer(base, MODELS, None, [])
    server.start()
    try:
        seconds = timed_prompt(server, sd15_text_prompt(by_name))
        status = server.get("/memkit/status")
    finally:
        server.stop()
    return {"seconds": seconds, "conditioning": status["conditioning"],
            "text_encoders_loaded": sum(1 for e in status["entries"] if e.get("kind") == "text_encoder")}


def bench_conditioning() -> dict:
    results = {"machine": machine(), "encoders": {}, "umt5_files_gb": UMT5_FILES_GB}
    for label, names in TEXT_ENCODERS.items():
        with tempfile.TemporaryDirectory() as user_dir:
            results["encoders"][label] = {
                "cold": conditioning_worker("load-cold", user_dir, names),
                "encode": conditioning_worker("encode", user_dir, names),
                "restart": conditioning_worker("restart", user_dir, names)}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        first_image_after_restart(base, by_name=True)  # an earlier run: the prompts' conditionings on disk
        results["first_image"] = {"by_name": first_image_after_restart(base, by_name=True),
                                  "clip_text_encode": first_image_after_restart(base, by_name=False)}
    return results


def render_conditioning(r: dict) -> str:
    lines = ["## Conditioning cache (issue 9)", "",
             "In process, a fresh process per column group (fp16 text encoders on the CPU, as ComfyUI loads them "
             "here). *Load* is ComfyUI's CLIPLoader / DualCLIPLoader.", "",
             "| text encoder | files | load, not in page cache | load, in page cache | CLIPTextEncode | "
             "MemKitTextEncode RAM hit | disk hit after a restart: MemKitTextEncode (needs the encoder: load + read) | "
             "MemKitTextEncodeByName (no load): first in the process / later |", "|---|---|---|---|---|---|---|---|"]
    per_gb = []
    for label, run in r["encoders"].items():
        cold, encode, restart = run["cold"], run["encode"], run["restart"]
        gigabytes = cold["file_bytes"] / 1e9
        per_gb.append((label, cold["load_seconds"] / gigabytes, encode["load_warm_seconds"] / gigabytes))
        lines.append(f"| {label} | {gigabytes:.2f} GB | {cold['load_seconds']:.2f} s | "
                     f"{encode['load_warm_seconds']:.2f} s | {encode['clip_text_encode_seconds'] * 1000:.0f} ms | "
                     f"{encode['memkit_ram_hit_seconds'] * 1000:.3f} ms | "
                     f"{restart['memkit_disk_hit_with_load_seconds']:.2f} s | "
                     f"{restart['by_name_disk_hit_seconds'] * 1000:.1f} ms / "
                     f"{restart['by_name_later_disk_hit_seconds'] * 1000:.1f} ms "
                     f"(encoder loads: {restart['by_name_disk_hit_loads']}) |")
    largest, cold_per_gb, warm_per_gb = max(per_gb, key=lambda row: r["encoders"][row[0]]["cold"]["file_bytes"])
    first = r["first_image"]
    lines += ["", f"Load cost measured on the largest encoder that fits a test here ({largest}): "
              f"{cold_per_gb:.2f} s/GB from disk, {warm_per_gb:.2f} s/GB from the page cache. At those rates "
              "(an estimate, not a measurement: umt5-xxl does not fit this machine's tests) Wan's text encoder "
              "would cost:", "", "| file (published size) | load from disk | load from page cache |", "|---|---|---|"]
    for name, gigabytes in r["umt5_files_gb"].items():
        lines.append(f"| `{name}` ({gigabytes} GB) | ≈ {gigabytes * cold_per_gb:.0f} s | "
                     f"≈ {gigabytes * warm_per_gb:.0f} s |")
    by_name, core = first["by_name"], first["clip_text_encode"]
    lines += ["", "Time to the first image for a repeated prompt, through `/prompt` on a freshly started server "
              "(SD1.5 checkpoint through MemKit, 64×64, 4 steps; the same prompts ran on an earlier server with the "
              "same user directory):", "",
              "| prompts encoded by | first prompt | text encoders loaded | conditioning disk hits |",
              "|---|---|---|---|",
              f"| CLIPLoader + CLIPTextEncode (CLIP-L) | {core['seconds']:.2f} s | 1 (core loader) | "
              f"{core['conditioning']['disk_hits']} |",
              f"| MemKitTextEncodeByName (CLIP-L) | {by_name['seconds']:.2f} s | {by_name['text_encoders_loaded']} | "
              f"{by_name['conditioning']['disk_hits']} |", "",
              f"Difference: {core['seconds'] - by_name['seconds']:+.2f} s, one run of each. What a by-name hit skips "
              "is the encoder's construction, load and encode."]
    return "\n".join(lines)


VAE_CASES = {
    # name: (vae file, latent shape, what it decodes to, methods, measure the device working set)
    "sd": ("memkit-sd-vae.safetensors", "1,4,80,80", "SD VAE, 640×640 image", "image", True),
    "flux": ("memkit-flux-vae.safetensors", "1,16,80,80", "SD3/Flux 16-channel VAE, 640×640 image", "image", True),
    "wan": ("memkit-wan21-vae.safetensors", "1,16,3,48,80", "Wan 2.1 VAE (dim 96, the real size), 640×384×9 frames",
            "video", False),
}
GPU_SEED_CASE = ("memkit-wan21-vae.safetensors", "1,16,16,90,160",
                 "Wan 2.1 VAE, 1280×720×61 frames (the seed case; CUDA only)", "video", False)
"""Run with the other cases only where CUDA is available: untiled it needs about 20 GB."""
VAE_METHODS = {
    "image": [
        ("VAEDecode (untiled)", "untiled"),
        ("VAEDecodeTiled, defaults (512 px, overlap 64)", "comfy:512:64"),
        ("VAEDecodeTiled, 256 px, overlap 64", "comfy:256:64"),
        ("MemKit fast, 256 px, overlap 64", "memkit-fast:256:256:192:192"),
        ("MemKit precise, 256 px, overlap 64", "memkit-precise:256:256:192:192"),
        ("MemKit precise, tile inputs' defaults (272 px, strides 144/128)", "memkit-precise:272:272:144:128"),
        ("MemKit, node defaults (auto, precise)", "memkit-precise:auto"),
    ],
    "video": [  # no GroupNorm in Wan's VAE: fast and precise are the same decode
        ("VAEDecode (untiled)", "untiled"),
        ("VAEDecodeTiled, defaults (512 px, overlap 64)", "comfy:512:64"),
        ("VAEDecodeTiled, 256 px, overlap 64", "comfy:256:64"),
        ("MemKit, 256 px, overlap 64 (fast = precise)", "memkit-precise:256:256:192:192"),
        ("MemKit, node defaults (auto)", "memkit-precise:auto"),
    ],
}
FRAME_SCALING = ("memkit-wan21-vae.safetensors", ["1,16,2,24,40", "1,16,5,24,40"])  # 5 vs 17 frames, 320×192
# Every VAE family with a seeded fixture: small latents, small tiles (TILE_X:TILE_Y:STRIDE_X:STRIDE_Y[:T:STRIDE_T])
FAMILY_CASES = [
    ("SD", "memkit-sd-vae.safetensors", "1,4,24,40", "128:128:96:96"),
    ("SDXL", "memkit-sdxl-vae.safetensors", "1,4,24,40", "128:128:96:96"),
    ("SD3/Flux (16 ch)", "memkit-flux-vae.safetensors", "1,16,24,40", "128:128:96:96"),
    ("Wan 2.1", "memkit-wan21-vae.safetensors", "1,16,3,16,24", "96:96:64:64"),
    ("Wan 2.2 (48 ch)", "memkit-wan22-vae.safetensors", "1,48,2,4,6", "64:64:32:32"),
    ("HunyuanVideo, spatial", "memkit-hunyuan-video-vae.safetensors", "1,16,2,8,12", "64:64:32:32"),
    ("HunyuanVideo, chunks in time", "memkit-hunyuan-video-vae.safetensors", "1,16,7,4,4", "64:64:32:32:16:12"),
    ("LTX-Video", "memkit-ltxv-vae.safetensors", "1,128,2,2,4", "96:96:64:64"),
    ("Mochi", "memkit-mochi-vae.safetensors", "1,12,2,4,8", "48:48:32:32"),
]


def vae_worker(vae: str, shape: str, method: str, out: Path, working_set: bool = False) -> dict:
    """One row in a fresh process, holding the machine's heavy-job lock so nothing else runs beside it."""
    cmd = [sys.executable, str(HERE / "vae_worker.py"), str(MODELS / "vae" / vae), shape, method, str(out),
           *(["--working-set"] if working_set else [])]
    with open(HEAVY_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        answer = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(answer.stdout.strip().splitlines()[-1])


def compare(reference, other) -> dict:
    return {"psnr": psnr(reference, other), "max_abs": (reference - other).abs().max().item()}


def bench_vae() -> dict:
    import torch

    results = {"machine": machine(), "cases": {}, "frame_scaling": []}
    cases = {**VAE_CASES, **({"wan-seed": GPU_SEED_CASE} if torch.cuda.is_available() else {})}
    with tempfile.TemporaryDirectory() as tmp:
        for case, (vae, shape, title, kind, working_set) in cases.items():
            rows = []
            for label, method in VAE_METHODS[kind]:
                out = Path(tmp) / f"{case}-{len(rows)}.pt"
                row = {"label": label, "method": method, **vae_worker(vae, shape, method, out, working_set)}
                reference = torch.load(Path(tmp) / f"{case}-0.pt")
                row.update(compare(reference, torch.load(out)))
                rows.append(row)
            results["cases"][case] = {"title": title, "latent": shape, "rows": rows}
        vae, shapes = FRAME_SCALING
        for shape in shapes:
            row = vae_worker(vae, shape, "untiled", Path(tmp) / "frames.pt")
            results["frame_scaling"].append({"latent": shape, **row})
        results["families"] = []
        for label, vae, shape, tiles in FAMILY_CASES:
            reference_file = Path(tmp) / "family-untiled.pt"
            untiled = vae_worker(vae, shape, "untiled", reference_file)
            row = {"label": label, "file": vae, "latent": shape, "untiled_seconds": untiled["seconds"]}
            for precision in ("fast", "precise"):
                out = Path(tmp) / f"family-{precision}.pt"
                tiled = vae_worker(vae, shape, f"memkit-{precision}:{tiles}", out)
                row[precision] = {"plan": tiled["plan"], "seconds": tiled["seconds"],
                                  **compare(torch.load(reference_file), torch.load(out))}
            results["families"].append(row)
    return results


def render_vae(r: dict) -> str:
    lines = ["## Tiled VAE decode (issues 4 and 12)", "",
             "Each row is a fresh process: load the VAE, decode a small latent once (first-call costs), reset the "
             "peak RSS (`malloc_trim`, then `/proc/self/clear_refs`), decode the seeded image-like latent once. "
             "*Decode memory* is the peak RSS during the decode minus the RSS before it (the process with ComfyUI and "
             "the VAE loaded); on this CPU-only machine it includes the tiles that `precise` parks on the offload "
             "device, which on a GPU machine is CPU RAM, not the GPU. *Device working set* (SD and Flux, from a second "
             "decode) is the peak of the tensor storage the decode has alive, less the parked tiles: what the decode "
             "device would hold. PSNR and max |diff| are against the untiled row of the same table (pixel values "
             "0–1).", ""]
    for case in r["cases"].values():
        rows = case["rows"]
        base = rows[0]
        base_mem = base["peak_rss"] - base["baseline_rss"]
        base_ws = base.get("device_working_set")
        if base.get("cuda_peak_allocated") is not None:  # a GPU run: torch's peak allocated on the GPU
            lines += [f"**{case['title']}** (latent {case['latent']}, on the GPU)", "",
                      "| decode | plan | time | vs untiled | peak allocated | vs untiled | PSNR | max abs diff |",
                      "|---|---|---|---|---|---|---|---|"]
            for row in rows:
                psnr = "identical" if row["psnr"] == float("inf") else f"{row['psnr']:.1f} dB"
                peak = row["cuda_peak_allocated"]
                lines.append(f"| {row['label']} | {row['plan']} | {row['seconds']:.1f} s | "
                             f"{row['seconds'] / base['seconds']:.2f}× | {peak / 2**30:.2f} GB | "
                             f"{peak / base['cuda_peak_allocated']:.0%} | {psnr} | {row['max_abs']:.3f} |")
            lines.append("")
            continue
        lines += [f"**{case['title']}** (latent {case['latent']}, fp32 on CPU)", "",
                  "| decode | plan | time | vs untiled | decode memory | vs untiled | device working set | "
                  "vs untiled | PSNR | max abs diff |", "|---|---|---|---|---|---|---|---|---|---|"]
        for row in rows:
            memory = row["peak_rss"] - row["baseline_rss"]
            psnr = "identical" if row["psnr"] == float("inf") else f"{row['psnr']:.1f} dB"
            ws = row.get("device_working_set")
            ws_text = f"{ws / 2**20:.0f} MB" if ws is not None else "—"
            ws_ratio = f"{ws / base_ws:.0%}" if ws is not None and base_ws else "—"
            lines.append(f"| {row['label']} | {row['plan']} | {row['seconds']:.1f} s | "
                         f"{row['seconds'] / base['seconds']:.2f}× | {memory / 2**20:.0f} MB | "
                         f"{memory / base_mem:.0%} | {ws_text} | {ws_ratio} | {psnr} | {row['max_abs']:.3f} |")
        lines.append("")
    if r.get("families"):
        lines += ["Every VAE family with a seeded fixture (small latents and tiles, so the tiles are mostly overlap: "
                  "a quality check of each family's path, not a speed or memory measurement):", "",
                  "| VAE | latent | plan (precise) | PSNR fast | PSNR precise |", "|---|---|---|---|---|"]
        for row in r["families"]:
            scores = [("identical" if row[p]["psnr"] == float("inf") else f"{row[p]['psnr']:.1f} dB")
                      for p in ("fast", "precise")]
            lines.append(f"| {row['label']} | {row['latent']} | {row['precise']['plan']} | {scores[0]} | "
                         f"{scores[1]} |")
        lines.append("")
    lines += ["Does the Wan 2.1 VAE's untiled peak depend on the frame count? (320×192, untiled VAEDecode)", "",
              "| latent | frames | time | decode memory | process peak RSS |", "|---|---|---|---|---|"]
    for row in r["frame_scaling"]:
        lines.append(f"| {row['latent']} | {row['shape'][0]} | {row['seconds']:.1f} s | "
                     f"{(row['peak_rss'] - row['baseline_rss']) / 2**20:.0f} MB | {row['peak_rss'] / 2**30:.2f} GB |")
    return "\n".join(lines)


FILL_VAES = ["memkit-sd-vae.safetensors", "memkit-sdxl-vae.safetensors", "memkit-flux-vae.safetensors",
             "memkit-wan21-vae.safetensors", "memkit-hunyuan-video-vae.safetensors"]
FILL_ORDER = [0, 1, 2, 3, 4, 0, 1, 2, 3, 0]  # each fits the budget alone; together they do not
FILL_BUDGET_GB = 1.5


class PrivateMemorySampler:
    """The server's private memory (USS, from /proc/PID/smaps) sampled on a thread: its peak."""

    def __init__(self, pid: int, seconds: float = 0.1) -> None:
        self.process, self.seconds, self.peak = psutil.Process(pid), seconds, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        return self.process.memory_full_info().uss

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            self._stop.wait(self.seconds)

    def __enter__(self) -> PrivateMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def bench_budget() -> dict:
    """Entries added one by one (unpinned VAEs, fp32 on a CPU) until the RAM budget binds: the
    server's private memory above its baseline, against the budget."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        config = base / "preload.json"
        entries = [{"vae_name": name, "cache_key": name.removesuffix(".safetensors"), "pinned": False}
                   for name in FILL_VAES]
        config.write_text(json.dumps({"settings": {"preload_mode": "off", "ram_budget_gb": FILL_BUDGET_GB},
                                      "models": {"vaes": entries}}))
        server = ComfyServer(base, MODELS, config, [])
        server.start()
        try:
            sampler = PrivateMemorySampler(server.process.pid)
            baseline = sampler.now()
            steps = []
            with sampler:
                for entry in (entries[index] for index in FILL_ORDER):
                    status, _ = server.request("POST", "/memkit/preload",
                                                    {"cache_keys": [entry["cache_key"]], "wait": True})
                    totals = server.get("/memkit/status")["totals"]
                    steps.append({"cache_key": entry["cache_key"], "status": status,
                                  "file_bytes": (MODELS / "vae" / entry["vae_name"]).stat().st_size,
                                  "cached_ram_bytes": totals["ram_bytes"], "entries": totals["entries"],
                                  "evictions": totals["evictions"], "private_bytes": sampler.now() - baseline,
                                  "peak_private_bytes": sampler.peak - baseline})
        finally:
            server.stop()
    budget = int(FILL_BUDGET_GB * 2**30)
    return {"machine": machine(), "budget_bytes": budget, "baseline_private_bytes": baseline, "steps": steps,
            "peak_private_bytes": max(step["peak_private_bytes"] for step in steps),
            "peak_cached_bytes": max(step["cached_ram_bytes"] for step in steps)}


def render_budget(r: dict) -> str:
    budget = r["budget_bytes"]
    lines = ["## RAM budget fill (issue 17)", "",
             f"Unpinned VAEs preloaded one at a time, some twice (`POST /memkit/preload`, `wait`), into a server with "
             f"`ram_budget_gb: {budget / 2**30:g}`, on a CPU (ComfyUI holds VAEs in float32 there). Private memory "
             "is the server's USS above its value before the first load, sampled every 0.1 s.", "",
             "| after | file | cached (status) | entries | evictions | private now | private peak so far |",
             "|---|---|---|---|---|---|---|"]
    for step in r["steps"]:
        lines.append(f"| {step['cache_key']} | {step['file_bytes'] / 2**20:.0f} MB | "
                     f"{step['cached_ram_bytes'] / 2**20:.0f} MB | {step['entries']} | {step['evictions']} | "
                     f"{step['private_bytes'] / 2**20:.0f} MB | {step['peak_private_bytes'] / 2**20:.0f} MB |")
    peak = r["peak_private_bytes"]
    cached = r["peak_cached_bytes"]
    lines += ["", f"Peak private memory above the baseline: **{peak / 2**30:.2f} GB** for a "
              f"{budget / 2**30:g} GB budget ({peak / budget:.0%} of it; goal ≤ 105 %), including each load's "
              f"transient (ComfyUI reads the file's tensors, then builds the float32 model; the reservation "
              f"counts both). The most the cache itself counted (status `ram_bytes`): {cached / 2**30:.2f} GB "
              f"({cached / budget:.0%} of the budget)."]
    return "\n".join(lines)


RELIABILITY_FILES = ["tests/e2e/test_routes_hostile.py", "tests/e2e/test_faults.py"]


def bench_reliability() -> dict:
    """Issue 17's reliability suite run once: the fuzzing summary, the burst line, and how many
    injected faults left readiness (or anything else the tests check) wrong."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MEMKIT_ARTIFACTS": tmp}
        run = subprocess.run([sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider",
                              "-rA", *RELIABILITY_FILES], cwd=REPO, env=env, capture_output=True, text=True)
        summary = Path(tmp, "hostile", "fuzz_summary.txt")
        fuzz = summary.read_text().strip() if summary.exists() else "no fuzzing summary (the fuzz test did not end)"
    lines = run.stdout.splitlines()
    outcomes = [line.split(" ", 1) for line in lines
                if line.startswith(("PASSED tests/e2e/test_faults", "FAILED tests/e2e/test_faults"))]
    return {"machine": machine(), "fuzz": fuzz, "burst": next((x for x in lines if x.startswith("burst:")), "no burst"),
            "faults": [{"test": where.split("::")[-1].split(" ")[0], "passed": verdict == "PASSED"}
                       for verdict, where in outcomes],
            "tail": lines[-1] if lines else run.stderr[-300:]}


def render_reliability(r: dict) -> str:
    faults = [f for f in r["faults"] if "burst" not in f["test"]]
    wrong = [f["test"] for f in faults if not f["passed"]]
    lines = ["## Reliability (issue 17)", "",
             "`tests/e2e/test_routes_hostile.py` and `tests/e2e/test_faults.py` run once against real servers.", "",
             f"- **Fuzzing**: {r['fuzz']}.",
             f"- **Faults injected**: {len(faults)} scenarios (each test one fault through a real server); "
             f"**{len(wrong)}** left readiness or the cache wrong{': ' + ', '.join(wrong) if wrong else ''}.",
             f"- **Concurrent bursts**: {r['burst'].removeprefix('burst: ')}.",
             f"- pytest: {r['tail']}"]
    return "\n".join(lines)


def bench_step_cache() -> dict:
    """Issue 19's benchmark: one fresh process (benchmarks/step_cache_worker.py) holding the heavy-job lock."""
    with open(HEAVY_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        answer = subprocess.run([sys.executable, str(HERE / "step_cache_worker.py")], check=True,
                                capture_output=True, text=True)
    return {"machine": machine(), **json.loads(answer.stdout.strip().splitlines()[-1])}


def _held(row: dict) -> str:
    peak = row["held_peak"]
    total = f"{peak.get('total', 0) / 2**20:.3f} MB"
    tiers = [f"{name} {nbytes / 2**20:.3f} MB" for name, nbytes in peak.items() if name != "total"]
    return total + (f" ({', '.join(tiers)})" if tiers else "")


def render_step_cache(r: dict) -> str:
    m, rows = r["model"], r["rows"]
    plain = [row for row in rows if row["key"].startswith("none")]
    base = sum(row["seconds"] for row in plain) / len(plain)
    skipped = ", ".join(str(step) for step in r["skipped"])
    first, last = r["window_steps"]
    lines = [
        "## Step cache (issue 19)", "",
        f"A Wan 2.1 diffusion model at the 1.3B model's width (dim {m['dim']}, FFN {m['ffn_dim']}, {m['heads']} "
        f"heads) with {m['blocks']} blocks ({m['parameters'] / 1e6:.0f} M parameters, {m['dtype']} on the CPU, "
        f"`{m['class']}`), "
        "built from seeded weights and loaded through ComfyUI's `load_diffusion_model_state_dict`; one latent "
        f"{'×'.join(str(n) for n in r['latent'][1:])} ({r['tokens']} tokens, {r['text_tokens']} text tokens), "
        f"{r['steps']} steps of `{r['sampler']}`/`{r['scheduler']}` with CFG {r['cfg']:g} (cond and uncond in one "
        f"batch), through `comfy.sample.sample`; torch threads: {r['threads']} (the machine is shared with test runs: "
        "two threads beside another busy process measured contention, not the methods).", "",
        f"Random weights make adaptive decisions meaningless, so **every method skips the same {len(r['skipped'])} of "
        f"{r['steps']} steps** ({skipped}; 0-based): MemKitStepCache by its **interval mode** (`cache_interval` 2 on a "
        f"window of steps {first}–{last}: `start_percent` {r['window_percents'][0]:.4f}, `end_percent` "
        f"{r['window_percents'][1]:.4f}); core's EasyCache and the TeaCache pattern are **forced** to those steps (a "
        "wrapper sets EasyCache's threshold to +inf on them and -inf elsewhere, and hands it a copy of its input so "
        "its in-place add cannot shift the latent; the TeaCache reimplementation decides by step). A forward hook on "
        "the first block records which steps ran it: the *skipped* column is measured. *Held between steps*: the "
        "bytes of the tensors each method keeps, read after every step (peak); MemKit's per-device split is its "
        "own report. On this CPU the compute and offload devices are both the CPU. The **TeaCache residual pattern** "
        "is our reimplementation (ComfyUI block-replace patches: the blocks' hidden-state residual and the last "
        "time modulation kept between steps, and between runs until the next run's step 0), not the TeaCache "
        "package.", "",
        "| method | time | vs no cache | skipped (measured) | held between steps (peak) | held after the run | "
        "latent vs no cache (mean rel. diff) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        count = len(row["skipped_steps"])
        exact = "" if row["skipped_steps"] in ([], r["skipped"]) else f" ({row['skipped_steps']})"
        lines.append(f"| {row['label']} | {row['seconds']:.1f} s | {base / row['seconds']:.2f}× | {count}{exact} | "
                     f"{_held(row)} | {row['held_after_bytes'] / 2**20:.3f} MB | {row['relative_difference']:.4f} |")
    ours = [row for row in rows if row["key"].startswith("memkit")]
    ideal = r["steps"] / (r["steps"] - len(r["skipped"]))
    slowest = min(base / row["seconds"] for row in ours)
    easycache = next(row for row in rows if row["key"] == "easycache")
    teacache = next(row for row in rows if row["key"] == "teacache")
    held_ours = max(1, next(row for row in rows if row["key"] == "memkit-compute-same")["held_peak"].get("total", 0))
    # the same tensors at Wan 2.1 14B, 1280x720x81 frames, bf16: shapes only
    diff_bytes = 2 * 16 * 21 * 90 * 160 * 2
    residual_bytes = 2 * 75_600 * 5120 * 2
    lines += [
        "",
        f"Speed-ups are against the mean of the two no-cache runs ({base:.1f} s); the ideal with "
        f"{len(r['skipped'])} of {r['steps']} steps skipped is {ideal:.2f}×. MemKit's slowest configuration: "
        f"**{slowest:.4f}×** (goal ≥ 1.6×: "
        f"{'met' if slowest >= 1.6 else 'not met'}). Core EasyCache's latent against MemKit's (same dtype): "
        + ("identical (the same steps skipped, the same arithmetic)" if easycache["max_abs_vs_memkit_same"] == 0
           else f"max |diff| {easycache['max_abs_vs_memkit_same']:.3g}")
        + f". The TeaCache pattern held {teacache['held_peak'].get('total', 0) / held_ours:.0f}× MemKit's bytes "
        "(the hidden states of every token against one latent per cond)"
        + (", and still holds them after the run" if teacache["held_after_bytes"] else "")
        + f". The runs went in the table's order, once each; the 1-minute load average was "
        f"{r['loadavg_before'][0]:.2f} before and {r['loadavg_after'][0]:.2f} after (2 cores), and the two no-cache "
        f"runs differ by {abs(plain[0]['seconds'] - plain[-1]['seconds']):.1f} s.",
        "",
        f"Computed from the shapes, not measured: for Wan 2.1 14B at 1280×720×81 frames in bf16 with CFG, MemKit's "
        f"(and EasyCache's) diffs are {diff_bytes / 1e6:.1f} MB, the TeaCache residual {residual_bytes / 1e9:.2f} GB "
        "(decimal units here; the table's MB are 2^20 bytes).",
        "",
        "No GPU run: no GPU machine was used for this section, so the 14B-width peak-allocation comparison on CUDA "
        "is not measured.",
    ]
    return "\n".join(lines)


# --- as a user sees it: the structure issue's three figures, from one run ---------------------------------

USER_VAE = "memkit-sdxl-vae.safetensors"  # an SD-family KL VAE seeded apart from the SD one the tests use


def executed_seconds(server: ComfyServer, prompt: dict) -> float:
    """A prompt's own run, from ComfyUI's ``execution_start`` to ``execution_success`` timestamps (ms):
    the test client's /history polling would round a ~2 s prompt to its 0.25 s poll."""
    status, answer = server.request("POST", "/prompt", {"prompt": prompt, "client_id": server.client_id})
    assert status == 200, answer
    server.wait_for(answer["prompt_id"])
    item = server.get(f"/history/{answer['prompt_id']}")[answer["prompt_id"]]
    stamps = {event: data["timestamp"] for event, data in item["status"]["messages"]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000


def sampling_prompt(loader: str, seed: int, width: int = 64) -> dict:
    """Checkpoint, two prompts, a 1-step KSampler at 64 px, decode, preview: a whole small prompt."""
    node = "MemKitCheckpointLoader" if loader == "memkit" else "CheckpointLoaderSimple"
    return {"1": {"class_type": node, "inputs": {"ckpt_name": CKPT_A}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["1", 1]}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
            "4": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": 64, "batch_size": 1}},
            "5": {"class_type": "KSampler", "inputs": {"seed": seed, "steps": 1, "cfg": 6.0, "sampler_name": "euler",
                                                       "scheduler": "normal", "denoise": 1.0, "model": ["1", 0],
                                                       "positive": ["2", 0], "negative": ["3", 0],
                                                       "latent_image": ["4", 0]}},
            "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
            "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}}}


def after_warmup(loader: str, warmup_width: int, prompts: int = 4) -> dict:
    """A server warmed the way its user would (MemKit: blocking preload + auto_gpu_load + a warm-up
    workflow; core: one prompt of its own), at ``warmup_width`` px wide, then ``prompts`` sampling
    prompts with new seeds at 64 px."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        config = None
        if loader == "memkit":
            (base / "warmup.json").write_text(json.dumps(sampling_prompt(loader, 0, warmup_width)))
            config = base / "preload.json"
            config.write_text(json.dumps({"settings": {"preload_mode": "blocking", "auto_gpu_load": True,
                                                       "warmup_workflow": "warmup.json"},
                                          "models": {"checkpoints": [{"name": CKPT_A}]}}))
        server = ComfyServer(base, MODELS, config, ["--cache-classic"])
        server.start()
        try:
            server.wait_ready()
            if loader == "core":
                executed_seconds(server, sampling_prompt(loader, 0, warmup_width))
            times = [executed_seconds(server, sampling_prompt(loader, seed)) for seed in range(1, prompts + 1)]
        finally:
            server.stop()
    return {"loader": loader, "warmup_width": warmup_width, "prompt_seconds": times}


def decode_prompt(tiled: bool) -> dict:
    decode = ({"class_type": "MemKitTiledVAEDecode",
               "inputs": {"samples": ["2", 0], "vae": ["1", 0], "tile_x": 256, "tile_y": 256, "tile_stride_x": 192,
                          "tile_stride_y": 192, "temporal_size": 64, "temporal_stride": 48, "auto": False,
                          "precision": "precise"}} if tiled
              else {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 0]}})
    return {"1": {"class_type": "MemKitVAELoader", "inputs": {"vae_name": USER_VAE}},
            "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 640, "height": 640, "batch_size": 1}},
            "3": decode, "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}


def decodes_through_prompt(tiled: bool, prompts: int = 3) -> dict:
    """A fresh server (``--cache-none``: every prompt decodes again) decoding one 640×640 image per prompt."""
    with tempfile.TemporaryDirectory() as tmp:
        server = ComfyServer(Path(tmp), MODELS, None, ["--cache-none"])
        server.start()
        try:
            times = [executed_seconds(server, decode_prompt(tiled)) for _ in range(prompts)]
        finally:
            server.stop()
    return {"tiled": tiled, "prompt_seconds": times}


def bench_user() -> dict:
    results = {"machine": machine(), "checkpoint": CKPT_A, "vae": USER_VAE,
               "after_warmup": [after_warmup(loader, width) for width in (64, 48) for loader in ("core", "memkit")]}
    # the like-for-like miss: fresh processes, file in the page cache, alternating, median of 3 each
    pairs = [(inprocess("core-fresh")["seconds"], inprocess("memkit-hit")["miss_seconds"]) for _ in range(3)]
    results["fresh_core"], results["fresh_memkit_miss"] = [p[0] for p in pairs], [p[1] for p in pairs]
    results["decodes"] = [decodes_through_prompt(False), decodes_through_prompt(True)]
    return results


def render_user(r: dict) -> str:
    lines = ["## As a user sees it (issue 18)", "",
             f"First prompt after a warm-up, through `/prompt` with `--cache-classic` (`{r['checkpoint']}`, two "
             "CLIPTextEncode, a 1-step KSampler at 64×64, VAEDecode; each prompt a new seed). MemKit: blocking "
             "preload + `auto_gpu_load` + a warm-up workflow of that shape; core: one such prompt of its own first; "
             "the warm-up at the prompts' own 64 px, or at 48 px. Each prompt's time is ComfyUI's own, from its "
             "`execution_start` to `execution_success` timestamps. *first / warm*: the first prompt against the "
             "median of the next three (goal ≤ 1.05).",
             "", "| server | warm-up | prompts (s) | first / warm |", "|---|---|---|---|"]
    for run in r["after_warmup"]:
        times = run["prompt_seconds"]
        name = "MemKitCheckpointLoader" if run["loader"] == "memkit" else "CheckpointLoaderSimple"
        lines.append(f"| {name} | {run.get('warmup_width', 48)} px | {', '.join(f'{t:.2f}' for t in times)} | "
                     f"**{times[0] / statistics.median(times[1:]):.2f}×** |")
    core, miss = statistics.median(r["fresh_core"]), statistics.median(r["fresh_memkit_miss"])
    lines += ["", "A cache miss against ComfyUI's own loader, like for like: each load the first in a fresh process, "
              "the file in the page cache, alternating, median of 3 (goal ≤ 1.05×):", "",
              "| load | runs (s) | median |", "|---|---|---|",
              f"| CheckpointLoaderSimple | {', '.join(f'{t:.2f}' for t in r['fresh_core'])} | {core:.2f} s |",
              f"| MemKitCheckpointLoader miss | {', '.join(f'{t:.2f}' for t in r['fresh_memkit_miss'])} | "
              f"{miss:.2f} s (**{miss / core:.2f}×**) |", "",
              f"Precise tiled decode through `/prompt` (`{r['vae']}`, a 640×640 image from a fresh server with "
              "`--cache-none`, so each prompt decodes; 256-px tiles with stride 192, i.e. 64 px of overlap; "
              "`MemKitTiledVAEDecode` with `auto` off against `VAEDecode`; goal ≤ 1.3× as a user sees it):", "",
              "| decode | first prompt | later prompts | first | warm |", "|---|---|---|---|---|"]
    untiled = next(d for d in r["decodes"] if not d["tiled"])["prompt_seconds"]
    for run in r["decodes"]:
        times = run["prompt_seconds"]
        name = "MemKitTiledVAEDecode, precise" if run["tiled"] else "VAEDecode (untiled)"
        warm = statistics.median(times[1:]) / statistics.median(untiled[1:])
        lines.append(f"| {name} | {times[0]:.2f} s | {', '.join(f'{t:.2f}' for t in times[1:])} s | "
                     f"{times[0] / untiled[0]:.2f}× | {warm:.2f}× |")
    return "\n".join(lines)


# --- shared weights (issue 20) -----------------------------------------------------------------

SHARED_VAE, SHARED_TE = "memkit-sd-vae.safetensors", "memkit-clip-l.safetensors"
SHARED_MODELS = {"checkpoints": [{"name": CKPT_A}], "vaes": [{"vae_name": SHARED_VAE}],
                 "text_encoders": [{"clip_names": [SHARED_TE]}]}


def three_loaders_prompt(loader: str, seed: int) -> dict:
    """The checkpoint, a VAE and a text encoder through ``loader`` (core or memkit), a 1-step KSampler
    at 64 px: every weight is read, so each server's RSS holds all of them."""
    if loader == "memkit":
        nodes = {"1": ("MemKitCheckpointLoader", {"ckpt_name": CKPT_A}),
                 "8": ("MemKitVAELoader", {"vae_name": SHARED_VAE}),
                 "9": ("MemKitTextEncoderLoader", {"clip_name1": SHARED_TE, "clip_name2": "none",
                                                   "clip_name3": "none", "type": "stable_diffusion"})}
    else:
        nodes = {"1": ("CheckpointLoaderSimple", {"ckpt_name": CKPT_A}), "8": ("VAELoader", {"vae_name": SHARED_VAE}),
                 "9": ("CLIPLoader", {"clip_name": SHARED_TE, "type": "stable_diffusion"})}
    prompt = {key: {"class_type": node, "inputs": inputs} for key, (node, inputs) in nodes.items()}
    prompt.update({
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["9", 0]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"seed": seed, "steps": 1, "cfg": 6.0, "sampler_name": "euler",
                                                   "scheduler": "normal", "denoise": 1.0, "model": ["1", 0],
                                                   "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["8", 0]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}}})
    return prompt


def host_ram(servers: list[ComfyServer]) -> dict:
    from support.memory import smaps_rollup

    return {"pss_bytes": sum(smaps_rollup(s.process.pid, "Pss") for s in servers),
            "available_bytes": psutil.virtual_memory().available}


def preload_seconds(server: ComfyServer) -> float:
    return sum(e.get("load_seconds", 0.0) for e in server.get("/memkit/status")["entries"])


def sharing_run(mode: str, store: Path, count: int = 3) -> dict:
    """``count`` servers started one after another, each loading the three models (core: by a
    prompt; MemKit: blocking preload, then the same prompt through its loaders); host RAM after each."""
    bases, servers, rows = [], [], []
    settings = {"preload_mode": "blocking"}
    if mode == "shared":
        settings["shared_weights"] = {"enabled": True, "directory": str(store)}
    try:
        for index in range(count):
            base = Path(tempfile.mkdtemp(prefix="memkit-bench-"))
            bases.append(base)
            config = None
            if mode != "core":
                config = base / "preload.json"
                config.write_text(json.dumps({"settings": settings, "models": SHARED_MODELS}))
            server = ComfyServer(base, MODELS, config, ["--cache-classic"])
            servers.append(server)
            started = time.perf_counter()
            server.start()
            server.wait_ready()
            ready = time.perf_counter() - started
            loader = "core" if mode == "core" else "memkit"
            first = executed_seconds(server, three_loaders_prompt(loader, 1))
            prompts = [executed_seconds(server, three_loaders_prompt(loader, seed)) for seed in (2, 3, 4)]
            row = {"servers": index + 1, "ready_seconds": ready, "first_prompt_seconds": first,
                   "prompt_seconds": prompts, **host_ram(servers)}
            if mode != "core":
                status = server.get("/memkit/status")
                row["preload_seconds"] = preload_seconds(server)
                row["sharing"] = [e.get("sharing", {}).get("state") for e in status["entries"]]
            rows.append(row)
    finally:
        for server in servers:
            server.stop()
        for base in bases:
            subprocess.run(["rm", "-rf", str(base)], check=False)
    return {"mode": mode, "rows": rows}


def restarted_run(store: Path) -> dict:
    """One server started after every sharing server stopped: it maps the store back."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        config = base / "preload.json"
        config.write_text(json.dumps({"settings": {"preload_mode": "blocking", "shared_weights": {
            "enabled": True, "directory": str(store)}}, "models": SHARED_MODELS}))
        server = ComfyServer(base, MODELS, config, ["--cache-classic"])
        started = time.perf_counter()
        server.start()
        try:
            server.wait_ready()
            ready = time.perf_counter() - started
            sharing = [e.get("sharing", {}).get("state") for e in server.get("/memkit/status")["entries"]]
            return {"ready_seconds": ready, "preload_seconds": preload_seconds(server), "sharing": sharing}
        finally:
            server.stop()


def bench_sharing() -> dict:
    store = Path("/dev/shm") / f"memkit-bench-{os.getpid()}"
    subprocess.run(["rm", "-rf", str(store)], check=False)
    try:
        results = {"machine": machine(), "checkpoint": CKPT_A, "vae": SHARED_VAE, "text_encoder": SHARED_TE,
                   "runs": [sharing_run(mode, store) for mode in ("core", "private", "shared")]}
        results["restarted"] = restarted_run(store)
        results["store_bytes"] = sum(f.stat().st_size for f in store.glob("*.weights"))
    finally:
        subprocess.run(["rm", "-rf", str(store)], check=False)
    return results


def render_sharing(r: dict) -> str:
    gb = 2**30
    names = {"core": "ComfyUI alone (its loaders)", "private": "MemKit, shared weights off",
             "shared": "MemKit, shared weights on"}
    lines = ["## Shared weights: one copy per host (issue 20)", "",
             f"1, 2 and 3 ComfyUI servers on one host, started one after another, each holding `{r['checkpoint']}`, "
             f"`{r['vae']}` and `{r['text_encoder']}` (ComfyUI alone: loaded by a prompt through its loaders; "
             "MemKit: a blocking preload, then the same prompt through MemKit's loaders), each having run a 1-step "
             "64 px prompt (every weight read). Host RAM: the sum of the servers' proportional memory (PSS), and "
             "what the host has available. Goal: 3 servers with sharing ≤ 1.2× the RAM of one.", "",
             "| setup | servers | sum of PSS | available | × one server |", "|---|---|---|---|---|"]
    for run in r["runs"]:
        one = run["rows"][0]["pss_bytes"]
        for row in run["rows"]:
            lines.append(f"| {names[run['mode']]} | {row['servers']} | {row['pss_bytes'] / gb:.2f} GB | "
                         f"{row['available_bytes'] / gb:.2f} GB | {row['pss_bytes'] / one:.2f}× |")
    private = next(run for run in r["runs"] if run["mode"] == "private")["rows"]
    shared = next(run for run in r["runs"] if run["mode"] == "shared")["rows"]
    growth = (shared[-1]["pss_bytes"] - shared[0]["pss_bytes"]) / (len(shared) - 1)
    lines += ["", f"With sharing, each server after the first adds {growth / gb:.2f} GB: that server's own process "
              "(Python, torch, ComfyUI), which no store can share; the weights are in the store once "
              f"({r['store_bytes'] / gb:.2f} GB)."]
    cold = private[0]["preload_seconds"]
    lines += ["", "Preload time (the sum of the entries' load seconds in `/memkit/status`; files in the page cache; "
              "goal for a second and a restarted server: ≤ 10 % of a cold preload):", "",
              "| server | preload | against a cold preload | weights |", "|---|---|---|---|",
              f"| first, sharing off (cold) | {cold:.2f} s | 1.00 | {', '.join(map(str, private[0]['sharing']))} |"]
    for label, row in (("first, sharing on (loads, then writes the store)", shared[0]),
                       ("second, sharing on", shared[1]), ("third, sharing on", shared[2]),
                       ("restarted after all stopped", r["restarted"])):
        lines.append(f"| {label} | {row['preload_seconds']:.2f} s | {row['preload_seconds'] / cold:.2f} | "
                     f"{', '.join(map(str, row['sharing']))} |")
    off = statistics.median(private[0]["prompt_seconds"])
    on = statistics.median(shared[1]["prompt_seconds"])
    lines += ["", f"Prompt time (the same 1-step prompt, ComfyUI's execution timestamps, median of 3 after the first): "
              f"sharing off {off:.2f} s, sharing on (second server, weights mapped) {on:.2f} s: **{on / off:.2f}×** "
              f"(goal ≤ 1.02). The store held {r['store_bytes'] / gb:.2f} GB."]
    return "\n".join(lines)


BENCHMARKS = {"cache": (bench_cache, render_cache), "serverless": (bench_serverless, render_serverless),
              "conditioning": (bench_conditioning, render_conditioning), "vae": (bench_vae, render_vae),
              "budget": (bench_budget, render_budget), "reliability": (bench_reliability, render_reliability),
              "step_cache": (bench_step_cache, render_step_cache), "user": (bench_user, render_user),
              "sharing": (bench_sharing, render_sharing)}


def render_all() -> str:
    parts = ["# Benchmarks", "", "Written by `make bench` (benchmarks/run.py); every number below was measured "
             "by that script on the machine named in its section. Timings are wall-clock.", ""]
    for name, (_, render) in BENCHMARKS.items():
        path = RESULTS / f"{name}.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        m = result["machine"]
        parts += [render(result), "", f"_Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, {m['gpu']}; "
                  f"Python {m['python']}, torch {m['torch']}, ComfyUI {m['comfyui']}; measured {m['date']}._", ""]
    return "\n".join(parts)


def main() -> None:
    wanted = sys.argv[1:] or list(BENCHMARKS)
    RESULTS.mkdir(exist_ok=True)
    for name in wanted:
        measure, _ = BENCHMARKS[name]
        (RESULTS / f"{name}.json").write_text(json.dumps(measure(), indent=2))
    (REPO / "BENCHMARKS.md").write_text(render_all())


if __name__ == "__main__":
    main()
