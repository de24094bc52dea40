"""The guard: rules every HTTP request and websocket meets before any handler runs.

Each rule is one small ASGI middleware class wrapping the whole app (the dashboard, its
websocket /_stcore/stream, /api and /v1), so no handler has to remember it:

    TokenGuard    GYROSCOPE_API_TOKEN set: /api and /v1 need it, before anything else runs
    HostGuard     the Host must be a loopback name or one in GYROSCOPE_ALLOWED_HOSTS
                  (a DNS-rebinding page reaches us under its own name)
    OriginGuard   an Origin other than the server's own, an allowed host's (not loopback's)
                  or one in GYROSCOPE_ALLOWED_ORIGINS is 403
    JsonOnly      a POST/PUT/PATCH/DELETE to /api or /v1 must be Content-Type: application/json
                  (a web page cannot send that cross-site without a preflight we never answer)
    BodyLimit     a body past GYROSCOPE_MAX_BODY_BYTES is 413, counted as it arrives
    JsonLimits    a JSON body nested too deeply or with an oversized number is 400

``middleware(config)`` lists them outermost first for `st.App(middleware=...)` or
`Starlette(middleware=...)`; ``JsonForUnknown`` is the route that goes last in the route
list, so unknown /api and /v1 paths get JSON 404 and wrong methods JSON 405.
"""

from __future__ import annotations

import hmac
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlsplit

from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Match, NoMatchFound

from ..config import read_secret

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
MAX_JSON_DEPTH = 64          # OpenAI tool schemas nest a dozen levels; 64 leaves room
MAX_NUMBER_CHARS = 64        # a float in full is ~25 characters; seeds are at most 20 digits
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True)
class GuardConfig:
    """What the guard allows: hosts, origins, body size, and the API token."""

    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    allowed_origins: tuple[str, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    api_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "GuardConfig":
        """From GYROSCOPE_ALLOWED_HOSTS, GYROSCOPE_ALLOWED_ORIGINS, GYROSCOPE_MAX_BODY_BYTES and
        GYROSCOPE_API_TOKEN (the token also from `.streamlit/secrets.toml`)."""
        env = os.environ if env is None else env

        def listed(name: str) -> tuple[str, ...]:
            return tuple(v.strip().lower().rstrip("./") for v in env.get(name, "").split(",") if v.strip())

        raw = env.get("GYROSCOPE_MAX_BODY_BYTES", "").strip()
        try:
            limit = int(raw) if raw else DEFAULT_MAX_BODY_BYTES
        except ValueError:
            raise ValueError(f"GYROSCOPE_MAX_BODY_BYTES={raw!r} is not a whole number of bytes; "
                             "set it to e.g. 1048576 (1 MiB).") from None
        if limit < 1024:
            raise ValueError(f"GYROSCOPE_MAX_BODY_BYTES={limit} is below 1024; set at least 1024.")
        return cls(allowed_hosts=LOOPBACK_HOSTS + listed("GYROSCOPE_ALLOWED_HOSTS"),
                   allowed_origins=listed("GYROSCOPE_ALLOWED_ORIGINS"), max_body_bytes=limit,
                   api_token=read_secret("GYROSCOPE_API_TOKEN", env))


def middleware(config: GuardConfig | None = None, routes: list[BaseRoute] = ()) -> list[Middleware]:
    """The guard, outermost first: the token before anything else learns of the request.
    ``routes`` (the app's) lets a wrong method get its 405 before any content-type rule."""
    config = config or GuardConfig.from_env()
    return [Middleware(TokenGuard, token=config.api_token),
            Middleware(HostGuard, allowed=config.allowed_hosts),
            Middleware(OriginGuard, allowed=config.allowed_origins, hosts=config.allowed_hosts),
            Middleware(JsonOnly, routes=routes), Middleware(BodyLimit, limit=config.max_body_bytes),
            Middleware(JsonLimits)]


# -- answering a refusal ----------------------------------------------------------------------
def is_api(path: str) -> bool:
    """Whether a path belongs to /api or /v1 (the routes the JSON rules cover)."""
    return path.startswith(("/api/", "/v1/")) or path in ("/api", "/v1")


def error_body(path: str, status: int, kind: str, message: str) -> dict:
    """An error in the shape of its API: OpenAI's on /v1, Gyroscope's elsewhere."""
    if path == "/v1" or path.startswith("/v1/"):
        code = "invalid_api_key" if status == 401 else kind
        return {"error": {"message": message, "type": "invalid_request_error", "param": None,
                          "code": code}}
    return {"error": {"kind": kind, "message": message, "retry_in_s": None}}


async def refuse(scope, send, status: int, kind: str, message: str,
                 headers: Mapping[str, str] | None = None) -> None:
    """Answer with a JSON error; a websocket is closed before it is accepted (a 403)."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
        return
    body = json.dumps(error_body(scope["path"], status, kind, message)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def header(scope, name: bytes) -> str | None:
    """One request header as text (latin-1, as HTTP has it), or None."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


# -- the rules --------------------------------------------------------------------------------
class TokenGuard:
    """With a token configured, /api and /v1 need ``Authorization: Bearer <token>`` first of all:
    a caller without it learns nothing (not even whether the configuration is sound)."""

    def __init__(self, app, token: str | None) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope, receive, send) -> None:
        if self.expected is not None and scope["type"] == "http" and is_api(scope["path"]):
            given = (header(scope, b"authorization") or "").encode("latin-1")
            if not hmac.compare_digest(given, self.expected):
                await refuse(scope, send, 401, "auth", "Send Authorization: Bearer "
                             "<GYROSCOPE_API_TOKEN> (the OpenAI SDK sends its api_key so).",
                             {"WWW-Authenticate": "Bearer"})
                return
        await self.app(scope, receive, send)


def host_name(value: str | None) -> tuple[str, int | None] | None:
    """(host name, port) of a Host header, or None when it is missing or not a plain host."""
    if not value:
        return None
    try:
        parts = urlsplit("//" + value)
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname or parts.username is not None or parts.path or parts.query or parts.fragment:
        return None
    return parts.hostname.rstrip("."), port


def host_allowed(name: str, allowed: tuple[str, ...]) -> bool:
    """Whether a host name is allowed ('*' allows any; '*.example.com' any subdomain)."""
    return any(p == "*" or name == p or (p.startswith("*.") and name.endswith(p[1:]))
               for p in allowed)


class HostGuard:
    """The Host header must name this server (DNS rebinding gives an attacker's page our
    address under the attacker's name); on every route and the websocket."""

    def __init__(self, app, allowed: tuple[str, ...] = LOOPBACK_HOSTS) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            parsed = host_name(header(scope, b"host"))
            if parsed is None or not host_allowed(parsed[0], self.allowed):
                await refuse(scope, send, 400, "host_not_allowed",
                             "This server does not answer to that Host name. If you reach it "
                             "under another name, add it to GYROSCOPE_ALLOWED_HOSTS.")
                return
        await self.app(scope, receive, send)


_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


class OriginGuard:
    """A browser's Origin must be the server itself, a host the operator named in
    GYROSCOPE_ALLOWED_HOSTS (a proxy may hand us another Host than the browser's), or an
    origin listed in GYROSCOPE_ALLOWED_ORIGINS: another site's page may not call /api or
    /v1 or open the dashboard's websocket. (Not any loopback origin: another local web app
    is another site, and '*' in the hosts does not open the door to every page.)"""

    def __init__(self, app, allowed: tuple[str, ...] = (), hosts: tuple[str, ...] = ()) -> None:
        self.app = app
        self.allowed = allowed
        self.hosts = tuple(h for h in hosts if h != "*" and h not in LOOPBACK_HOSTS)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            origin = header(scope, b"origin")
            if origin is not None and not self._same_or_listed(origin, scope):
                await refuse(scope, send, 403, "origin_not_allowed",
                             "Requests from another web site are refused. To call this server "
                             "from a page of yours, add its origin to GYROSCOPE_ALLOWED_ORIGINS.")
                return
        await self.app(scope, receive, send)

    def _same_or_listed(self, origin: str, scope) -> bool:
        origin = origin.strip().lower().rstrip("/")
        if origin in self.allowed:
            return True
        try:
            parts = urlsplit(origin)
            theirs = (parts.hostname, parts.port or _DEFAULT_PORTS.get(parts.scheme))
        except ValueError:
            return False          # 'null' (a sandboxed frame) lands here or below
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            return False
        if host_allowed(parts.hostname, self.hosts):
            return True
        ours = host_name(header(scope, b"host"))
        default = _DEFAULT_PORTS.get(scope.get("scheme", "http"), 80)
        return ours is not None and theirs == (ours[0], ours[1] or default)


class JsonOnly:
    """A POST/PUT/PATCH/DELETE to /api or /v1 must declare a JSON body: a form or a
    text/plain fetch, which any page may send cross-site, never reaches a handler. (A method
    no route takes is left to JsonForUnknown's 405: no handler runs for it either.)"""

    def __init__(self, app, routes: list[BaseRoute] = ()) -> None:
        self.app = app
        self.routes = [r for r in routes if not isinstance(r, JsonForUnknown)]

    def _routed(self, scope) -> bool:
        return not self.routes or any(r.matches(scope)[0] == Match.FULL for r in self.routes)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] in UNSAFE_METHODS and is_api(scope["path"]) \
                and self._routed(scope):
            given = header(scope, b"content-type") or ""
            if given.split(";", 1)[0].strip().lower() != "application/json":
                await refuse(scope, send, 415, "unsupported_media_type",
                             "Send the body as JSON with the header Content-Type: application/json "
                             f"(got {given[:60]!r}).")
                return
        await self.app(scope, receive, send)


class BodyTooLarge(Exception):
    """A body went past the limit while it was being read."""


class BodyLimit:
    """A body to /api or /v1 over ``limit`` bytes is refused with 413: at once when its
    Content-Length says so, else as soon as the bytes received pass it (chunked)."""

    def __init__(self, app, limit: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not is_api(scope["path"]):
            await self.app(scope, receive, send)
            return
        declared = header(scope, b"content-length")
        if declared is not None:
            if not re.fullmatch(r"[0-9]+", declared.strip()):     # not str.isdigit: '²' is one
                await refuse(scope, send, 400, "invalid_parameter",
                             f"Content-Length {declared[:30]!r} is not a number of bytes.")
                return
            if int(declared) > self.limit:
                await self._too_large(scope, send)
                return
        seen = 0
        started = False

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge
            return message

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge:
            if not started:
                await self._too_large(scope, send)

    async def _too_large(self, scope, send) -> None:
        await refuse(scope, send, 413, "too_large",
                     f"The body is larger than {self.limit:,} bytes. Send less (a long text in "
                     "several requests), or raise GYROSCOPE_MAX_BODY_BYTES.", {"Connection": "close"})


class _Refused(Exception):
    def __init__(self, message: str) -> None:
        self.message = message


def _number(text: str, convert):
    if len(text) > MAX_NUMBER_CHARS:
        raise _Refused(f"A number in the JSON body has too many digits ({len(text):,} characters; "
                       f"at most {MAX_NUMBER_CHARS}). Send numbers in their usual range, e.g. "
                       "\"max_tokens\": 256.")
    value = convert(text)
    if isinstance(value, float) and not math.isfinite(value):
        raise _Refused(f"The number {text} in the JSON body is too large. Send numbers in "
                       "their usual range.")
    return value


def _constant(name: str):
    raise _Refused(f"{name} is not a JSON number. Send a number or null.")


def parse_limited(body: bytes) -> Any:
    """The JSON value of ``body``; _Refused when too deep or a number too long; the usual
    ValueError for malformed JSON."""
    try:
        value = json.loads(body, parse_int=lambda t: _number(t, int),
                           parse_float=lambda t: _number(t, float), parse_constant=_constant)
    except RecursionError:
        value = None
        depth = MAX_JSON_DEPTH + 1
    else:
        depth = _depth(value)
    if depth > MAX_JSON_DEPTH:
        raise _Refused(f"The JSON body is nested too deeply (more than {MAX_JSON_DEPTH} levels "
                       "of lists and objects). Send a flatter body, e.g. {\"prompt\": \"Hello\"}.")
    return value


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:                  # no recursion: the value may be a thousand levels deep
        item, level = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, level)
            if level <= MAX_JSON_DEPTH:
                stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


PARSED_KEY = "gyroscope.json"     # where JsonLimits leaves the parsed body for the handler


class JsonLimits:
    """A JSON body to /api or /v1 is read (within BodyLimit) and checked for nesting depth
    and number size before a handler sees it; the handler gets the same bytes again, and
    the parsed value in ``scope[PARSED_KEY]``. Malformed JSON goes on to the handler, which
    says what is wrong in its API's own words."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in UNSAFE_METHODS or not is_api(scope["path"]):
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":      # the client left before sending it all
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body:
            try:
                scope[PARSED_KEY] = parse_limited(body)
            except _Refused as exc:
                await refuse(scope, send, 400, "invalid_parameter", exc.message)
                return
            except ValueError:      # malformed or not UTF-8: the handler words it
                pass
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# -- JSON for unknown paths ---------------------------------------------------------------------
class JsonForUnknown(BaseRoute):
    """The last route: a /api or /v1 path no route took is a JSON 404, or a 405 naming the
    allowed methods when a route has the path (not the dashboard's HTML page)."""

    def __init__(self, routes: list[BaseRoute]) -> None:
        self.routes = routes

    def matches(self, scope) -> tuple[Match, dict]:
        if scope["type"] == "http" and is_api(scope["path"]):
            return Match.FULL, {}
        return Match.NONE, {}

    def url_path_for(self, name: str, /, **params: Any):
        raise NoMatchFound(name, params)

    async def handle(self, scope, receive, send) -> None:
        allowed = sorted({m for r in self.routes if r.matches(scope)[0] == Match.PARTIAL
                          for m in (getattr(r, "methods", None) or ())})
        method, path = scope["method"], scope["path"]
        if allowed:
            await refuse(scope, send, 405, "method_not_allowed",
                         f"{method} is not allowed on {path}; use {', '.join(allowed)}.",
                         {"Allow": ", ".join(allowed)})
        else:
            await refuse(scope, send, 404, "not_found",
                         f"There is no {method} {path}. See /api/openapi.json for the routes.")
