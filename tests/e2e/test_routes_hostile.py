"""The /memkit/ routes against a hostile client and a hostile page, through one real server.

* The issue's named bad requests (nested JSON, an unknown charset, a broken gzip body, a 1 MB name,
  20,000 keys, a ``text/plain`` POST, ``Origin: null``, ``Host: 0.0.0.0``, ``Sec-Fetch-Site:
  cross-site``, DNS rebinding): each gets the designed 4xx with a bounded JSON error, and no state
  change reaches the cache.
* A page on another loopback origin in the real Chromium tries every state-changing route the ways
  a page can (a simple ``no-cors`` POST, a preflighted JSON fetch, a form, a sandboxed frame, a
  rebound DNS name): the cache is unchanged afterwards.
* ``wait: true`` ends at its deadline and when the client leaves.
* Property-based fuzzing (hypothesis, derandomized) of every route: no answer is a 5xx, every error
  is JSON and bounded, and the server still answers. The summary line goes to the log and to
  ``test-artifacts/hostile/fuzz_summary.txt`` (for BENCHMARKS.md).

Requests go through ``http.client`` so that headers and bodies are exactly what a test says.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import http.server
import json
import logging
import os
import socket
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from comfy_execution.graph_utils import GraphBuilder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
from host import CHROMIUM_HINT  # noqa: E402

log = logging.getLogger("memkit.tests.hostile")

CHROMIUM = Path(os.environ.get("MEMKIT_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(os.environ.get("MEMKIT_ARTIFACTS", REPO / "test-artifacts")) / "hostile"
KEY = "hostile-vae"
VAE = "memkit-sd-vae.safetensors"
CONFIG = {"vaes": [{"vae_name": VAE, "cache_key": KEY, "pinned": False}]}
STATE_ROUTES = ["/memkit/preload", "/memkit/evict", "/memkit/clear", "/memkit/pin"]
ROUTES = [("GET", "/memkit/status"), ("GET", "/memkit/ready")] + [("POST", p) for p in STATE_ROUTES]
# What a page would send: each would change the cache if it got through.
ATTACKS = {"/memkit/preload": {"cache_keys": [KEY]}, "/memkit/evict": {"name": KEY},
           "/memkit/clear": {"include_pinned": True}, "/memkit/pin": {"name": KEY, "pinned": True}}
JSON_TYPE = {"Content-Type": "application/json"}
MAX_ERROR_BYTES = 1500  # cut() keeps a message to 1000 characters, plus the JSON around it


# --- the server and raw requests --------------------------------------------------------------

@pytest.fixture(scope="module")
def server(start_server):
    server = start_server(CONFIG, preload_mode="background")
    server.wait_ready()
    assert cache_state(server)[0] == {KEY: ("ready", False)}
    return server


def exchange(server, method: str, path: str, body: bytes | list[bytes] | None = None,
             headers: dict[str, str] | None = None, timeout: float = 120) -> tuple[int, bytes, str]:
    """One request exactly as given (a list body goes chunked); the status, the raw answer, its type."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        # the server may answer (and close) before the whole body is sent: then read that answer
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            connection.request(method, path, body=iter(body) if isinstance(body, list) else body,
                               headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read(), response.getheader("Content-Type", "")
    finally:
        connection.close()


def send(server, method: str, path: str, body: bytes | list[bytes] | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    return exchange(server, method, path, body, headers)[:2]


# aiohttp's HTTP parser answers a Content-Encoding it has no decoder for (br without Brotli, zstd
# without backports.zstd) with a 400 of its own, before any middleware or route, and logs a traceback;
# so it does for a compressed body it fails to inflate while it parses (not in a route's read).
PARSER_REFUSAL = b"Can not decode content-encoding"


def aiohttps_own(problem: str) -> bool:
    """A traceback that aiohttp's protocol logged while parsing, which no route of ours was part of."""
    return "http_parser" in problem and "in data_received" in problem and "http_api.py" not in problem


def error_of(status: int, raw: bytes) -> str:
    """The answer's ``error``: asserting that a 4xx is JSON with a bounded error and no traceback."""
    assert 400 <= status < 500, (status, raw[:300])
    assert len(raw) <= MAX_ERROR_BYTES, f"{len(raw)} bytes: {raw[:200]!r}"
    answer = json.loads(raw)
    assert isinstance(answer.get("error"), str), answer
    assert "Traceback" not in answer["error"]
    return answer["error"]


def preload_prompts(server) -> int:
    """How many MemKitPreload prompts ComfyUI has run or holds: a preload that got through adds one."""
    def preloads(prompt: dict) -> bool:
        return any(node.get("class_type") == "MemKitPreload" for node in prompt.values())

    queue = server.get("/queue")
    held = [item[2] for item in queue["queue_running"] + queue["queue_pending"]]
    return sum(map(preloads, held + [item["prompt"][2] for item in server.get("/history").values()]))


def cache_state(server) -> tuple[dict[str, tuple[str, bool]], int]:
    """What a hostile request must not change: each entry's state and pin, and the preloads run."""
    entries = {e["cache_key"]: (e["state"], e["pinned"]) for e in server.get("/memkit/status")["entries"]}
    return entries, preload_prompts(server)


def log_lines(server, phrase: str) -> list[str]:
    return [line for line in server.log(whole=True).splitlines() if phrase in line]


# --- (b) the named bad requests ----------------------------------------------------------------

def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


BOMB = gzip.compress(b'{"name": "' + b"a" * 10_000_000 + b'"}')  # 10 MB once inflated, 10 KB on the wire

NAMED = [
    # (why, path, body, headers, status, phrase in the error)
    ("nested JSON (RecursionError)", "/memkit/clear", nested(30_000), JSON_TYPE, 400, "nested too deeply"),
    ("nested JSON inside a field", "/memkit/preload", b'{"cache_keys": ' + nested(30_000) + b"}", JSON_TYPE, 400,
     "nested too deeply"),
    ("an unknown charset (LookupError)", "/memkit/pin", b'{"name": "x", "pinned": true}',
     {"Content-Type": "application/json; charset=no-such-charset"}, 400, "charset 'no-such-charset'"),
    ("a codec that is no text encoding", "/memkit/evict", b'{"name": "x"}',
     {"Content-Type": "application/json; charset=rot13"}, 400, "charset 'rot13'"),
    ("a broken gzip body", "/memkit/evict", b"\x1f\x8bnot gzip at all",
     {**JSON_TYPE, "Content-Encoding": "gzip"}, 400, "could not be read (Content-Encoding 'gzip')"),
    ("a broken deflate body", "/memkit/clear", b"\x78\x9cnot deflate",
     {**JSON_TYPE, "Content-Encoding": "deflate"}, 400, "could not be read (Content-Encoding 'deflate')"),
    ("a gzip bomb", "/memkit/evict", BOMB, {**JSON_TYPE, "Content-Encoding": "gzip"}, 413, "more than 65536 bytes"),
    ("a 1 MB name", "/memkit/evict", json.dumps({"name": "x" * 1_000_000}).encode(), JSON_TYPE, 413,
     "at most 65536"),
    ("a 1 MB name, chunked (no Content-Length)", "/memkit/pin",
     [b'{"pinned": true, "name": "', b"x" * 1_000_000, b'"}'], JSON_TYPE, 413, "more than 65536 bytes"),
    ("a 60 KB name", "/memkit/evict", json.dumps({"name": "y" * 60_000}).encode(), JSON_TYPE, 400,
     "(60000 characters) is longer than"),
    ("a 4,000-character name that is not cached", "/memkit/evict", json.dumps({"name": "y" * 4000}).encode(),
     JSON_TYPE, 404, "nothing cached under 'yyy"),
    ("a 60 KB name that leaves the model folders", "/memkit/pin",
     json.dumps({"name": "../" + "z" * 60_000, "pinned": True}).encode(), JSON_TYPE, 400, "field 'name'"),
    ("20,000 unknown keys", "/memkit/clear", json.dumps({f"k{i}": 0 for i in range(20_000)}).encode(), JSON_TYPE,
     413, "at most 65536"),
    ("5,000 unknown keys (under the size cap)", "/memkit/evict",
     json.dumps({f"{i}": 0 for i in range(5_000)}).encode(), JSON_TYPE, 400, "and 4991 more"),
    ("a 10 KB unknown key", "/memkit/clear", json.dumps({"q" * 10_000: 1}).encode(), JSON_TYPE, 400,
     "(10000 characters): Extra inputs are not permitted"),
    ("bad UTF-8", "/memkit/evict", b'{"name": "\xff\xfe"}', JSON_TYPE, 400, "not valid UTF-8: byte 0xff"),
    ("a list, not an object", "/memkit/clear", b"[1, 2]", JSON_TYPE, 400, "must be a JSON object, not list"),
    ("a string, not an object", "/memkit/pin", b'"x"', JSON_TYPE, 400, "must be a JSON object, not str"),
    ("an integer of 5,000 digits", "/memkit/clear", b'{"include_pinned": ' + b"9" * 5000 + b"}", JSON_TYPE, 400,
     "not valid JSON"),
    ("a wait of no time", "/memkit/preload", b'{"cache_keys": ["hostile-vae"], "wait": true, "timeout_s": 0}',
     JSON_TYPE, 400, "field 'timeout_s': Input should be greater than 0"),
    ("a wait of days", "/memkit/preload", b'{"cache_keys": ["hostile-vae"], "wait": true, "timeout_s": 1e9}',
     JSON_TYPE, 400, "field 'timeout_s': Input should be less than or equal to 3600"),
    ("a wait of NaN", "/memkit/preload", b'{"cache_keys": ["hostile-vae"], "wait": true, "timeout_s": NaN}',
     JSON_TYPE, 400, "field 'timeout_s': Input should be a finite number"),
    ("1,000 unknown cache keys", "/memkit/preload", json.dumps({"cache_keys": [f"n{i}" for i in range(1000)]}).encode(),
     JSON_TYPE, 400, "field 'cache_keys': unknown cache key(s)"),
]
NAMED += [(f"text/plain to {path} (a simple cross-site request)", path, json.dumps(body).encode(),
           {"Content-Type": "text/plain"}, 415, "Content-Type must be application/json (got 'text/plain')")
          for path, body in ATTACKS.items()]
NAMED += [(f"a form to {path}", path, b"name=hostile-vae&pinned=true",
           {"Content-Type": "application/x-www-form-urlencoded"}, 415, "x-www-form-urlencoded") for path in ATTACKS]
NAMED += [(f"no Content-Type to {path}", path, json.dumps(body).encode(), {}, 415, "(got none)")
          for path, body in ATTACKS.items()]
NAMED += [(f"Origin: null (a sandboxed frame) to {path}", path, json.dumps(body).encode(),
           {**JSON_TYPE, "Origin": "null"}, 403, "Origin: null") for path, body in ATTACKS.items()]
NAMED += [(f"Sec-Fetch-Site: cross-site to {path}", path, json.dumps(body).encode(),
           {**JSON_TYPE, "Sec-Fetch-Site": "cross-site"}, 403, "Sec-Fetch-Site: cross-site")
          for path, body in ATTACKS.items()]


def addressed(why: str, host: str, origin: str, phrase: str) -> list[tuple]:
    """Rows whose Host and Origin name the port of the server (known only once it runs: ``{port}``)."""
    return [(f"{why} to {path}", path, json.dumps(body).encode(), {**JSON_TYPE, "Host": host, "Origin": origin},
             403, phrase) for path, body in ATTACKS.items()]


NAMED += addressed("a page at 0.0.0.0 of a loopback server", "0.0.0.0:{port}", "http://0.0.0.0:{port}",
                   "listens on loopback")
NAMED += addressed("a foreign page addressing 0.0.0.0 (ComfyUI's own check lets it pass)", "0.0.0.0:{port}",
                   "http://evil.example", "another origin")
NAMED += addressed("DNS rebinding (Origin and Host the attacker's name)", "rebound.example:{port}",
                   "http://rebound.example:{port}", "DNS rebinding")


@pytest.mark.parametrize(("why", "path", "body", "headers", "status", "phrase"), NAMED, ids=[n[0] for n in NAMED])
def test_a_named_bad_request_gets_its_4xx_and_changes_nothing(server, why, path, body, headers, status, phrase):
    before = cache_state(server)
    headers = {k: v.format(port=server.port) for k, v in headers.items()}
    got, raw = send(server, "POST", path, body, headers)
    assert got == status, (why, got, raw[:300])
    assert phrase in error_of(got, raw), (why, raw[:300])
    assert cache_state(server) == before, why


def test_a_same_origin_page_and_a_script_still_change_the_cache(server):
    """The control: what the panel sends (same origin) and what curl sends (no Origin) get through."""
    page = {**JSON_TYPE, "Origin": server.url, "Sec-Fetch-Site": "same-origin"}
    status, raw = send(server, "POST", "/memkit/pin", json.dumps({"name": KEY, "pinned": True}).encode(), page)
    assert (status, json.loads(raw)) == (200, {"entries": [KEY], "pinned": True})
    assert cache_state(server)[0][KEY] == ("ready", True)
    status, raw = send(server, "POST", "/memkit/pin", json.dumps({"name": KEY, "pinned": False}).encode(),
                       {"Content-Type": "application/json; charset=utf-8"})
    assert (status, json.loads(raw)) == (200, {"entries": [KEY], "pinned": False})
    assert cache_state(server)[0][KEY] == ("ready", False)


def test_comfyuis_free_from_a_sandboxed_page_keeps_the_cache(server):
    """ComfyUI answers /free from ``Origin: null`` itself (its check lets it pass); MemKit's observer
    does not drop the cache for it."""
    before = cache_state(server)
    status, _ = send(server, "POST", "/free", b'{"unload_models": true, "free_memory": true}',
                     {"Content-Type": "text/plain", "Origin": "null"})
    assert status == 200
    assert log_lines(server, "refused POST '/free' (403)")
    assert cache_state(server) == before


# --- (c) a page on another loopback origin, in the real Chromium --------------------------------

ATTACKER_PAGE = """<!doctype html><html><body>
<iframe name="sink"></iframe>
<script>
const ATTACKS = %(attacks)s;
async function tryAll(base, label) {
  const seen = [];
  for (const [path, body] of Object.entries(ATTACKS)) {
    const text = JSON.stringify(body);
    for (const [kind, init] of [
        ["no-cors text/plain", {method: "POST", mode: "no-cors", body: text, headers: {"Content-Type": "text/plain"}}],
        ["no-cors no type", {method: "POST", mode: "no-cors", body: new Blob([text])}],
        ["cors JSON", {method: "POST", body: text, headers: {"Content-Type": "application/json"}}]]) {
      try {
        const answer = await fetch(base + path, init);
        seen.push([label, kind, path, answer.type === "opaque" ? "sent, opaque" : "answered " + answer.status]);
      } catch (error) {
        seen.push([label, kind, path, "blocked: " + error]);
      }
    }
  }
  return seen;
}
window.tryAll = tryAll;
window.postForm = (action, enctype, name, value) => new Promise(resolve => {
  const sink = document.querySelector("iframe[name=sink]");
  sink.onload = () => resolve("loaded");
  const form = document.createElement("form");
  Object.assign(form, {method: "POST", action, enctype, target: "sink"});
  const input = Object.assign(document.createElement("input"), {type: "hidden", name, value});
  form.appendChild(input);
  document.body.appendChild(form);
  form.submit();
});
window.fromSandbox = (base) => new Promise(resolve => {
  const frame = document.createElement("iframe");
  frame.sandbox = "allow-scripts";  // no allow-same-origin: its origin is opaque (Origin: null)
  window.addEventListener("message", event => resolve(event.data), {once: true});
  frame.srcdoc = "<script>const ATTACKS = " + JSON.stringify(ATTACKS) + ";" + tryAll.toString() +
    ";tryAll(" + JSON.stringify(base) + ", 'sandboxed').then(seen => parent.postMessage(seen, '*'));<\\/script>";
  document.body.appendChild(frame);
});
</script></body></html>"""


@pytest.fixture(scope="module")
def attacker_origin():
    """A second local HTTP server, another origin on loopback (127.0.0.1 on another port: same-site)."""
    page = (ATTACKER_PAGE % {"attacks": json.dumps(ATTACKS)}).encode()

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(CHROMIUM_HINT)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # rebound.test stands for an attacker's name that DNS rebinding has pointed at 127.0.0.1
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                             args=["--host-resolver-rules=MAP rebound.test 127.0.0.1"])
        yield browser
        browser.close()


@pytest.mark.slow
def test_a_page_of_another_origin_cannot_change_the_cache_in_chromium(server, attacker_origin, browser):
    before = cache_state(server)
    refused_before = len(log_lines(server, "[memkit] refused POST"))
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(attacker_origin + "/")
        seen = page.evaluate("base => tryAll(base, 'page')", server.url)
        seen += page.evaluate("base => tryAll(base, 'page via 0.0.0.0')", f"http://0.0.0.0:{server.port}")
        for path in ATTACKS:  # a form needs no script at all; text/plain makes its body JSON
            body = json.dumps(ATTACKS[path])
            assert page.evaluate("args => postForm(...args)",
                                 [server.url + path, "text/plain", body[:-1] + ', "pad": "', '"}']) == "loaded"
        seen += page.evaluate("base => fromSandbox(base)", server.url)
        # after DNS rebinding the attacker's page is same-origin with the server: it can read the answer
        page.goto(f"http://rebound.test:{server.port}/memkit/ready")
        rebound = page.evaluate("""async attacks => {
            const answers = [];
            for (const [path, body] of Object.entries(attacks)) {
              const answer = await fetch(path, {method: "POST", body: JSON.stringify(body),
                                                headers: {"Content-Type": "application/json"}});
              answers.push([path, answer.status, (await answer.json()).error]);
            }
            return answers;
        }""", ATTACKS)
    finally:
        context.close()
    log.info("what the page saw: %s", seen)
    assert len(seen) == 3 * 3 * len(ATTACKS)
    assert not [s for s in seen if s[3].startswith("answered 2")], "a page read a successful answer"
    assert [(path, status) for path, status, _ in rebound] == [(path, 403) for path in ATTACKS]
    assert all("DNS rebinding" in error for _, _, error in rebound), rebound
    assert cache_state(server) == before, "a page changed the cache"
    # the sandboxed frame's requests and those addressed to 0.0.0.0 pass ComfyUI's own check (it acts
    # only on a loopback Host and a non-empty Origin): MemKit's guard refused them, each simple request
    refusals = log_lines(server, "[memkit] refused POST")[refused_before:]
    assert len([line for line in refusals if "Origin: null" in line]) >= 2 * len(ATTACKS), refusals
    via_wildcard = [line for line in refusals if "addressed as '0.0.0.0:" in line]
    assert len(via_wildcard) >= 2 * len(ATTACKS) or all(s[3].startswith("blocked") for s in seen
                                                        if s[0] == "page via 0.0.0.0"), refusals


# --- wait: true ------------------------------------------------------------------------------------

def busy_prompt(server, color: int) -> str:
    """Queue a user prompt that keeps ComfyUI's queue busy (a chain of slow blurs; interrupted by the
    test): a preload queued meanwhile waits behind it. Returns its id once it runs."""
    graph = GraphBuilder()
    image = graph.node("EmptyImage", width=64, height=64, batch_size=1, color=color)
    for _ in range(200):
        image = graph.node("ImageBlur", image=image.out(0), blur_radius=31, sigma=10.0)
    graph.node("PreviewImage", images=image.out(0))
    status, answer = server.request("POST", "/prompt", {"prompt": graph.finalize(), "client_id": "hostile"})
    assert status == 200, answer
    prompt_id = answer["prompt_id"]
    deadline = time.monotonic() + 120
    while prompt_id not in [item[1] for item in server.get("/queue")["queue_running"]]:
        assert time.monotonic() < deadline, "the busy prompt never ran"
        time.sleep(0.1)
    return prompt_id


def stop(server, prompt_id: str) -> None:
    """Interrupt the busy prompt (only it: ComfyUI checks the id), then wait for the preload behind it."""
    assert server.request("POST", "/interrupt", {"prompt_id": prompt_id})[0] == 200
    server.wait_ready()


def test_wait_ends_at_its_deadline_with_timed_out(server):
    busy = busy_prompt(server, color=1)
    try:
        started = time.monotonic()
        status, raw = send(server, "POST", "/memkit/preload",
                           json.dumps({"cache_keys": [KEY], "wait": True, "timeout_s": 1.5}).encode(), JSON_TYPE)
        waited = time.monotonic() - started
        answer = json.loads(raw)
        assert (status, answer["timed_out"], answer["ready"]) == (202, True, False), answer
        assert 1.5 <= waited < 30, waited
    finally:
        stop(server, busy)


def test_wait_stops_when_the_client_leaves(server):
    busy = busy_prompt(server, color=2)
    try:
        body = json.dumps({"cache_keys": [KEY], "wait": True, "timeout_s": 3600}).encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as client:
            client.sendall(b"POST /memkit/preload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.monotonic() + 60
            while server.request("GET", "/memkit/ready")[1]["state"] in ("ready", "degraded"):
                assert time.monotonic() < deadline, "the preload never started"
                time.sleep(0.05)
        deadline = time.monotonic() + 60  # the wait polls every 0.25 s: it notices at once
        while not log_lines(server, "the client of POST /memkit/preload left"):
            assert time.monotonic() < deadline, "the wait went on after its client left"
            time.sleep(0.1)
        assert busy in [item[1] for item in server.get("/queue")["queue_running"]], "noticed before the preload ended"
    finally:
        stop(server, busy)


# --- (a) property-based fuzzing --------------------------------------------------------------------

FUZZED = {"requests": 0, "5xx": 0, "parser": 0}
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
    | st.sampled_from([KEY, VAE, "../x", "/etc/passwd", 0.001, "", [KEY]]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)
FIELDS = st.sampled_from(["cache_keys", "wait", "timeout_s", "name", "pinned", "include_pinned", "force", ""])
BODY_LIKE = st.dictionaries(FIELDS | st.text(max_size=12), JSON_VALUES, max_size=4)


@st.composite
def hostile_requests(draw) -> tuple[bytes | list[bytes] | None, dict[str, str]]:
    """A body and headers: JSON that looks like ours or not, raw bytes, nested, huge, compressed or
    broken, under random Content-Type, charset, Content-Encoding and browser headers."""
    kind = draw(st.sampled_from(["body-like", "body-like", "json", "bytes", "nested", "huge", "gzip", "deflate",
                                 "broken", "bomb", "chunked", "none"]))
    encoding = None
    if kind == "body-like":
        body = json.dumps(draw(BODY_LIKE)).encode()
    elif kind == "json":
        body = json.dumps(draw(JSON_VALUES)).encode()
    elif kind == "bytes":
        body = draw(st.binary(max_size=200))
    elif kind == "nested":
        depth = draw(st.sampled_from([100, 2_000, 30_000]))
        body = draw(st.sampled_from([b"[" * depth, b'{"a":' * depth + b"1" + b"}" * depth, nested(depth)]))
    elif kind == "huge":
        body = json.dumps({draw(FIELDS): "x" * draw(st.sampled_from([10_000, 70_000, 1_000_000]))}).encode()
    elif kind in ("gzip", "deflate"):
        inner = json.dumps(draw(BODY_LIKE)).encode()
        body, encoding = (gzip.compress(inner), "gzip") if kind == "gzip" else (zlib.compress(inner), "deflate")
    elif kind == "broken":
        body, encoding = draw(st.binary(max_size=64)), draw(st.sampled_from(["gzip", "deflate", "x-gzip"]))
    elif kind == "bomb":
        body, encoding = BOMB, "gzip"
    elif kind == "chunked":
        body = [json.dumps(draw(BODY_LIKE)).encode(), draw(st.binary(max_size=20))]
    else:
        body = None
    media = draw(st.sampled_from(["application/json"] * 4 + ["text/plain", "application/x-www-form-urlencoded",
                                                             "multipart/form-data; boundary=x", "", None])
                 | HEADER_TEXT)
    headers = {}
    if media is not None:
        charset = draw(st.sampled_from([None] * 3 + ["utf-8", "UTF-8", "latin-1", "utf-16", "no-such-charset",
                                                     "rot13", "base64", '"utf-8"', ""]) | HEADER_TEXT)
        headers["Content-Type"] = media if charset is None else f"{media}; charset={charset}"
    encoding = draw(st.sampled_from([encoding, encoding, "identity", "br", "zstd", "gzip, deflate"]) | HEADER_TEXT)
    if encoding:
        headers["Content-Encoding"] = encoding
    origin = draw(st.sampled_from([None, None, "null", "{url}"]))  # ComfyUI's own check passes these
    if origin is not None:
        headers["Origin"] = origin
    site = draw(st.sampled_from([None, None, "same-origin", "same-site", "cross-site", "none"]) | HEADER_TEXT)
    if site is not None:
        headers["Sec-Fetch-Site"] = site
    return body, headers


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
@settings(max_examples=60, deadline=None, derandomize=True, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
                                 HealthCheck.function_scoped_fixture])
@given(hostile=hostile_requests())
def test_fuzzed_requests_never_get_a_5xx_and_errors_are_bounded(server, method, path, hostile):
    body, headers = hostile
    headers = {k: v.replace("{url}", server.url) for k, v in headers.items()}
    status, raw, media = exchange(server, method, path, body, headers)
    FUZZED["requests"] += 1
    FUZZED["5xx"] += status >= 500
    assert status < 500, (status, raw[:500], headers)
    if status == 400 and media.startswith("text/plain") and raw.startswith(PARSER_REFUSAL):
        FUZZED["parser"] += 1  # aiohttp's own answer (see PARSER_REFUSAL): no route saw it
    elif status >= 400:
        error_of(status, raw)
    else:
        json.loads(raw)


def test_after_the_fuzzing_the_server_answers_and_logged_no_traceback(server):
    status, answer = server.request("GET", "/memkit/ready")
    assert status in (200, 503)
    assert "state" in answer
    problems = [p for p in server.problems() if not aiohttps_own(p)]
    summary = (f"fuzzed {FUZZED['requests']} requests to the {len(ROUTES)} /memkit/ routes "
               f"(hypothesis, derandomized): {FUZZED['5xx']} answered 5xx, {FUZZED['parser']} refused by aiohttp's "
               f"parser before any route (Content-Encoding br/zstd without their decoders); "
               f"{len(problems)} other tracebacks in the log")
    log.warning("%s", summary)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "fuzz_summary.txt").write_text(summary + "\n")
    assert not problems, problems  # over the whole file's requests, the named ones too
    assert FUZZED["requests"] >= 60 * len(ROUTES)
    assert FUZZED["5xx"] == 0
