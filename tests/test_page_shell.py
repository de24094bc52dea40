"""The page shell (core/http/shell.py): a page's HTML is Streamlit's index.html plus the
server's root, so a browser that opens /metrics by its URL asks the right health URL first.
Built from the installed Streamlit; served under `streamlit run` over real HTTP; checked in
Chromium at the root and under a server.baseUrlPath."""

from __future__ import annotations

import http.client
import re

import pytest

from core.http import shell
from tests.browser import chromium, needs_chromium, streamlit_app

HOOK = re.compile(r"<script>window\.__streamlit = .*?</script>")


def get(url: str, path: str, method: str = "GET") -> tuple[int, dict, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request(method, path)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def test_the_shell_is_streamlits_index_with_only_the_servers_root_added():
    index = (shell.STATIC / "index.html").read_text(encoding="utf-8")
    page = shell.build("").decode()
    [hook] = HOOK.findall(page)
    assert 'BACKEND_BASE_URL: window.location.origin + "/"' in hook
    assert page.index(hook) < page.index("</head>") < page.index('<div id="root">')
    assert page.replace(hook, "") == index                          # nothing else changed
    assert 'window.location.origin + "/gyro/"' in shell.build("/gyro/").decode()
    assert 'window.location.origin + "/a/b/"' in shell.build("a/b").decode()
    odd = shell.build("x</script><script>alert(1)").decode()           # a base path cannot end the script
    assert odd.count("</script>") == page.count("</script>") and "\\u003c/script>" in odd


def test_without_streamlits_index_there_is_no_shell(tmp_path):
    assert shell.build("", static=tmp_path) is None                  # no index.html
    (tmp_path / "index.html").write_text("<html><body>no head</body></html>")
    assert shell.build("", static=tmp_path) is None                  # nowhere to put the line


def test_the_shell_holds_the_apps_shortcuts_from_before_any_element_loads():
    script = shell.held_shortcut_script("go", "prompt")
    page = shell.build("", shortcuts=(("go", "prompt"),)).decode()
    [hook] = HOOK.findall(page)
    assert page.count(script) == 1 and page.index(hook) < page.index(script) < page.index("</head>")
    assert page.replace(script, "") == shell.build("").decode()      # nothing else changed
    assert '".st-key-" + "go" + " button"' in script and '".st-key-" + "prompt"' in script


@pytest.mark.parametrize("key", ["", "a b", 'go"', "go</script>", "x\\"])
def test_a_shortcut_key_that_could_break_the_script_is_refused(key):
    with pytest.raises(ValueError, match="letters, digits"):
        shell.held_shortcut_script(key, "prompt")
    with pytest.raises(ValueError, match="letters, digits"):
        shell.held_shortcut_script("go", key)


@pytest.mark.parametrize("path, page", [
    ("/", True), ("", True), ("/metrics", True), ("/settings/", True), ("/no-such-page", True),
    ("/static/js/index.js", False), ("/_stcore/health", False), ("/_stcore/stream", False),
    ("/metrics/_stcore/health", False), ("/media/abc.csv", False), ("/favicon.png", False),
    ("/manifest.json", False), ("/component/x/index.html", False), ("/app/static/a", False),
    ("/api/models", False), ("/v1/models", False),
])
def test_which_paths_are_pages(path, page):
    assert shell.is_page(path, reserved=("api", "v1")) is page


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with streamlit_app(tmp_path_factory.mktemp("shell")) as url:
        yield url


def test_under_streamlit_pages_get_the_shell_and_everything_else_is_untouched(served):
    status, headers, body = get(served, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert headers["cache-control"] == "no-cache" and len(HOOK.findall(body.decode())) == 1
    assert HOOK.findall(get(served, "/")[2].decode()) and HOOK.findall(get(served, "/settings?x=1")[2].decode())
    assert shell.held_shortcut_script("go", "prompt") in body.decode()     # the app's (streamlit_app.py)
    status, headers, body = get(served, "/metrics", "HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 1000
    script = re.search(r'src="\./(static/js/index\.[\w-]+\.js)"', get(served, "/")[2].decode()).group(1)
    status, headers, body = get(served, "/" + script)                # Streamlit's files: its own
    assert status == 200 and "javascript" in headers["content-type"] and not HOOK.search(body.decode())
    assert get(served, "/_stcore/health")[2] == b"ok"
    status, headers, _ = get(served, "/api/no-such-thing")           # the API: JSON, as before
    assert status == 404 and headers["content-type"] == "application/json"
    assert get(served, "/metrics/_stcore/health")[0] == 404           # still not a page


@pytest.mark.parametrize("base", [pytest.param("", marks=needs_chromium),
                                  pytest.param("gyro", marks=needs_chromium)])
def test_a_page_opened_by_its_url_asks_the_servers_root_first(tmp_path, base):
    env = {"STREAMLIT_SERVER_BASE_URL_PATH": base} if base else {}
    root = f"/{base}" if base else ""
    with streamlit_app(tmp_path, **env) as url, chromium() as browser:
        page = browser.new_page()
        asked: list[str] = []
        page.on("request", lambda r: asked.append(r.url.removeprefix(url)) if "/_stcore/" in r.url else None)
        page.goto(f"{url}{root}/metrics")
        page.get_by_text("No requests recorded yet").wait_for(timeout=60_000)   # the page ran
        assert f"{root}/_stcore/health" in asked
        assert not [p for p in asked if p.startswith(f"{root}/metrics/")]       # no wrong guess
