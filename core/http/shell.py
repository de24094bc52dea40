"""The page shell: Streamlit's own index.html, served with one line that tells the frontend
where the server is.

Without it, a browser that opens a page by its URL (``/metrics``, ``/settings``) guesses the
server's root from that URL: it first asks ``/metrics/_stcore/health``, gets a 404, waits
its retry delay and only then asks ``/_stcore/health``. That cost every cold visit to a page
other than the first ~0.1-0.15 s before the websocket could open (seen in Chromium's network
log: two rounds of health and host-config requests). The frontend takes the root from
``window.__streamlit.BACKEND_BASE_URL`` when a host page sets it; the shell sets it to this
server's root (``server.baseUrlPath`` included), so the first request is the right one.

It also carries the app's held keyboard shortcuts (``held_shortcut_script``): a button's
shortcut works only once the button is drawn, and Streamlit draws each element when its own
script has loaded, so on a fresh visit the prompt box can take typing before the Generate
button below it exists. A script in the page's element (the fallback, core.ui.hold_shortcut)
loads as an element too, and could come after the text box; in the shell it runs first.

Everything else is Streamlit's: the shell is built once from the installed
``streamlit/static/index.html``. If that file cannot be read or has no ``</head>``, the
middleware steps aside and Streamlit serves its own page: a visit can get slower, never break.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import streamlit

STATIC = Path(streamlit.__file__).parent / "static"
# Path segments that are never a page: Streamlit's own routes and files.
STREAMLIT_PATHS = ("_stcore", "static", "media", "component", "app", "auth", "oauth2callback")


# A Ctrl+Enter (⌘+Enter) typed in the field widget while the button widget is not drawn yet
# is noted, and the button pressed once, when it is drawn (5 s at most; not
# at all if it is drawn disabled). With the button there, Streamlit's shortcut acts alone.
# The first copy of it on a page (the shell's, else the page's) is the only one that listens.
_HELD_SHORTCUT_JS = """(() => {
  const held = (window.__gyroHeld = window.__gyroHeld || {});
  if (held[%(key)s]) return;                                        // once per page load
  held[%(key)s] = {pending: false};
  const button = () => document.querySelector(".st-key-" + %(key)s + " button");
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Enter" || !(e.ctrlKey || e.metaKey) || e.repeat) return;
    if (!e.target.closest || !e.target.closest(".st-key-" + %(field)s)) return;   // typed elsewhere
    if (button() || held[%(key)s].pending) return;     // Streamlit's shortcut, or already held
    held[%(key)s].pending = true;
    const started = performance.now();
    const press = () => {
      const b = button();
      if (b) { held[%(key)s].pending = false; if (!b.disabled) b.click(); return; }
      if (performance.now() - started < 5000) setTimeout(press, 50);
      else held[%(key)s].pending = false;
    };
    setTimeout(press, 0);
  }, true);
})();"""
_KEY = re.compile(r"[A-Za-z0-9_-]+")


def held_shortcut_script(button_key: str, field_key: str) -> str:
    """The ``<script>`` that holds a Ctrl+Enter typed in ``field_key`` for ``button_key``."""
    for key in (button_key, field_key):
        if not _KEY.fullmatch(key):
            raise ValueError(f"widget key {key!r}: use letters, digits, '_' and '-' only")
    js = _HELD_SHORTCUT_JS % {"key": json.dumps(button_key), "field": json.dumps(field_key)}
    return f"<script>{js}</script>"


def build(base_path: str = "", static: Path = STATIC,
          shortcuts: tuple[tuple[str, str], ...] = ()) -> bytes | None:
    """Streamlit's index.html with the server's root set and the held ``shortcuts``
    ((button key, field key) pairs), or None when it cannot be made."""
    try:
        index = (static / "index.html").read_text(encoding="utf-8")
    except OSError:
        return None
    if "</head>" not in index:
        return None
    root = json.dumps(root_path(base_path) + "/").replace("<", "\\u003c")   # no "</script>" in it
    hook = ("<script>window.__streamlit = Object.assign(window.__streamlit || {}, "
            f"{{BACKEND_BASE_URL: window.location.origin + {root}}});</script>")
    hook += "".join(held_shortcut_script(button, field) for button, field in shortcuts)
    return index.replace("</head>", hook + "</head>", 1).encode("utf-8")


def root_path(base_path: str) -> str:
    """'' for the server's root, '/gyro' for ``server.baseUrlPath = "gyro/"``."""
    return "/" + base_path.strip("/") if base_path.strip("/") else ""


def is_page(path: str, reserved: tuple[str, ...] = ()) -> bool:
    """Whether Streamlit answers ``path`` (below the root) with its index.html: a page of the
    app, not one of its files or routes, nor one in ``reserved`` (the app's own routes)."""
    segments = [s for s in path.split("/") if s]
    if not segments:
        return True
    return segments[0] not in (*STREAMLIT_PATHS, *reserved) and "." not in segments[-1] \
        and "_stcore" not in segments


class PageShell:
    """ASGI middleware: a GET or HEAD of a page gets the shell instead of index.html."""

    def __init__(self, app, base_path: str = "", reserved: tuple[str, ...] = (),
                 shortcuts: tuple[tuple[str, str], ...] = ()) -> None:
        self.app = app
        self.root = root_path(base_path)
        self.reserved = reserved
        self.body = build(base_path, shortcuts=shortcuts)

    def _serves(self, scope) -> bool:
        if self.body is None or scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            return False
        path = scope["path"]
        if path != self.root and not path.startswith(self.root + "/"):
            return False
        return is_page(path[len(self.root):], self.reserved)

    async def __call__(self, scope, receive, send) -> None:
        if not self._serves(scope):
            await self.app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/html; charset=utf-8"),
            (b"content-length", str(len(self.body)).encode()),
            (b"cache-control", b"no-cache"),   # as Streamlit serves index.html
        ]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else self.body})
