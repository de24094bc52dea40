"""Real PostgreSQL servers for the tests: the machine's (127.0.0.1:5432) when it answers, else
a temporary cluster made with initdb and pg_ctl; a uniquely named database per test."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

MACHINE_URL = os.environ.get("GYROSCOPE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def pg_bin(name: str) -> str | None:
    """A PostgreSQL server binary on PATH or under /usr/lib/postgresql/*/bin."""
    found = shutil.which(name)
    if found:
        return found
    for path in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True):
        return path
    return None


def answers(url: str) -> bool:
    import psycopg
    try:
        with psycopg.connect(url, connect_timeout=2, autocommit=True) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TempCluster:
    """A throwaway cluster in a temp dir, on a free port, trust auth (stop() removes it)."""

    def __init__(self) -> None:
        self.initdb, self.pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
        if not (self.initdb and self.pg_ctl):
            raise FileNotFoundError("initdb / pg_ctl not found")
        self.dir = Path(tempfile.mkdtemp(prefix="gyro-pg-"))
        self.port = free_port()
        self.data = self.dir / "data"
        # initdb refuses to run as root: run the server as the postgres user then.
        self.user = None
        if os.geteuid() == 0:
            self.user = "postgres"
            entry = pwd.getpwnam(self.user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self._run(self.initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        cmd = list(args)
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)

    def start(self) -> None:
        self._run(self.pg_ctl, "-D", str(self.data), "-w", "-l", str(self.dir / "log"),
                  "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(self.pg_ctl, "-D", str(self.data), "-w", "-m", mode, "stop")

    def remove(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def own_cluster(purpose: str = "stop and start"):
    """A started cluster of our own (never the machine's server, which a test must not stop),
    removed afterwards; skips, saying why, where initdb/pg_ctl are not installed."""
    import pytest
    if not (pg_bin("initdb") and pg_bin("pg_ctl")):
        pytest.skip(f"initdb/pg_ctl are not installed (apt-get install postgresql): no cluster to {purpose}.")
    cluster = TempCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.remove()


def with_database(url: str, name: str) -> str:
    return url.rsplit("/", 1)[0] + "/" + name


def create_database(server_url: str) -> str:
    """A new uniquely named database on the server; its URL."""
    import psycopg
    name = f"gyro_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return with_database(server_url, name)


def drop_database(server_url: str, url: str) -> None:
    import psycopg
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
