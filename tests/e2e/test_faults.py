"""Fault injection and concurrency through real servers (issue 17's reliability suite).

Faults a serving team meets, each checked against what the package promises:

* ``/interrupt`` while the preload prompt loads: the entry that loaded is ready, the others fail
  with the reason, and ``/memkit/ready`` is ``degraded`` with every entry accounted for;
* cache keys with commas (and a text encoder's default key, which has them) all preload;
* a cached model's file truncated on disk (a half-finished copy), then replaced: the old copy
  keeps being served as ``stale``; the new file brings ``ready`` back;
* dangling, corrupt and foreign files in the conditioning cache folder: status answers, encodes
  work, nothing is deleted;
* an authentication layer in front of ``POST /prompt`` (401, a redirect to another host): every
  entry fails naming it, one log line, no redirect followed;
* extreme config values: the server starts and every route answers;
* a burst of concurrent route calls, checked against the status invariants after every answer.

Two servers: ``faults`` (the first five) and ``auth`` (a test auth layer in front of it, an
extreme config), built here rather than with ``start_server`` because they need their own model
files in the base directory and their own environment.
"""

from __future__ import annotations

import http.server
import json
import os
import random
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from comfy_execution.graph_utils import GraphBuilder
from safetensors import safe_open
from support.comfy_server import ComfyServer

pytestmark = pytest.mark.e2e

NODE_PACK = Path(__file__).resolve().parent / "node_pack"
SD_VAE = "memkit-sd-vae.safetensors"
TINY_VAE = "memkit-wan21-vae-tiny.safetensors"
CLIP_L = "memkit-clip-l.safetensors"
COPIED_VAE = "memkit-faults-vae.safetensors"  # a copy of SD_VAE in the server's own <base>/models/vae/

COPIED_KEY = "vae, copied"
TINY_KEY = "wan vae, tiny"
SLOW_KEY = "slow, first"
CLIP_KEY = "text_encoder:memkit-clip-l.safetensors[device=cpu,type=stable_diffusion]"  # its default key
LOADER_INPUTS = {"model_name": "memkit-test-loader.safetensors", "scale": 1.5, "mode": "fast"}
LOADER_KEY = "node:MemKitTestThirdPartyLoader(mode=fast,model_name=memkit-test-loader.safetensors,scale=1.5)"
WAIT_S = 300  # generous: a loaded 2-core machine must not fail on a short deadline

log_lines: list[str] = []


def models_dir() -> Path:
    return Path(os.environ["MEMKIT_MODELS"])


def write_config(path: Path, models: dict, **settings: Any) -> Path:
    path.write_text(json.dumps({"version": 1, "settings": settings, "models": models}, indent=2))
    return path


def started(server: ComfyServer) -> ComfyServer:
    try:
        return server.start()
    except BaseException:
        server.stop()
        raise


# --- polling (every wait has a generous deadline and fails with what it saw) ----------------

def wait_for(what: str, probe: Callable[[], Any], timeout: float = WAIT_S, pause: float = 0.2) -> Any:
    """``probe()``'s first truthy answer; AssertionError naming ``what`` and the last answer at the deadline."""
    deadline = time.monotonic() + timeout
    answer = None
    while time.monotonic() < deadline:
        answer = probe()
        if answer:
            return answer
        time.sleep(pause)
    raise AssertionError(f"{what}: not within {timeout:.0f} s (last: {str(answer)[:2000]})")


def ready_answers(server: ComfyServer, timeout: float = WAIT_S) -> list[tuple[int, dict]]:
    """Every ``/memkit/ready`` answer until the first 200 (the last one)."""
    seen: list[tuple[int, dict]] = []

    def probe() -> bool:
        status, answer = server.request("GET", "/memkit/ready")
        assert status in (200, 503), (status, answer)
        seen.append((status, answer))
        return status == 200

    wait_for("/memkit/ready answers 200", probe, timeout)
    return seen


def assert_never_ready_unaccounted(answers: list[tuple[int, dict]]) -> None:
    """``ready`` (or any 200) only when every entry has an outcome."""
    for status, answer in answers:
        if status == 200:
            assert answer["done"] == answer["total"], f"200 with entries unaccounted for: {answer}"


def rows(server: ComfyServer) -> dict[str, dict]:
    found = server.get("/memkit/status")["entries"]
    keys = [row["cache_key"] for row in found]
    assert len(keys) == len(set(keys)), f"a cache key in two rows: {keys}"
    return {row["cache_key"]: row for row in found}


def vae_decode_prompt(vae_name: str, prefix: str) -> dict:
    graph = GraphBuilder()
    vae = graph.node("MemKitVAELoader", vae_name=vae_name)
    latent = graph.node("EmptyLatentImage", width=64, height=64, batch_size=1)
    decoded = graph.node("VAEDecode", samples=latent.out(0), vae=vae.out(0))
    graph.node("SaveImage", images=decoded.out(0), filename_prefix=prefix)
    return graph.finalize()


def saved_images(outputs: dict) -> list[dict]:
    return [image for output in outputs.values() for image in output.get("images", [])]


# --- the faults server --------------------------------------------------------------------

# RAM, measured on a CPU: the copied VAE 335 MB, CLIP-L 247 MB (pinned: 582 MB), the tiny VAE 57 MB,
# the node entries a few kB. The budget fits the pinned entries but not all of them: loads evict the
# unpinned one, and it is held over the budget when it loads last (status says so).
BUDGET_GB = 0.57


def faults_models(markers: Path) -> dict:
    """Every configured key has a comma; the unpinned VAE comes last (the start-up preload keeps it)."""
    return {
        "text_encoders": [{"clip_names": [CLIP_L], "type": "stable_diffusion", "device": "cpu"}],
        "nodes": [{"node": "MemKitTestSlowLoader", "cache_key": SLOW_KEY,
                   "inputs": {"started_file": str(markers / "started"), "release_file": str(markers / "release")}},
                  {"node": "MemKitTestThirdPartyLoader", "inputs": LOADER_INPUTS}],
        "vaes": [{"vae_name": COPIED_VAE, "cache_key": COPIED_KEY},
                 {"vae_name": TINY_VAE, "cache_key": TINY_KEY, "pinned": False}],
    }


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    copied = base / "models" / "vae" / COPIED_VAE
    copied.parent.mkdir(parents=True)
    shutil.copyfile(models_dir() / "vae" / SD_VAE, copied)
    markers = base / "markers"
    markers.mkdir()
    (markers / "release").touch()  # the start-up preload goes straight through the slow loader
    config = write_config(base / "preload_config.json", faults_models(markers), preload_mode="background",
                          ram_budget_gb=BUDGET_GB)
    server = ComfyServer(base, models_dir(), config, node_packs=[NODE_PACK])
    server.markers = markers
    server.copied_vae = copied
    started(server)
    server.startup_answers = ready_answers(server)
    yield server
    server.stop()


def test_cache_keys_with_commas_all_preload(faults):
    """Keys travel as a list: commas in configured keys, and in a text encoder's default key
    (``device: cpu``) and a node entry's (two inputs or more), are one key each."""
    status = faults.get("/memkit/status")
    keys = [entry["cache_key"] for entry in status["configured"]]
    assert sorted(keys) == sorted([COPIED_KEY, TINY_KEY, CLIP_KEY, SLOW_KEY, LOADER_KEY])
    assert all("," in key for key in keys)
    found = rows(faults)
    assert {key: found[key]["state"] for key in keys} == dict.fromkeys(keys, "ready")
    assert_never_ready_unaccounted(faults.startup_answers)
    final = faults.startup_answers[-1][1]
    assert (final["state"], final["done"], final["total"], final["failed"]) == ("ready", 5, 5, [])
    assert status["preload"]["state"] == "ready"


def test_interrupt_during_the_preload_accounts_for_every_entry(faults):
    """``/interrupt`` while the first of three entries loads: it loads (and is ready), the two
    after it fail with "interrupted", done == total, degraded. A later preload clears them."""
    run = [SLOW_KEY, TINY_KEY, LOADER_KEY]
    for key in run:
        assert faults.request("POST", "/memkit/evict", {"name": key})[0] == 200, key
    wait_for("the evicted entries let go", lambda: not set(run) & set(rows(faults)))
    release, marker = faults.markers / "release", faults.markers / "started"
    release.unlink()
    loads_before = len(marker.read_text().splitlines())

    status, answer = faults.request("POST", "/memkit/preload", {"cache_keys": run})
    assert status == 202, answer
    seen: list[tuple[int, dict]] = []

    def slow_loader_started() -> bool:
        seen.append(faults.request("GET", "/memkit/ready"))
        return len(marker.read_text().splitlines()) > loads_before

    wait_for("the slow loader starts", slow_loader_started)
    assert faults.request("POST", "/interrupt", {})[0] == 200
    release.touch()
    seen += ready_answers(faults)

    assert_never_ready_unaccounted(seen)
    assert all(answer["state"] != "ready" for _, answer in seen), [a["state"] for _, a in seen]
    final = seen[-1][1]
    assert (final["state"], final["done"], final["total"]) == ("degraded", 3, 3), final
    assert final["failed"] == sorted([TINY_KEY, LOADER_KEY])
    found = rows(faults)
    assert found[SLOW_KEY]["state"] == "ready", found[SLOW_KEY]
    for key in (TINY_KEY, LOADER_KEY):
        assert found[key]["state"] == "failed", found[key]
        assert "interrupted" in found[key]["error"], found[key]

    # the unpinned VAE last: a load after it would evict it (the budget)
    status, answer = faults.request("POST", "/memkit/preload", {"cache_keys": [LOADER_KEY, TINY_KEY]})
    assert status == 202, answer
    final = ready_answers(faults)[-1][1]
    assert (final["state"], final["failed"]) == ("ready", []), "a later successful load clears the failures"
    found = rows(faults)
    assert [found[key]["state"] for key in run] == ["ready"] * 3


def test_a_cached_model_truncated_on_disk_is_served_stale_until_the_file_is_whole(faults):
    """A half-copied file: the prompt still runs on the copy loaded before, shown as stale with
    the reason; the whole file again (a new identity) loads, and ready comes back."""
    assert rows(faults)[COPIED_KEY]["state"] == "ready"
    path = faults.copied_vae
    os.truncate(path, path.stat().st_size // 2)
    outputs = faults.run_prompt(vae_decode_prompt(COPIED_VAE, "faults_truncated"))
    assert saved_images(outputs), "the decode ran on the copy loaded before the file changed"

    found = faults.get("/memkit/status")
    stale = [row for row in found["entries"] if row["cache_key"] == COPIED_KEY]
    assert len(stale) == 1, stale
    assert stale[0]["state"] == "stale"
    assert COPIED_VAE in stale[0]["error"], stale[0]
    assert (found["preload"]["state"], found["preload"]["stale"]) == ("degraded", 1)
    status, ready = faults.request("GET", "/memkit/ready")
    assert (status, ready["state"], ready.get("stale")) == (200, "degraded", [COPIED_KEY]), ready

    shutil.copyfile(models_dir() / "vae" / SD_VAE, path)  # the same bytes, a new identity (mtime, ctime)
    outputs = faults.run_prompt(vae_decode_prompt(COPIED_VAE, "faults_restored"))
    assert saved_images(outputs)
    row = rows(faults)[COPIED_KEY]
    assert row["state"] == "ready", row
    assert "error" not in row, row
    status, ready = faults.request("GET", "/memkit/ready")
    assert (status, ready["state"], ready.get("stale", [])) == (200, "ready", []), ready


def conditioning_prompt(text: str) -> dict:
    graph = GraphBuilder()
    by_name = graph.node("MemKitTextEncodeByName", clip_name1=CLIP_L, type="stable_diffusion", device="cpu",
                         text=text)
    graph.node("PreviewAny", source=by_name.out(0))
    clip = graph.node("MemKitTextEncoderLoader", clip_name1=CLIP_L, type="stable_diffusion", device="cpu")
    encoded = graph.node("MemKitTextEncode", clip=clip.out(0), text=text + " (with a clip)")
    graph.node("PreviewAny", source=encoded.out(0))
    return graph.finalize()


def remember_prompt(text: str) -> dict:
    graph = GraphBuilder()
    graph.node("MemKitTestRememberConditioning", clip_name=CLIP_L, type="stable_diffusion", device="cpu", text=text,
               seed=1, tokens=2, width=8)
    return graph.finalize()


def test_dangling_corrupt_and_foreign_files_in_the_conditioning_folder(faults):
    """A dangling symlink, a corrupt file and a folder, under foreign names and under entry names:
    status answers every time, the encoders work, a corrupt entry is replaced by the next encode of
    its prompt, and nothing else is deleted."""
    folder = faults.base / "user" / "memkit" / "conditioning"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "x.safetensors").symlink_to(faults.base / "gone.safetensors")
    (folder / "y.safetensors").write_bytes(b"\x00not a safetensors file" * 64)
    (folder / "z.safetensors").mkdir()
    (folder / f"{'a' * 32}.safetensors").symlink_to(faults.base / "gone-too.safetensors")
    (folder / f"{'c' * 32}.safetensors").write_bytes(b"\xffcorrupt" * 64)
    (folder / f"{'d' * 32}.safetensors").mkdir()
    planted = {path.name for path in folder.iterdir()}

    def status_answers() -> dict:
        status, answer = faults.request("GET", "/memkit/status")
        assert status == 200, answer
        regular = [p for p in folder.iterdir() if p.is_file() and not p.is_symlink()
                   and len(p.stem) == 32 and p.suffix == ".safetensors"]
        assert answer["conditioning"]["disk_files"] == len(regular), "only regular entry files count"
        return answer

    status_answers()
    text = "a lighthouse at dusk, in the rain"
    outputs = faults.run_prompt(remember_prompt(text))  # the key the next encode of this text reads
    (key,) = [t for output in outputs.values() for t in output.get("text", [])]
    entry = folder / f"{key}.safetensors"
    entry.write_bytes(b"\x00cut short" * 16)
    assert faults.request("POST", "/free", {"free_memory": True})[0] == 200  # the RAM copy goes: disk is read
    status_answers()

    faults.run_prompt(conditioning_prompt(text))
    log = faults.log(whole=True)
    assert f"{entry} is not a readable MemKit conditioning file" in log, "the corrupt entry was read"
    with safe_open(str(entry), framework="pt") as handle:
        assert handle.metadata()["format"] == "memkit-conditioning-1", "the encode replaced the corrupt entry"
    status_answers()
    left = {path.name for path in folder.iterdir()}
    assert planted <= left, f"deleted: {planted - left}"
    assert all(os.path.lexists(folder / name) for name in planted)


# --- concurrent bursts ----------------------------------------------------------------------

BURST_KEYS = [COPIED_KEY, TINY_KEY, LOADER_KEY]
BURST_THREADS = 6
BURST_SECONDS = 30.0
BURST_MOST_PER_THREAD = 1500
BURST_ACTIONS = ("status", "ready", "preload", "evict", "pin", "clear", "free")
BURST_WEIGHTS = (4, 2, 4, 0.3, 2, 0.2, 0.2)  # loads take seconds: the destructive calls are rarer
BYTE_FIELDS = ("ram_bytes", "mapped_bytes", "vram_bytes")


def status_violations(status: dict) -> list[str]:
    """What one /memkit/status answer breaks (empty when nothing)."""
    problems = []
    keys = [row["cache_key"] for row in status["entries"]]
    if len(keys) != len(set(keys)):
        problems.append(f"a cache key in two rows: {sorted(k for k in keys if keys.count(k) > 1)}")
    for row in status["entries"]:
        for field in BYTE_FIELDS:
            if row.get(field, 0) < 0:
                problems.append(f"{row['cache_key']}: {field} {row[field]}")
    for field, value in status["totals"].items():
        if field.endswith("_bytes") and isinstance(value, int) and value < 0:
            problems.append(f"totals.{field} {value}")
    preload = status["preload"]
    if not 0 <= preload["done"] <= preload["total"]:
        problems.append(f"preload done {preload['done']} of {preload['total']}")
    cached = [row for row in status["entries"] if row["state"] in ("ready", "stale")]
    budget = status["totals"]["budget_bytes"]
    held = sum(row["ram_bytes"] for row in cached)
    if budget is not None and held > budget:
        pinned = [row for row in cached if row["pinned"]]
        if status["totals"]["over_budget_bytes"] <= 0 or not pinned or not all(r.get("over_budget") for r in pinned):
            problems.append(f"{held} bytes cached over the {budget}-byte budget, not shown as pinned over it")
    return problems


def ready_violations(answer: dict) -> list[str]:
    return [] if 0 <= answer["done"] <= answer["total"] else [f"ready: done {answer['done']} of {answer['total']}"]


class Burst:
    """Counts of one burst, shared by its threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.answers: dict[str, int] = {}  # "action status": count
        self.server_errors: list[str] = []
        self.violations: list[str] = []

    def record(self, what: str, status: int, problems: list[str]) -> None:
        with self.lock:
            self.requests += 1
            self.answers[f"{what} {status}"] = self.answers.get(f"{what} {status}", 0) + 1
            if status >= 500 and (what, status) != ("ready", 503):  # 503: /memkit/ready's documented "not yet"
                self.server_errors.append(f"{what}: {status}")
            self.violations += [f"{what}: {p}" for p in problems]


def burst_worker(server: ComfyServer, burst: Burst, seed: int, deadline: float) -> None:
    chance = random.Random(seed)
    for _ in range(BURST_MOST_PER_THREAD):
        if time.monotonic() >= deadline:
            return
        action = chance.choices(BURST_ACTIONS, BURST_WEIGHTS)[0]
        time.sleep(chance.uniform(0, 0.03))  # clients are not in lockstep
        key = chance.choice(BURST_KEYS)
        if action == "status":
            status, answer = server.request("GET", "/memkit/status")
            burst.record(action, status, status_violations(answer) if status == 200 else [])
        elif action == "ready":
            status, answer = server.request("GET", "/memkit/ready")
            burst.record(action, status, ready_violations(answer) if status in (200, 503) else [])
        elif action == "preload":
            keys = chance.sample(BURST_KEYS, chance.randint(1, 3))
            keys += keys[:1] if chance.random() < 0.3 else []  # a repeat counts once
            status, answer = server.request("POST", "/memkit/preload", {"cache_keys": keys})
            burst.record(action, status, ready_violations(answer) if status in (200, 202) else [])
        elif action == "evict":
            burst.record(action, server.request("POST", "/memkit/evict", {"name": key})[0], [])
        elif action == "pin":
            body = {"name": key, "pinned": chance.random() < 0.5}
            burst.record(action, server.request("POST", "/memkit/pin", body)[0], [])
        elif action == "clear":
            burst.record(action, server.request("POST", "/memkit/clear", {"include_pinned": False})[0], [])
        else:
            body = chance.choice([{"unload_models": True}, {"free_memory": True}])
            burst.record(action, server.request("POST", "/free", body)[0], [])


def quiet_status(server: ComfyServer) -> dict | None:
    """The status once nothing moves: no load or release under way, the preload done, ComfyUI's
    queue empty, and two answers in a row alike (footprints are measured again off the event loop)."""
    queue = server.get("/queue")
    if queue["queue_running"] or queue["queue_pending"]:
        return None
    first = server.get("/memkit/status")
    if first["preload"]["phase"] not in ("done", "idle"):
        return None
    if any(row["state"] in ("loading", "releasing") for row in first["entries"]):
        return None
    second = server.get("/memkit/status")
    same = {k: v for k, v in first.items() if k != "time"} == {k: v for k, v in second.items() if k != "time"}
    return second if same else None


def test_concurrent_bursts_keep_every_invariant(faults, capsys):
    """Six threads of evict / preload / clear / pin / status / ready / free for ~30 s; every answer
    is checked (no 5xx, one row per key, no negative bytes, done <= total, the budget held or
    shown as pinned over it); once quiet the totals are the entries' and readiness the rows'."""
    burst = Burst()
    before = faults.get("/memkit/status")["totals"]
    started_at = time.monotonic()
    deadline = started_at + BURST_SECONDS
    threads = [threading.Thread(target=burst_worker, args=(faults, burst, seed, deadline), daemon=True)
               for seed in range(BURST_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(BURST_SECONDS + WAIT_S)
    assert not any(thread.is_alive() for thread in threads), "a burst thread never returned"
    elapsed = time.monotonic() - started_at

    status = wait_for("the server goes quiet after the burst", lambda: quiet_status(faults), pause=0.5)
    quiet = status_violations(status)
    cached = [row for row in status["entries"] if row["state"] in ("ready", "stale")]
    totals = status["totals"]
    if totals["entries"] != sum(row.get("copies", 1) for row in cached):
        quiet.append(f"totals.entries {totals['entries']} for {len(cached)} cached rows")
    for field in BYTE_FIELDS:
        if totals[field] != sum(row[field] for row in cached):
            quiet.append(f"totals.{field} {totals[field]} is not the rows' {sum(row[field] for row in cached)}")
    code, ready = faults.request("GET", "/memkit/ready")
    troubled = any(row["state"] in ("failed", "stale") for row in status["entries"])
    run_error = bool(status["preload"]["error"] or status["preload"]["warmup_error"])
    if (code, ready["state"]) != ((200, "degraded") if troubled or run_error else (200, "ready")):
        quiet.append(f"/memkit/ready {code} {ready['state']} with rows {[r['state'] for r in status['entries']]}")
    if status["preload"]["state"] != ready["state"]:
        quiet.append(f"status says {status['preload']['state']}, /memkit/ready {ready['state']}")

    loads, evictions = totals["loads"] - before["loads"], totals["evictions"] - before["evictions"]
    line = (f"burst: {burst.requests} requests from {BURST_THREADS} threads in {elapsed:.0f} s ({loads} loads, "
            f"{evictions} evictions), {len(burst.server_errors)} answers >= 500, "
            f"{len(burst.violations) + len(quiet)} invariant violations")
    with capsys.disabled():  # the one summary line BENCHMARKS.md reports
        sys.stdout.write(f"\n{line}\n{sorted(burst.answers.items())}\n")
    assert burst.requests >= BURST_THREADS * 10, line
    assert loads > 0, f"the burst never loaded anything: {burst.answers}"
    assert burst.server_errors == [], burst.server_errors[:20]
    assert burst.violations == [], burst.violations[:20]
    assert quiet == [], quiet
    assert faults.problems() == []


# --- the auth layer and an extreme config ---------------------------------------------------

TOKEN_HEADER = "X-Test-Token"
AUTH_HINT = "an authentication layer"
AUTH_MODELS = {"vaes": [{"vae_name": SD_VAE, "cache_key": "auth, vae"}],
               "nodes": [{"node": "MemKitTestThirdPartyLoader", "inputs": LOADER_INPUTS}]}
AUTH_KEYS = sorted(["auth, vae", LOADER_KEY])


class TokenServer(ComfyServer):
    """The test client passes the test auth layer (MemKit's own loopback call has no token)."""

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json", TOKEN_HEADER: "1"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                status, payload = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, payload = error.code, error.read()
        try:
            return status, json.loads(payload) if payload else None
        except ValueError:
            return status, payload.decode(errors="replace")


class RedirectTarget(http.server.ThreadingHTTPServer):
    """Another host (127.0.0.2) the auth layer redirects to: it must never be reached."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        target = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                target.seen.append(f"{self.command} {self.path}")
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                self.wfile.write(b"<html>login</html>")

            do_GET = do_POST = do_HEAD = _any  # noqa: N815 (http.server's names)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.2", 0), Handler)
        self.url = f"http://127.0.0.2:{self.server_address[1]}/login"


@pytest.fixture(scope="module")
def redirect_target():
    target = RedirectTarget()
    thread = threading.Thread(target=target.serve_forever, daemon=True)
    thread.start()
    yield target
    target.shutdown()
    target.server_close()


@pytest.fixture(scope="module")
def auth(tmp_path_factory, redirect_target):
    base = tmp_path_factory.mktemp("auth")
    settings = {"preload_mode": "background", "ram_budget_gb": 1e300, "ram_budjet_gb": 2}
    config = write_config(base / "preload_config.json", AUTH_MODELS, **settings)
    env = {"MEMKIT_TEST_AUTH_LAYER": "1", "MEMKIT_TEST_REDIRECT_TO": redirect_target.url}
    server = TokenServer(base, models_dir(), config, env=env, node_packs=[NODE_PACK])
    started(server)
    yield server
    server.stop()


def auth_log_lines(server: ComfyServer) -> list[str]:
    return [line for line in server.log(whole=True).splitlines() if AUTH_HINT in line]


def assert_refused_run(server: ComfyServer, answers: list[tuple[int, dict]], refusal: str) -> None:
    assert_never_ready_unaccounted(answers)
    assert all(answer["state"] != "ready" for _, answer in answers), [a["state"] for _, a in answers]
    final = answers[-1][1]
    assert (final["state"], final["done"], final["total"], final["failed"]) == ("degraded", 2, 2, AUTH_KEYS), final
    found = rows(server)
    for key in AUTH_KEYS:
        assert found[key]["state"] == "failed", found[key]
        assert AUTH_HINT in found[key]["error"], found[key]
        assert refusal in found[key]["error"], found[key]


@pytest.mark.slow
def test_an_auth_layer_refusing_the_loopback_prompt_fails_every_entry_naming_it(auth, redirect_target):
    """401 at start-up, then a redirect to another host for a preload started by the route:
    degraded (never ready), every entry names the auth layer, one log line each, no redirect followed."""
    assert_refused_run(auth, ready_answers(auth), "answered 401")
    assert len(auth_log_lines(auth)) == 1, auth_log_lines(auth)

    assert auth.request("POST", "/memkit_test/auth_layer", {"mode": "redirect"})[0] == 200
    status, answer = auth.request("POST", "/memkit/preload", {})
    assert status == 202, answer
    answers = ready_answers(auth)
    assert redirect_target.seen == [], "MemKit followed the redirect to another host"
    assert_refused_run(auth, answers, "not followed")
    lines = auth_log_lines(auth)
    assert len(lines) == 2, lines
    assert redirect_target.url in lines[1], lines


@pytest.mark.slow
def test_extreme_config_values_leave_every_route_and_node_working(auth):
    """``ram_budget_gb: 1e300`` and a settings typo: both are problems in status, the budget keeps
    its default, every route answers below 500 and a MemKit node runs."""
    code, status = auth.request("GET", "/memkit/status")
    assert code == 200, status
    problems = " ".join(status["config"]["problems"])
    assert "ram_budget_gb" in problems, problems
    assert "ram_budjet_gb" in problems, problems
    assert 0 < status["totals"]["budget_bytes"] < 2**50
    calls = [("GET", "/memkit/status", None), ("GET", "/memkit/ready", None),
             ("POST", "/memkit/preload", {"cache_keys": ["auth, vae"]}), ("POST", "/memkit/pin",
             {"name": "auth, vae", "pinned": True}), ("POST", "/memkit/evict", {"name": "auth, vae"}),
             ("POST", "/memkit/clear", {}), ("POST", "/free", {"unload_models": True}), ("GET", "/object_info", None)]
    answered = {f"{method} {path}": auth.request(method, path, body)[0] for method, path, body in calls}
    assert all(code < 500 for code in answered.values()), answered
    ready_answers(auth)  # the preload started above ends (refused by the auth layer)
    outputs = auth.run_prompt(vae_decode_prompt(SD_VAE, "faults_extreme"))
    assert saved_images(outputs)
    assert rows(auth)["auth, vae"]["state"] == "ready", "the node loaded through the cache"
    assert auth.problems() == []
