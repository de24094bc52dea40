"""PostgreSQL (psycopg 3 with a pool): the same writer contract as core/db.py's SQLite file.

``PgDatabase`` offers what History and the settings call on ``Database``: ``submit`` /
``post`` / ``write`` / ``flush`` go to one writer thread that commits a batch of writes in
one transaction (group commit: an urgent write starts a commit at once when the writer is
idle, writes arriving meanwhile share the next one; a failing write is rerun alone inside a
savepoint so it fails alone). A write that fails because the server is gone fails its whole
batch with StorageError (History then spools the rows, see core/journal.py); the writer
reconnects for the next batch. Reads take a pooled connection.

Write functions are the SQLite ones: the connection they get (``PgConn``) takes ``?``
placeholders and bools, and its rows answer ``row[0]`` and ``row["name"]`` like sqlite3.Row.

Migrations: numbered ``pg_migrations/NNNN_name.sql`` files, each applied once in its own
transaction and recorded in ``gyroscope_migrations``; replicas starting together take an
advisory lock, so only one applies them.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import re
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from ..config import redact_url
from ..errors import StorageError
from ..write_queue import WriteQueue, settle

LINGER_S = 0.05
CONNECT_TIMEOUT_S = 3
NOWAIT_TIMEOUT_S = 0.2     # reads on the event loop: how long to wait for a pooled connection
DOWN_S = 1.0               # after a failed read, event-loop reads fail at once for this long
MIGRATIONS = Path(__file__).with_name("pg_migrations")
_MIGRATION_LOCK = 0x6779726F   # pg_advisory_lock key ("gyro"): one replica migrates at a time
_QUOTED = re.compile(r"('(?:[^']|'')*')")


def is_postgres_url(url: str | None) -> bool:
    return bool(url) and url.split("://", 1)[0] in ("postgresql", "postgres")


@functools.lru_cache(maxsize=512)
def pg_sql(sql: str) -> str:
    """SQLite-style SQL for psycopg: ``?`` outside string literals becomes ``%s``, ``%`` is
    escaped, and ``INSERT OR IGNORE INTO … VALUES (…)`` becomes ``… ON CONFLICT DO NOTHING``."""
    if sql.lstrip().upper().startswith("INSERT OR IGNORE INTO"):
        sql = sql.lstrip()[:6] + sql.lstrip()[16:] + " ON CONFLICT DO NOTHING"
    parts = _QUOTED.split(sql.replace("%", "%%"))
    return "".join(p if i % 2 else p.replace("?", "%s") for i, p in enumerate(parts))


def _params(params: Any) -> Any:
    # Booleans are 0/1 integers in these tables (as in SQLite).
    if isinstance(params, dict):
        return {k: int(v) if isinstance(v, bool) else v for k, v in params.items()}
    return [int(v) if isinstance(v, bool) else v for v in params or ()]


class Row(tuple):
    """A row readable by position and by column name (like sqlite3.Row)."""

    __slots__ = ()
    _index: dict[str, int] = {}

    def __getitem__(self, key):
        if isinstance(key, str):
            return tuple.__getitem__(self, self._index[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._index)


def _row_factory(cursor):
    names = [c.name for c in cursor.description or ()]
    cls = type("Row", (Row,), {"__slots__": (), "_index": {n: i for i, n in enumerate(names)}})
    return cls


class PgConn:
    """A psycopg connection that takes the SQLite write functions' SQL."""

    __slots__ = ("raw",)

    def __init__(self, raw: psycopg.Connection) -> None:
        self.raw = raw

    def execute(self, sql: str, params: Any = ()):
        return self.raw.execute(pg_sql(sql), _params(params))

    def executemany(self, sql: str, seq) -> psycopg.Cursor:
        cur = self.raw.cursor()
        cur.executemany(pg_sql(sql), [_params(p) for p in seq])
        return cur


class DatabaseUnreachable(StorageError):
    """The PostgreSQL server cannot be reached (gone, refusing connections, a broken link)."""


def pg_error(exc: BaseException, where: str) -> StorageError:
    """A psycopg error as a StorageError that names the (redacted) server and what to do."""
    if isinstance(exc, (psycopg.OperationalError, PoolTimeout, psycopg.InterfaceError)):
        msg = (f"The PostgreSQL database {where} cannot be reached ({_first_line(exc)}). Start it "
               "or fix GYROSCOPE_DATABASE_URL; history waits in the spill journal meanwhile.")
        return DatabaseUnreachable(msg, detail=_first_line(exc))
    else:
        msg = f"The PostgreSQL database {where} failed: {_first_line(exc)}."
    return StorageError(msg, detail=_first_line(exc))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def _connect(url: str) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                           row_factory=_row_factory, application_name="gyroscope")


def migrate(conn: psycopg.Connection) -> list[str]:
    """Apply the migrations this database has not had yet; their names."""
    applied = []
    conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS gyroscope_migrations (name text PRIMARY KEY, "
                     "applied_at timestamptz NOT NULL DEFAULT now())")
        done = {r[0] for r in conn.execute("SELECT name FROM gyroscope_migrations")}
        for path in sorted(MIGRATIONS.glob("[0-9][0-9][0-9][0-9]_*.sql")):
            if path.stem in done:
                continue
            with conn.transaction():
                conn.execute(path.read_text())
                conn.execute("INSERT INTO gyroscope_migrations (name) VALUES (%s)", (path.stem,))
            applied.append(path.stem)
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
    return applied


class PgDatabase(WriteQueue):
    """A PostgreSQL database with migrations applied, a writer thread and a read pool."""

    def __init__(self, url: str, *, linger_s: float = LINGER_S, pool_size: int = 8) -> None:
        self.url = url
        self.path = redact_url(url)        # what messages name: never the password
        self.linger_s = linger_s
        try:
            with _connect(url) as conn:
                migrate(conn)
        except psycopg.Error as exc:
            raise pg_error(exc, self.path) from exc
        self._pool = ConnectionPool(url, min_size=1, max_size=pool_size, open=True, name="gyroscope",
                                    kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S,
                                            "row_factory": _row_factory,
                                            "application_name": "gyroscope"})
        self._down_until = 0.0     # the server failed a read recently (monotonic time)
        self._start_writer("gyroscope-pg-writer")
        atexit.register(self.close)

    # -- reading -----------------------------------------------------------------------
    def query(self, sql: str, params: Any = (), *, timeout: float = 10.0) -> list[dict]:
        """Rows of a read query as dicts (SQLite-style ``?`` placeholders). A pooled
        connection the server dropped (it restarted) fails the read once: the pool's idle
        connections are checked then (broken ones replaced) and the read is tried once more."""
        for attempt in (1, 2):
            try:
                with self._pool.connection(timeout=timeout) as conn:
                    return [dict(zip(r.keys(), r)) for r in PgConn(conn).execute(sql, params)]
            except (psycopg.Error, PoolTimeout) as exc:
                broken = isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))
                if broken and attempt == 1 and time.monotonic() >= self._down_until:
                    with contextlib.suppress(psycopg.Error, PoolTimeout):
                        self._pool.check()
                    continue
                if broken or isinstance(exc, PoolTimeout):
                    self._down_until = time.monotonic() + DOWN_S
                raise pg_error(exc, self.path) from exc
        raise AssertionError("not reached")

    def query_one(self, sql: str, params: Any = (), *, timeout: float = 10.0) -> dict | None:
        rows = self.query(sql, params, timeout=timeout)
        return rows[0] if rows else None

    def query_one_nowait(self, sql: str, params: Any = ()) -> dict | None:
        """``query_one`` for the event loop: it gives up quickly when no connection is to be
        had, and for DOWN_S after a failure it fails at once (callers have an answer without
        the database: the last settings snapshot), so a server that is gone costs the loop
        one short wait a second, not one per read."""
        if time.monotonic() < self._down_until:
            raise StorageError(f"The PostgreSQL database {self.path} did not answer a moment ago.")
        return self.query_one(sql, params, timeout=NOWAIT_TIMEOUT_S)

    # -- writing -----------------------------------------------------------------------
    def commit_here(self, fn) -> bool:
        """Never inline: a commit is a network round trip, which must not run on the event loop."""
        return False

    def write_now(self, fn, busy_timeout_s: float = 1.0) -> Any:
        """Run a short write in its own transaction on this thread, at once."""
        try:
            with self._pool.connection(timeout=busy_timeout_s) as conn:
                with conn.transaction():
                    return fn(PgConn(conn))
        except (psycopg.Error, PoolTimeout) as exc:
            raise pg_error(exc, self.path) from exc

    def flush(self, timeout: float = 30) -> None:
        """Wait until everything queued so far is committed (or failed)."""
        if self._pending or self._busy:
            try:
                self.write(lambda conn: None, timeout)
            except StorageError:
                pass       # the server is gone: readers see what is there

    def close(self) -> None:
        """Commit what is queued, then stop the writer and the pool."""
        if self._closed:
            return
        self._stop_writer()
        self._pool.close()

    _driver_error = psycopg.Error

    def _open_writer(self, conn: psycopg.Connection | None) -> psycopg.Connection:
        return conn if conn is not None and not conn.closed else _connect(self.url)

    def _writer_error(self, exc: BaseException) -> BaseException:
        return pg_error(exc, self.path) if isinstance(exc, (psycopg.Error, PoolTimeout)) else exc

    def _run_batch(self, conn: psycopg.Connection, batch: list) -> None:
        """One transaction for the batch; if a write raises, rerun each in a savepoint."""
        pg = PgConn(conn)
        try:
            with conn.transaction():
                results = [(target, fn(pg), None) for fn, target, _ in batch]
        except (psycopg.OperationalError, psycopg.InterfaceError):
            raise                   # the server or the connection is gone: the batch fails
        except Exception:  # noqa: BLE001 - redone one by one below
            results = []
            with conn.transaction():
                for fn, target, _ in batch:
                    try:
                        with conn.transaction():
                            results.append((target, fn(pg), None))
                    except (psycopg.OperationalError, psycopg.InterfaceError):
                        raise
                    except Exception as exc:  # noqa: BLE001 - handed to the caller
                        if isinstance(exc, psycopg.Error):
                            exc = pg_error(exc, self.path)
                        results.append((target, None, exc))
        for target, value, exc in results:
            settle(target, value, exc)
