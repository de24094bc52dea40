"""One Gyroscope replica for tests: the API (as streamlit_app.py serves it, behind the
guard) on a free port, configured by the environment it is started with
(GYROSCOPE_DB, OPENAI_BASE_URL, GYROSCOPE_REDIS_URL, ...). Prints its port, then serves
until its stdin closes (the test ends) or it is killed.

    python tests/replica.py
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uvicorn  # noqa: E402

from core import service  # noqa: E402
from core.api import asgi_app  # noqa: E402


def main() -> None:
    gyro = service.default_service()        # built before serving: the first request is not slow
    if os.environ.get("GYROSCOPE_TEST_SETTINGS_TTL_S"):
        # How long this replica trusts its settings cache: a test sets it long to show that a
        # change reached it by the Redis announcement, not by the cache running out.
        gyro.settings.ttl = float(os.environ["GYROSCOPE_TEST_SETTINGS_TTL_S"])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(asgi_app(), log_level="warning"))
    threading.Thread(target=lambda: (sys.stdin.read(), setattr(server, "should_exit", True)),
                     daemon=True).start()
    sock.listen(2048)      # connections wait in the backlog until uvicorn accepts them
    print(sock.getsockname()[1], flush=True)
    server.run(sockets=[sock])
    gyro.close()


if __name__ == "__main__":
    main()
