"""Who may change the cache through ``/memkit/``: the decision, free of aiohttp and ComfyUI.

A web page in the user's browser can send requests to ComfyUI on loopback. A *simple* request
(``text/plain`` or a form, no preflight) reaches the handler even though the page cannot read the
answer, and that is enough to clear, evict, pin or preload. ComfyUI's own origin check only acts
when the ``Host`` is a loopback name and the ``Origin`` is not empty, so ``Origin: null`` (a
sandboxed frame) and ``Host: 0.0.0.0:port`` pass it. The rules here, for the state-changing
methods (``refusal`` answers None for GET, HEAD and OPTIONS):

1. A request from a browser names its origin (``Origin``) or its relation to us
   (``Sec-Fetch-Site``). One that names neither (curl, scripts, ``requests``, MemKit's own
   loopback calls) is not a page's: it passes these checks.
2. ``--enable-cors-header`` (ComfyUI's flag) opens the routes to the origin it names, or to every
   origin with ``*``: the operator said so, and ComfyUI answers those pages' preflights.
3. Otherwise ``Origin: null`` is refused, and so is an ``Origin`` whose scheme, host and port are
   not those of the ``Host`` header (no equivalence between ``localhost`` and ``127.0.0.1``: the
   page ComfyUI serves calls it by relative URLs, so it is always same-origin, and on loopback
   ``localhost`` may be ``::1`` where another process holds the same port).
4. ``Sec-Fetch-Site: cross-site`` and ``same-site`` are refused. ``same-site`` too, because a site
   ignores the port: a page of any other local server on ``127.0.0.1:<other port>`` is same-site.
5. DNS rebinding makes the attacker's name point at 127.0.0.1; the browser then sends
   ``Origin`` and ``Host`` both with that name, and rule 3 holds. So when the server listens on
   loopback only, a browser's request must address it by a loopback name or address
   (``localhost``, ``*.localhost``, ``127.0.0.0/8``, ``::1``) or its listen address. Behind a reverse
   proxy that keeps its public ``Host``, name that origin with ``--enable-cors-header``.
   ``0.0.0.0`` is not a loopback address here: browsers are blocking it as a way in to the local
   machine, and nothing listens there when the server listens on loopback.
6. The body must be ``Content-Type: application/json`` (415 otherwise): no simple request has
   that type, so a cross-site page must ask a preflight first, which ComfyUI does not grant.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import NamedTuple
from urllib.parse import urlsplit

from ..model_cache.bounded import shown

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_PORTS = {"http": 80, "https": 443}
JSON_TYPE = "application/json"


class Refusal(NamedTuple):
    """Why a request is refused, and the HTTP status to answer it with (403 or 415)."""

    status: int
    reason: str


class _Origin(NamedTuple):
    scheme: str
    host: str
    port: int


def _origin(text: str) -> _Origin | None:
    """``scheme://host[:port]`` as a comparable triple (host lower-case, port filled in); None when malformed."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname or parts.username is not None or parts.path not in ("", "/"):
        return None
    return _Origin(scheme, parts.hostname.lower(), port if port is not None else DEFAULT_PORTS[scheme])


def _host(text: str, scheme: str) -> tuple[str, int] | None:
    """The ``Host`` header as (host, port), the port defaulting to the scheme's; None when malformed."""
    try:
        parts = urlsplit("//" + text.strip())
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname or parts.path or parts.username is not None:
        return None
    return parts.hostname.lower(), port if port is not None else DEFAULT_PORTS.get(scheme, 80)


def is_loopback_name(host: str) -> bool:
    """``localhost``, ``*.localhost`` (browsers resolve those themselves), or a loopback address.
    No DNS: a name resolving to loopback is exactly what DNS rebinding fakes."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def listens_on_loopback_only(listen: Iterable[str]) -> bool:
    """True when every listen address is loopback (ComfyUI's default ``127.0.0.1``); a wildcard or a
    LAN address means any name may legitimately reach the server."""
    addresses = [a.strip() for a in listen if a.strip()]
    return bool(addresses) and all(is_loopback_name(a) for a in addresses)


def _cors_allows(cors: str | None, origin: str | None) -> bool:
    """Whether ``--enable-cors-header`` opens the routes to this origin (``*``: to every page)."""
    if not cors:
        return False
    allowed = [c for c in cors.replace(",", " ").split() if c]
    if "*" in allowed:
        return True
    wanted = _origin(origin) if origin else None
    return wanted is not None and any(_origin(c) == wanted for c in allowed)


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def refusal(method: str, headers: Mapping[str, str], listen: Iterable[str], cors: str | None,
            need_json: bool = True) -> Refusal | None:
    """None when a request may change state; else why not (see the module's rules).

    ``headers``: the request's headers (any case); ``listen``: the addresses the server listens on
    (``--listen`` split at commas); ``cors``: ComfyUI's ``--enable-cors-header`` (None when off);
    ``need_json``: whether the body must be declared JSON (False for ComfyUI's own ``/free``).
    """
    if method.upper() in SAFE_METHODS:
        return None
    lowered = {k.lower(): v for k, v in headers.items()}
    origin, fetch_site, host = lowered.get("origin"), lowered.get("sec-fetch-site"), lowered.get("host")
    from_browser = origin is not None or fetch_site is not None
    if from_browser and not _cors_allows(cors, origin):
        refused = _browser_refusal(origin, (fetch_site or "").strip().lower(), host, list(listen))
        if refused is not None:
            return refused
    if need_json and _media_type(lowered.get("content-type")) != JSON_TYPE:
        return Refusal(415, f"the header Content-Type must be {JSON_TYPE} (got "
                            f"{shown(lowered['content-type']) if 'content-type' in lowered else 'none'})")
    return None


_HINT = "; start ComfyUI with --enable-cors-header <origin> to allow a page of another origin"


def _browser_refusal(origin: str | None, fetch_site: str, host: str | None, listen: list[str]) -> Refusal | None:
    if origin is not None:
        if origin.strip().lower() == "null":
            return Refusal(403, "a page with Origin: null (a sandboxed frame, a file or a redirect) may not change "
                                "the cache" + _HINT)
        parsed = _origin(origin)
        if parsed is None:
            return Refusal(403, f"the header Origin {shown(origin)} is not an origin (scheme://host:port)")
        if host is None:
            return Refusal(403, f"a request from the page {shown(origin)} has no Host header")
        addressed = _host(host, parsed.scheme)
        if addressed is None:
            return Refusal(403, f"the header Host {shown(host)} is not host[:port]")
        if (parsed.host, parsed.port) != addressed:
            return Refusal(403, f"a page of another origin ({shown(origin)}, this server is addressed as "
                                f"{shown(host)}) may not change the cache" + _HINT)
    if fetch_site in ("cross-site", "same-site"):
        return Refusal(403, f"a request with Sec-Fetch-Site: {fetch_site} (from another site's page) may not change "
                            "the cache" + _HINT)
    if listens_on_loopback_only(listen):
        if host is None:
            return Refusal(403, "a request from a page has no Host header")
        addressed = _host(host, "http")
        own = {a.strip().strip("[]").lower() for a in listen}
        if addressed is None or not (is_loopback_name(addressed[0]) or addressed[0] in own):
            return Refusal(403, f"this server listens on loopback, but a page addressed it as {shown(host)} "
                                "(DNS rebinding?); use localhost or 127.0.0.1, or start ComfyUI with "
                                "--enable-cors-header <this origin> (a reverse proxy)")
    return None
