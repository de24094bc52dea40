"""Start the simulator in its own process for benchmarks (so it does not share our GIL)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def simulator_process(ttft_ms: float = 0, tokens_per_s: float = 0):
    """Yield the base URL of a simulator running in a child process."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "core", "simulator", "--port", str(port),
                             "--ttft-ms", str(ttft_ms), "--tokens-per-s", str(tokens_per_s)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(base + "/models", timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)
