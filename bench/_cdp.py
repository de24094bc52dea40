"""Debian's Chromium driven over the DevTools protocol directly, for timing pages.

Playwright instruments every page it drives: it follows every request and response, keeps an
isolated world with its own injected script in each frame, and relays all of it to its driver
process. On this 2-core machine a cold visit to the Metrics page is CPU-bound, and that
bookkeeping took ~0.4 s from it (docs/benchmarks.md, fourth round) — time a person's browser
does not spend. This client asks the browser for only what a timing needs: a fresh browser
context (an empty cache), a tab of a given size, a script run in each new document, a
navigation, evaluating an expression (awaiting its promise) and mouse events.

    with bare_chromium() as browser:
        context = browser.new_context(1280, 800)
        context.add_init_script("window.__seen = performance.now()")
        page = context.new_page()
        page.goto("http://127.0.0.1:8501/metrics")
        page.evaluate("window.__seen")
        page.click(100, 200)
        context.close()
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from websockets.sync.client import connect

from tests.browser import CHROMIUM, stop



class ProtocolError(RuntimeError):
    """The browser answered a command with an error."""


class Connection:
    """One websocket to the browser; commands by id, sessions flattened into it."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.replies: dict[int, dict] = {}
        self.done = threading.Condition()
        self.closed = False
        threading.Thread(target=self._read, name="cdp-reader", daemon=True).start()

    def _read(self) -> None:
        try:
            for raw in self.ws:
                message = json.loads(raw)
                if "id" in message:           # events (no id) are not used: nothing waits on them
                    with self.done:
                        self.replies[message["id"]] = message
                        self.done.notify_all()
        except Exception:  # noqa: BLE001 - the browser went away: wake whoever waits
            pass
        with self.done:
            self.closed = True
            self.done.notify_all()

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 120) -> dict:
        i = next(self.ids)
        message = {"id": i, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        with self.done:
            if not self.done.wait_for(lambda: i in self.replies or self.closed, timeout):
                raise TimeoutError(f"{method}: no answer from the browser in {timeout:.0f} s")
            if i not in self.replies:
                raise ProtocolError(f"{method}: the browser closed the connection")
            reply = self.replies.pop(i)
        if "error" in reply:
            raise ProtocolError(f"{method}: {reply['error'].get('message')}")
        return reply["result"]



class Page:
    """A tab in a browser context."""

    def __init__(self, conn: Connection, target: str, session: str) -> None:
        self.conn, self.target, self.session = conn, target, session

    def _send(self, method: str, params: dict | None = None, timeout: float = 120) -> dict:
        return self.conn.send(method, params, self.session, timeout)

    def goto(self, url: str, timeout: float = 60) -> None:
        """Navigate, and return once the new document is there (its init scripts have run)."""
        error = self._send("Page.navigate", {"url": url}).get("errorText")
        if error:
            raise ProtocolError(f"{url}: {error}")
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(ProtocolError):    # the old document may go mid-question
                if self.evaluate(f"location.href === new URL({json.dumps(url)}).href"):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not open in {timeout:.0f} s")
            time.sleep(0.005)

    def evaluate(self, expression: str, timeout: float = 150):
        """The expression's value (JSON); a promise is awaited."""
        result = self._send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                 "returnByValue": True}, timeout)
        if "exceptionDetails" in result:
            raise ProtocolError(f"{expression[:60]}…: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def click(self, x: float, y: float) -> None:
        """A left click at (x, y), as a mouse makes it: move, press, release."""
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self._send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y,
                                                    "button": "none" if kind == "mouseMoved" else "left",
                                                    "buttons": 1 if kind == "mousePressed" else 0,
                                                    "clickCount": 1})

    def close(self) -> None:
        with contextlib.suppress(Exception):        # the browser may be gone already
            self.conn.send("Target.closeTarget", {"targetId": self.target})


class Context:
    """A browser context: its own cache, cookies and storage, like a new profile."""

    def __init__(self, conn: Connection, width: int, height: int) -> None:
        self.conn, self.width, self.height = conn, width, height
        self.id = conn.send("Target.createBrowserContext")["browserContextId"]
        self.scripts: list[str] = []

    def add_init_script(self, source: str) -> None:
        """Run ``source`` in every document of this context's later pages, before its own scripts."""
        self.scripts.append(source)

    def new_page(self) -> Page:
        target = self.conn.send("Target.createTarget", {"url": "about:blank", "browserContextId": self.id})["targetId"]
        session = self.conn.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self.conn, target, session)
        page._send("Page.enable")
        page._send("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": self.height,
                                                          "deviceScaleFactor": 1, "mobile": False})
        for source in self.scripts:
            page._send("Page.addScriptToEvaluateOnNewDocument", {"source": source})
        return page

    def close(self) -> None:
        with contextlib.suppress(Exception):        # the browser may be gone already
            self.conn.send("Target.disposeBrowserContext", {"browserContextId": self.id})


class Browser:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def new_context(self, width: int = 1280, height: int = 800) -> Context:
        return Context(self.conn, width, height)


@contextlib.contextmanager
def bare_chromium(args: list[str] | tuple[str, ...] = ()):
    """Debian's headless Chromium on a DevTools port of its own, with a throwaway profile."""
    if not shutil.which(CHROMIUM):
        raise RuntimeError(f"{CHROMIUM} is not installed (apt-get install chromium)")
    profile = Path(tempfile.mkdtemp(prefix="gyro-cdp-"))
    proc = subprocess.Popen([CHROMIUM, *args, "--remote-debugging-port=0", f"--user-data-dir={profile}",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"      # Chromium writes "port\n/devtools/browser/<id>"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and len(port_file.read_text().split()) == 2):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Chromium did not open its DevTools port (exit code {proc.poll()})")
            time.sleep(0.05)
        port, path = port_file.read_text().split()
        with connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=30) as ws:
            yield Browser(Connection(ws))
    finally:
        stop(proc)
        shutil.rmtree(profile, ignore_errors=True)
