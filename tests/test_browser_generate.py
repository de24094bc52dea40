"""Generate in a real Chromium: one click after typing, Ctrl+Enter, busy while streaming,
safe Markdown (dollars literal, no remote image fetched), times in the browser's zone.

One app server for the module, on the openai provider pointed at a simulator this test
process controls (its reply and its speed)."""

from __future__ import annotations

import datetime as dt
import re
import time
from zoneinfo import ZoneInfo

import pytest

from core.simulator import Simulator, start_in_background
from tests.browser import chromium, free_port, needs_chromium, streamlit_app, wait_idle
from tests.support import time_of_day_gap_s

pytestmark = needs_chromium
ANSWER = '[data-testid="stMarkdownContainer"]'


@pytest.fixture(scope="module")
def sim():
    running = start_in_background(Simulator(ttft_ms=0, tokens_per_s=None))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def url(sim, tmp_path_factory):
    with streamlit_app(tmp_path_factory.mktemp("gen"), OPENAI_BASE_URL=sim.base_url,
                       OPENAI_API_KEY="sk-test-browser") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture
def fresh(sim):
    sim.sim.clear_faults()
    sim.sim.set_latency(ttft_ms=0, tokens_per_s=None)
    yield sim.sim


def open_generate(browser, url, **context):
    """Generate in a new browser context, drawn: the Generate button too, not only the prompt.

    Each element's component is loaded on its own, so the prompt box can take text a few
    hundred ms before the Generate button is mounted; Ctrl+Enter is that button's shortcut,
    so a Ctrl+Enter in that window did nothing (the lost presses). A person sees the
    button before typing; so does the test."""
    from playwright.sync_api import expect

    page = browser.new_context(viewport={"width": 1280, "height": 900}, **context).new_page()
    page.goto(url, wait_until="domcontentloaded")
    expect(page.get_by_label("Prompt", exact=True)).to_be_visible(timeout=30_000)
    wait_idle(page)
    expect(page.locator(".st-key-go button")).to_be_enabled(timeout=30_000)
    return page


def test_one_click_after_typing_generates_a_safe_answer(browser, url, fresh):
    from playwright.sync_api import expect

    leak = f"http://127.0.0.1:{free_port()}/leak.png"
    fresh.set_faults(reply_text=f"Plans cost $5 or $10 a month.\n\n![our chart]({leak})\n\n"
                                "```bash\necho $HOME\n```\n")
    page = open_generate(browser, url)
    fetched = []
    page.route("**/leak.png*", lambda route: (fetched.append(route.request.url), route.abort()))
    page.get_by_label("Prompt", exact=True).fill("A price list for a bakery")   # no blur, no Ctrl+Enter
    page.locator(".st-key-go button").click()                                   # one click
    answer = page.locator(ANSWER).filter(has_text="Plans cost").first
    expect(answer).to_contain_text("Plans cost $5 or $10 a month.", timeout=30_000)
    assert page.locator(".katex").count() == 0                                  # no maths
    expect(answer.get_by_role("link", name="image: our chart")).to_be_visible()
    assert page.locator(f'img[src="{leak}"]').count() == 0
    code = page.locator('[data-testid="stCode"]:visible').filter(has_text="echo $HOME").first
    expect(code).to_be_visible()
    code.hover()
    expect(code.get_by_role("button", name=re.compile("copy", re.I))).to_be_visible()
    page.wait_for_timeout(500)
    assert fetched == []
    page.context.close()


def test_ctrl_enter_generates_and_streaming_shows_busy_then_stop(browser, url, fresh):
    from playwright.sync_api import expect

    fresh.set_latency(ttft_ms=50, tokens_per_s=4)        # ~25 s of answer: Stop lands mid-answer
    page = open_generate(browser, url)
    box = page.get_by_label("Prompt", exact=True)
    box.fill("Write a long friendly welcome email for new members of a rowing club")
    box.press("Control+Enter")                          # at once, no pause after typing
    go, stop = page.locator(".st-key-go button").first, page.locator(".st-key-stop button").first
    expect(go).to_be_disabled(timeout=30_000)           # busy while the answer streams
    expect(stop).to_be_enabled()
    assert stop.get_attribute("data-testid") == "stBaseButton-primary"
    expect(page.locator(ANSWER).filter(has_text="welcome email").first).to_be_visible(timeout=30_000)
    stop.click()
    expect(page.get_by_text("Stopped — the text above is what arrived.")).to_be_visible(timeout=15_000)
    expect(go).to_be_enabled()
    assert go.get_attribute("data-testid") == "stBaseButton-primary"
    page.context.close()


def test_times_are_in_the_browsers_zone(browser, url, fresh):
    from playwright.sync_api import expect

    page = open_generate(browser, url, timezone_id="Pacific/Kiritimati")
    page.get_by_label("Prompt", exact=True).fill("A tagline for a surf school")
    page.locator(".st-key-go button").click()
    expect(page.get_by_text("times in Pacific/Kiritimati")).to_be_visible(timeout=30_000)
    label = page.locator('[data-testid="stExpander"] summary').filter(has_text="surf school").first
    shown = re.search(r"(\d\d:\d\d:\d\d) · ", label.inner_text()).group(1)
    now = dt.datetime.now(ZoneInfo("Pacific/Kiritimati"))
    assert time_of_day_gap_s(shown, now) < 180, (label.inner_text(), now)
    page.context.close()


def test_ctrl_enter_right_after_typing_generates_every_time(browser, url, fresh):
    """Ten prompts, each typed and sent with Ctrl+Enter at once: ten answers, none lost."""
    from playwright.sync_api import expect

    page = open_generate(browser, url)
    fresh.reset_stats()
    box = page.get_by_label("Prompt", exact=True)
    rows = page.locator('[data-testid="stExpander"] summary').filter(has_text="flavour number")
    for i in range(10):
        box.fill(f"A name for ice-cream flavour number {i}")
        box.press("Control+Enter")
        expect(rows).to_have_count(i + 1, timeout=30_000)
        expect(rows.first).to_contain_text(f"flavour number {i}")      # newest first
        expect(page.locator(".st-key-go button")).to_be_enabled()
    assert fresh.stats()["chat_requests"] == 10                            # one request per press
    page.context.close()


def test_ctrl_enter_pressed_before_the_generate_button_is_drawn_still_generates(browser, url, fresh):
    """The scripts of the Generate button and of st.html elements are held back (as a slow
    first load holds them): the prompt box is there and takes text and Ctrl+Enter, the button
    is not, nor the page's own copy of the listener (an st.html script). Once the button is
    drawn, the press generates, once (two presses in the prompt, one elsewhere: one request)."""
    from playwright.sync_api import expect

    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    held = []
    button_js = re.compile(r"/static/js/(Button|Html)\.[\w-]+\.js$")
    page.route(button_js, lambda route: held.append(route))
    fresh.reset_stats()
    page.goto(url, wait_until="domcontentloaded")
    box = page.get_by_label("Prompt", exact=True)
    expect(box).to_be_visible(timeout=30_000)
    wait_idle(page)                                                   # the page ran and is drawn…
    kinds = lambda: {button_js.search(r.request.url).group(1) for r in held}  # noqa: E731
    deadline = time.monotonic() + 30
    while kinds() != {"Button", "Html"} and time.monotonic() < deadline:
        page.wait_for_timeout(50)               # (the route handler runs while Playwright waits)
    assert kinds() == {"Button", "Html"}
    assert page.locator(".st-key-go button").count() == 0             # …but for the Generate button
    box.fill("A slogan for a night bakery")
    box.press("Control+Enter")
    box.press("Control+Enter")                                        # impatient: a second press
    page.locator("body").press("Control+Enter")                       # and one outside the prompt
    page.wait_for_timeout(300)
    assert fresh.stats()["chat_requests"] == 0 and page.locator(".st-key-go button").count() == 0
    for route in held:
        route.continue_()
    page.unroute(button_js)
    rows = page.locator('[data-testid="stExpander"] summary').filter(has_text="night bakery")
    expect(rows).to_have_count(1, timeout=30_000)
    expect(page.locator(".st-key-go button")).to_be_enabled(timeout=30_000)
    page.wait_for_timeout(500)
    assert fresh.stats()["chat_requests"] == 1                          # one press, one request
    page.context.close()
