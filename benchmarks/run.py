"""`make bench`: measure, then write BENCHMARKS.md from every results/*.json.

Each benchmark writes its own results file (with the machine it ran on), so running one
benchmark refreshes its section and keeps the others. Usage: run.py [cache] [vae]
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(REPO / "tests"))

from support.comfy_host import put_comfy_first_on_path  # noqa: E402
from support.comfy_server import ComfyServer  # noqa: E402

put_comfy_first_on_path()

MODELS = Path(os.environ["MEMKIT_MODELS"])
CKPT_A, CKPT_B = "memkit-sd15.safetensors", "memkit-sd15-b.safetensors"


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    comfy_version = (Path(os.environ["MEMKIT_COMFYUI"]) / "comfyui_version.py").read_text().split('"')[1]
    return {"date": date.today().isoformat(), "cpu": cpu, "cores": psutil.cpu_count(),
            "ram_gb": round(psutil.virtual_memory().total / 2**30, 1), "gpu": "none (CPU run)",
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


def server_run(name: str, loader: str, extra_args: list[str], preload: list[str] | None, prompts: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        config = None
        if preload is not None:
            config = base / "preload.json"
            config.write_text(json.dumps({"settings": {"preload_mode": "blocking"},
                                          "models": {"checkpoints": [{"name": n} for n in preload]}}))
        server = ComfyServer(base, MODELS, config, extra_args)
        started = time.perf_counter()
        server.start()
        try:
            startup = time.perf_counter() - started
            times = [timed_prompt(server, load_prompt(loader, ckpt, 64 + 8 * i)) for i, ckpt in enumerate(prompts)]
            rss = psutil.Process(server.process.pid).memory_info().rss
            core_loads = server.log().count("model_type EPS")
            memkit = server.get("/memkit/status")["totals"]
        finally:
            server.stop()
    return {"name": name, "startup_seconds": startup, "prompt_seconds": times, "rss_bytes": rss,
            "checkpoint_loads": core_loads, "memkit_loads": memkit["loads"]}


def bench_cache() -> dict:
    results = {"machine": machine(), "checkpoint": CKPT_A,
               "checkpoint_bytes": (MODELS / "checkpoints" / CKPT_A).stat().st_size}
    results["core_cold"] = inprocess("core-cold")
    results["core_warm"] = inprocess("core-warm")
    results["memkit_hit"] = inprocess("memkit-hit")
    abab = [CKPT_A, CKPT_B, CKPT_A, CKPT_B]
    results["first_prompt"] = [
        server_run("core loader, no preload", "core", [], None, [CKPT_A, CKPT_A]),
        server_run("MemKit loader, blocking preload", "memkit", [], [CKPT_A], [CKPT_A, CKPT_A]),
    ]
    results["alternating"] = [
        server_run("CheckpointLoaderSimple, default cache", "core", [], None, abab),
        server_run("CheckpointLoaderSimple, --cache-lru 8", "core", ["--cache-lru", "8"], None, abab),
        server_run("CheckpointLoaderSimple, --cache-ram", "core", ["--cache-ram"], None, abab),
        server_run("MemKitCheckpointLoader, default cache", "memkit", [], None, abab),
    ]
    return results


def render_cache(r: dict) -> str:
    cold, warm, hit = r["core_cold"]["seconds"], r["core_warm"]["seconds"], r["memkit_hit"]
    lines = [
        "## Model cache (issue 3)",
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
        "| server | start-up | first prompt | second prompt (warm) | first / warm |",
        "|---|---|---|---|---|",
    ]
    for run in r["first_prompt"]:
        first, second = run["prompt_seconds"]
        lines.append(f"| {run['name']} | {run['startup_seconds']:.1f} s | {first:.2f} s | {second:.2f} s | "
                     f"{first / second:.1f}× |")
    base = r["alternating"][0]["prompt_seconds"]
    lines += [
        "",
        "Prompts alternating checkpoints A, B, A, B through `/prompt` (each prompt also decodes a latent of a new "
        "width, so only the loader's output can be reused):",
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


BENCHMARKS = {"cache": (bench_cache, render_cache)}


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
