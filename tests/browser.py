"""Browser test support: `streamlit run` on a free port, and Debian's Chromium via Playwright."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
# Browser tests run wherever Debian's chromium is installed (CI installs it).
needs_chromium = [pytest.mark.browser,
                  pytest.mark.skipif(not shutil.which(CHROMIUM), reason="Debian's chromium is not installed")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def streamlit_app(tmp: Path, *, unset: tuple[str, ...] = (), script: Path | str = "streamlit_app.py",
                  **env_vars: str):
    """`streamlit run streamlit_app.py` (or ``script``) with a database in ``tmp``; yields its
    URL. The app gets this environment without an OpenAI key or URL (nor the names in
    ``unset``), plus ``env_vars``."""
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", *unset)}
    env.update(GYROSCOPE_DB=str(tmp / "app.db"), **env_vars)
    log = open(tmp / "streamlit.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(script),
                             "--server.port", str(port), "--server.headless", "true",
                             "--browser.gatherUsageStats", "false"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    base = env_vars.get("STREAMLIT_SERVER_BASE_URL_PATH", "").strip("/")   # served under /base
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"{url}{'/' + base if base else ''}/_stcore/health",
                                          timeout=1).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("streamlit run did not serve /_stcore/health: " + (tmp / "streamlit.log").read_text())
        yield url
    finally:
        stop(proc)
        log.close()


def stop(proc: subprocess.Popen, grace: float = 15) -> None:
    """Ask a child process to end; kill it if it has not within ``grace`` seconds."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()


@contextlib.contextmanager
def chromium():
    """A headless Debian Chromium driven by Playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def wait_idle(page, timeout: float = 30_000) -> None:
    """Wait until the app's script has run and stopped (widgets answer keys from then on)."""
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=timeout)
