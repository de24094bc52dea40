"""What people read (core/display.py): safe answer Markdown, plain-word results, local times."""

from __future__ import annotations

import datetime as dt

from core.display import (duration, viewer_zone_key, money, outcome_words, prompt_changes, result_line, safe_markdown,
                          viewer_zone, zone_name)
from core.models import GenerationResult
from core.providers.base import Usage


def test_dollars_are_literal_outside_code_only():
    assert safe_markdown("$5 or $10") == r"\$5 or \$10"
    assert safe_markdown(r"already \$5") == r"already \$5"
    assert safe_markdown("run `echo $HOME` now") == "run `echo $HOME` now"
    fenced = "Costs $3:\n```bash\necho $PATH\n```\nthen $4"
    assert safe_markdown(fenced) == "Costs \\$3:\n```bash\necho $PATH\n```\nthen \\$4"
    streaming = "Costs $3:\n```bash\necho $PA"       # a fence not closed yet stays code
    assert safe_markdown(streaming) == "Costs \\$3:\n```bash\necho $PA"


def test_images_become_links_and_never_images():
    assert safe_markdown("see ![a chart](https://x.example/c.png)") == "see [image: a chart](https://x.example/c.png)"
    assert safe_markdown('![](http://x/y.png "title")') == "[image: untitled](http://x/y.png)"
    assert safe_markdown("![ref style][1]\n\n[1]: http://x/y.png") == "\\![ref style][1]\n\n[1]: http://x/y.png"
    assert "![" not in safe_markdown("[![badge](http://x/b.svg)](http://x)").replace("\\![", "")


def test_money_and_duration_read_plainly():
    assert [money(v) for v in (0, 0.00006, 0.0000604, 0.0123, 1.5, 1234.5, None)] == \
        ["$0", "$0.00006", "$0.00006", "$0.012", "$1.50", "$1,234.50", "unknown"]
    assert [duration(v) for v in (450, 1828, 125_000)] == ["450 ms", "1.8 s", "2 min 5 s"]


def test_result_line_in_plain_words():
    r = GenerationResult(usage=Usage(17, 95), cost=0.00006, latency_ms=1828, attempts=1)
    assert result_line(r) == "112 tokens (17 in, 95 out) · cost $0.00006 · 1.8 s · first try"
    r.attempts = 3
    assert result_line(r).endswith("after 2 retries")
    hit = GenerationResult(from_cache=True, cost_saved=0.0004, latency_ms=2, attempts=0)
    assert result_line(hit) == "From the saved answers (no cost; saved $0.0004) · 2 ms"
    assert outcome_words("circuit_open") == "not sent — the AI service is paused"
    assert outcome_words("error") == "failed" and outcome_words("ok") == ""


def test_viewer_zone_from_name_or_offset():
    assert zone_name(viewer_zone("Pacific/Kiritimati", -840)) == "Pacific/Kiritimati"
    zone = viewer_zone(None, -330)               # JavaScript: minutes behind UTC
    assert dt.datetime(2026, 1, 1, tzinfo=zone).utcoffset() == dt.timedelta(hours=5, minutes=30)
    assert viewer_zone("Not/AZone", None) == dt.timezone.utc


def test_prompt_changes_pair_each_edit():
    changes = prompt_changes("Could you please kindly write a poem?", "Write a poem?")
    assert changes and all(isinstance(a, str) and isinstance(b, str) for a, b in changes)
    assert any("please" in removed for removed, _ in changes)


def test_a_zone_picker_gets_a_name_even_from_an_offset():
    assert viewer_zone_key("Pacific/Kiritimati", -840) == "Pacific/Kiritimati"
    assert viewer_zone_key(None, -840) == "Etc/GMT-14"      # UTC+14
    assert viewer_zone_key(None, 300) == "Etc/GMT+5"        # UTC-5
    assert viewer_zone_key(None, -330) == "UTC" and viewer_zone_key(None, None) == "UTC"
