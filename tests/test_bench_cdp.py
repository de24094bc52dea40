"""The benchmarks' bare DevTools client (bench/_cdp.py) in Debian's Chromium: init scripts run
before the page's own, the viewport is the one asked for, promises are awaited, a click is a
real one at the spot given, and each context starts empty (a cold visit is cold)."""

from __future__ import annotations

import http.server
import threading

import pytest

from bench._cdp import ProtocolError, bare_chromium
from tests.browser import CHROMIUM_ARGS, free_port, needs_chromium

pytestmark = needs_chromium

PAGE = b"""<!doctype html><html><body style="margin:0">
<button id="b" style="position:absolute; left:100px; top:50px; width:80px; height:40px">Press</button>
<script>
window.__own = performance.now();
window.__seen = [];
document.getElementById('b').addEventListener('mousedown', e => __seen.push(['down', e.clientX, e.clientY]));
document.getElementById('b').addEventListener('click', e => __seen.push(['click', e.clientX, e.clientY]));
window.__before = localStorage.getItem('visited');
localStorage.setItem('visited', 'yes');
</script></body></html>"""


LOADED = "new Promise(r => document.readyState === 'complete' ? r(1) : addEventListener('load', () => r(1)))"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_page_opened_over_devtools_behaves_as_a_users(site):
    with bare_chromium(CHROMIUM_ARGS) as browser:
        context = browser.new_context(640, 480)
        context.add_init_script("window.__init = performance.now();")
        page = context.new_page()
        page.goto(site + "/page")
        assert page.evaluate("location.pathname") == "/page"                # the new document…
        assert page.evaluate(LOADED) == 1                                  # …all of it
        assert page.evaluate("[innerWidth, innerHeight]") == [640, 480]
        assert page.evaluate("window.__init < window.__own")           # before the page's own script
        assert page.evaluate("new Promise(r => setTimeout(() => r(42), 50))") == 42
        page.click(140, 70)                                              # the button's centre
        assert page.evaluate("window.__seen") == [["down", 140, 70], ["click", 140, 70]]
        page.click(10, 10)                                               # not on the button
        assert len(page.evaluate("window.__seen")) == 2
        with pytest.raises(ProtocolError, match="ERR_CONNECTION_REFUSED"):   # at once, said plainly
            browser.new_context().new_page().goto(f"http://127.0.0.1:{free_port()}/")
        with pytest.raises(ProtocolError, match="boom"):
            page.evaluate("(() => { throw new Error('boom'); })()")
        second = context.new_page()                                      # same context: same storage
        second.goto(site + "/again")
        second.evaluate(LOADED)
        assert second.evaluate("window.__before") == "yes"
        context.close()
        fresh = browser.new_context().new_page()                         # a new context starts empty
        fresh.goto(site + "/page")
        fresh.evaluate(LOADED)
        assert fresh.evaluate("window.__before") is None
        assert fresh.evaluate("window.__init === undefined")             # scripts are per context
