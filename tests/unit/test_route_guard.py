"""Who may change the cache through /memkit/: the decision table of ``nodes.route_guard`` (pure)."""

from __future__ import annotations

import pytest

from comfyui_memkit.nodes.route_guard import is_loopback_name, listens_on_loopback_only, refusal

HOST = "127.0.0.1:8188"
JSON = {"Content-Type": "application/json"}
LOOPBACK = ["127.0.0.1"]


def page(origin: str | None, host: str = HOST, site: str | None = None, **extra: str) -> dict[str, str]:
    """The headers a browser sends with a JSON POST from a page of ``origin``."""
    headers = {"Host": host, **JSON, **extra}
    if origin is not None:
        headers["Origin"] = origin
    if site is not None:
        headers["Sec-Fetch-Site"] = site
    return headers


# (why, method, headers, listen, cors, expected status or None, a phrase the reason must hold)
CASES = [
    # --- allowed ---------------------------------------------------------------------------------------------
    ("a GET changes nothing: health checks may come from anywhere",
     "GET", page("http://evil.example", site="cross-site"), LOOPBACK, None, None, ""),
    ("a preflight is ComfyUI's to answer", "OPTIONS", {"Origin": "null"}, LOOPBACK, None, None, ""),
    ("curl / requests / MemKit's own loopback call: no Origin, no Sec-Fetch-Site",
     "POST", {"Host": HOST, **JSON}, LOOPBACK, None, None, ""),
    ("a script may address the server by any name: only browsers are checked for rebinding",
     "POST", {"Host": "0.0.0.0:8188", **JSON}, LOOPBACK, None, None, ""),
    ("ComfyUI's own page (same origin, relative URLs)",
     "POST", page("http://127.0.0.1:8188", site="same-origin"), LOOPBACK, None, None, ""),
    ("the page opened at localhost", "POST", page("http://localhost:8188", "localhost:8188"), LOOPBACK, None,
     None, ""),
    ("IPv6 loopback, listening on both", "POST", page("http://[::1]:8188", "[::1]:8188"), ["127.0.0.1", "::1"],
     None, None, ""),
    ("names and media types compare case-insensitively, a charset parameter is fine",
     "POST", {"host": "LOCALHOST:8188", "ORIGIN": "HTTP://localhost:8188", "content-type":
              "Application/JSON; charset=utf-8"}, LOOPBACK, None, None, ""),
    ("a default port is the same port written or not",
     "POST", page("https://localhost", "localhost:443"), LOOPBACK, None, None, ""),
    ("Sec-Fetch-Site: none is the user's own navigation",
     "POST", {"Host": HOST, "Sec-Fetch-Site": "none", **JSON}, LOOPBACK, None, None, ""),
    ("--enable-cors-header * opens the routes to every page, even a sandboxed one",
     "POST", page("null", site="cross-site"), LOOPBACK, "*", None, ""),
    ("--enable-cors-header naming the page's origin (written with a slash)",
     "POST", page("http://127.0.0.1:3000", site="same-site"), LOOPBACK, "http://127.0.0.1:3000/", None, ""),
    ("listening on the LAN, any Host may be the server's own name",
     "POST", page("http://192.168.1.5:8188", "192.168.1.5:8188"), ["0.0.0.0", "::"], None, None, ""),
    ("a LAN listen address: a DNS name for it is fine", "POST",
     page("http://comfy.lan:8188", "comfy.lan:8188"), ["192.168.1.5"], None, None, ""),
    ("a loopback listen address of its own", "POST", page("http://127.0.0.5:8188", "127.0.0.5:8188"),
     ["127.0.0.5"], None, None, ""),
    ("ComfyUI's /free is not required to declare JSON", "POST",
     {"Host": HOST, "Content-Type": "text/plain"}, LOOPBACK, None, None, "need_json=False"),
    # --- refused: cross-origin pages ------------------------------------------------------------------------
    ("Origin: null (a sandboxed iframe, a file:// page)", "POST", page("null"), LOOPBACK, None, 403,
     "Origin: null"),
    ("a foreign page", "POST", page("http://evil.example"), LOOPBACK, None, 403, "another origin"),
    ("another local server's page (other port: same-site, other origin)",
     "POST", page("http://127.0.0.1:9000"), LOOPBACK, None, 403, "another origin"),
    ("another loopback address", "POST", page("http://127.0.0.2:8188"), LOOPBACK, None, 403, "another origin"),
    ("no equivalence between localhost and 127.0.0.1",
     "POST", page("http://localhost:8188"), LOOPBACK, None, 403, "another origin"),
    ("a foreign page addressing 0.0.0.0 (what ComfyUI's check lets pass)",
     "POST", page("http://evil.example", "0.0.0.0:8188"), LOOPBACK, None, 403, "another origin"),
    ("a page at 0.0.0.0 of a loopback server", "POST", page("http://0.0.0.0:8188", "0.0.0.0:8188"), LOOPBACK,
     None, 403, "listens on loopback"),
    ("DNS rebinding: Origin and Host both the attacker's name",
     "POST", page("http://evil.example:8188", "evil.example:8188"), LOOPBACK, None, 403, "DNS rebinding"),
    ("DNS rebinding without Origin, Sec-Fetch-Site same-origin",
     "POST", page(None, "evil.example:8188", site="same-origin"), LOOPBACK, None, 403, "DNS rebinding"),
    ("a name under localhost. is not *.localhost",
     "POST", page("http://localhost.evil.example:8188", "localhost.evil.example:8188"), LOOPBACK, None, 403,
     "DNS rebinding"),
    ("Sec-Fetch-Site: cross-site without an Origin", "POST", page(None, site="cross-site"), LOOPBACK, None, 403,
     "cross-site"),
    ("Sec-Fetch-Site: same-site (a site ignores the port)", "POST", page(None, site="same-site"), LOOPBACK, None,
     403, "same-site"),
    ("Sec-Fetch-Site: cross-site beside a matching Origin",
     "POST", page("http://127.0.0.1:8188", site="cross-site"), LOOPBACK, None, 403, "cross-site"),
    ("--enable-cors-header naming another origin", "POST", page("http://127.0.0.1:4000"), LOOPBACK,
     "http://127.0.0.1:3000", 403, "another origin"),
    ("--enable-cors-header with an origin says nothing about a page without one",
     "POST", page(None, site="cross-site"), LOOPBACK, "http://127.0.0.1:3000", 403, "cross-site"),
    ("an Origin that is no origin", "POST", page("javascript:alert(1)"), LOOPBACK, None, 403, "is not an origin"),
    ("an Origin with a port out of range", "POST", page("http://127.0.0.1:99999"), LOOPBACK, None, 403,
     "is not an origin"),
    ("an Origin and no Host", "POST", {"Origin": "http://127.0.0.1:8188", **JSON}, LOOPBACK, None, 403,
     "no Host header"),
    ("a Host that is no host", "POST", page("http://127.0.0.1:8188", "127.0.0.1:8188/x"), LOOPBACK, None, 403,
     "is not host[:port]"),
    ("every unsafe method is checked", "DELETE", page("null"), LOOPBACK, None, 403, "Origin: null"),
    # --- refused: not declared JSON ---------------------------------------------------------------------------
    ("no Content-Type", "POST", {"Host": HOST}, LOOPBACK, None, 415, "Content-Type must be application/json"),
    ("text/plain: the simple request a page sends without a preflight",
     "POST", {"Host": HOST, "Content-Type": "text/plain"}, LOOPBACK, None, 415, "'text/plain'"),
    ("a form", "POST", {"Host": HOST, "Content-Type": "application/x-www-form-urlencoded"}, LOOPBACK, None, 415,
     "x-www-form-urlencoded"),
    ("a multipart form", "POST", {"Host": HOST, "Content-Type": "multipart/form-data; boundary=x"}, LOOPBACK,
     None, 415, "multipart"),
    ("a type that only starts like JSON", "POST", {"Host": HOST, "Content-Type": "application/json5"}, LOOPBACK,
     None, 415, "json5"),
    ("--enable-cors-header * does not lift the JSON rule",
     "POST", {**page("http://evil.example"), "Content-Type": "text/plain"}, LOOPBACK, "*", 415, "text/plain"),
    ("an allowed page still declares JSON",
     "POST", {**page("http://127.0.0.1:8188"), "Content-Type": "text/plain"}, LOOPBACK, None, 415, "text/plain"),
    ("a page refused for its origin is told that first",
     "POST", {**page("null"), "Content-Type": "text/plain"}, LOOPBACK, None, 403, "Origin: null"),
]


@pytest.mark.parametrize(("why", "method", "headers", "listen", "cors", "status", "phrase"), CASES,
                         ids=[c[0] for c in CASES])
def test_the_decision_table(why, method, headers, listen, cors, status, phrase):
    got = refusal(method, headers, listen, cors, need_json=phrase != "need_json=False")
    if status is None:
        assert got is None, f"{why}: refused with {got}"
    else:
        assert got is not None, f"{why}: allowed"
        assert got.status == status, f"{why}: {got}"
        assert phrase in got.reason, f"{why}: {got.reason}"


def test_reasons_quote_at_most_a_few_hundred_characters_of_a_huge_header():
    huge = "x" * 1_000_000
    for headers in ({"Host": HOST, "Origin": "http://" + huge}, {"Host": HOST, "Content-Type": huge},
                    {"Host": huge, "Origin": "http://127.0.0.1:8188"}, {"Host": HOST, "Origin": huge}):
        got = refusal("POST", headers, LOOPBACK, None)
        assert got is not None
        assert len(got.reason) < 700, (got.status, len(got.reason))


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True), ("::ffff:127.0.0.1", True),
    ("localhost", True), ("LOCALHOST.", True), ("app.localhost", True),
    ("0.0.0.0", False), ("::", False), ("localhost.evil.example", False), ("evil.example", False),
    ("10.0.0.1", False), ("", False),
])
def test_loopback_names_are_decided_without_dns(host, loopback):
    assert is_loopback_name(host) is loopback


@pytest.mark.parametrize(("listen", "only"), [
    (["127.0.0.1"], True), (["127.0.0.1", "::1"], True), (["localhost"], True),
    (["0.0.0.0", "::"], False), (["127.0.0.1", "0.0.0.0"], False), (["192.168.1.5"], False), ([""], False),
])
def test_the_rebinding_rule_applies_only_when_every_listen_address_is_loopback(listen, only):
    assert listens_on_loopback_only(listen) is only
