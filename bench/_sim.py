"""Start the simulator in its own process for benchmarks (so it does not share our GIL)."""

from __future__ import annotations

import contextlib
import os
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


class SimulatorURL(str):
    """The base URL of a simulator process, with its ``pid``."""

    pid: int


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def simulator_process(ttft_ms: float = 0, tokens_per_s: float = 0):
    """Yield the base URL of a simulator running in a child process (a SimulatorURL: its
    ``pid`` tells process_cpu_s which process to read)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "core", "simulator", "--port", str(port),
                             "--ttft-ms", str(ttft_ms), "--tokens-per-s", str(tokens_per_s)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = SimulatorURL(f"http://127.0.0.1:{port}/v1")
    base.pid = proc.pid
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
