"""Budgets in PostgreSQL: one ledger for every replica (``GYROSCOPE_DATABASE_URL``).

The same checks as the file's ledger (core/budgets.py), over ``budget_ledger``,
``budget_holds`` and ``budget_settled`` (pg_migrations/0003_budgets.sql). A reservation is
one call of ``gyroscope_budget_reserve``: it locks the request's ledger rows in (scope,
period) order, checks ``spent + reserved + hold`` against every limit and adds the hold, or
adds nothing. One statement, so one round trip, and a row stays locked only while the
function runs and commits, never across the network: replicas reserving at once take turns,
and N replicas together never hold or spend past a limit. A reservation commits without
waiting for PostgreSQL's WAL flush (the rows' locks go at once, so replicas do not queue
behind each other's disk writes); a server crash (not a stop) can therefore lose the holds of
the last fraction of a second, whose requests then run unheld, and whose costs still count
when they settle.

Settlements go to a thread of their own (the request never waits), which writes whatever
has queued meanwhile in one call of ``gyroscope_budget_settle`` (committed without waiting
for the WAL flush, so the ledger rows' locks go at once), then makes them durable with a
synchronous write of its own row in ``budget_settlers`` (0006_budget_settle_flush.sql): a
settlement counts as written only after that, and one whose flush failed is written again. Each hold is settled once: its id is marked in
``budget_settled``, so writing a settlement twice (a journal replayed again) counts it once.

When PostgreSQL does not answer:
- a request that a budget applies to is **refused** (StorageError: 503 with Retry-After,
  nothing sent): the budget cannot be checked, and letting it through would spend money no
  limit holds back (each replica would guess alone). Requests no budget applies to are
  served as usual. Reservations have a connection of their own, which only the settler
  thread makes (again), every ``RECONNECT_S`` while the server is gone: a caller (an event
  loop) never waits for a connect, and while there is no connection it is refused at once;
- a settlement (the request was answered, its cost is known) goes to a journal file beside
  the history's spill journal and is written when PostgreSQL is back; its hold meanwhile
  keeps its share of the budget held, so the limit still holds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Callable

import psycopg
from ..budgets import Budgets
from ..errors import StorageError
from ..journal import SpillJournal
from .postgres import CONNECT_TIMEOUT_S, PgDatabase, _first_line

_log = logging.getLogger(__name__)

_RESERVE = ("SELECT * FROM gyroscope_budget_reserve(%s::text[], %s::text[], %s::float8[], "
            "%s::float8, %s::float8, %s, %s::bigint)")
_SETTLE = ("SELECT gyroscope_budget_settle(%s::bigint[], %s::float8[], %s::int[], %s::text[], "
           "%s::text[], %s::float8)")
_SWEEP = "SELECT gyroscope_budget_sweep(%s::float8)"
_FLUSH = ("INSERT INTO budget_settlers (owner, at) VALUES (%s, %s) ON CONFLICT (owner) "
          "DO UPDATE SET at = excluded.at")
_OWNER = f"{socket.gethostname()}:{os.getpid()}"
REPLAY_S = 1.0            # how often settlements waiting in the journal are tried again
OUTAGE_RETRY_S = 2.0      # Retry-After of a request refused because the ledger is unreachable
RECONNECT_S = 0.5         # while PostgreSQL is gone, how often the settler tries to connect
SETTLE_CHUNK = 1000
SETTLED_KEEP_S = 86400.0  # how long a settled hold's mark is kept (a replay within it counts once)
PRUNE_EVERY_S = 600.0     # how often the settler prunes older marks (per replica)


def journal_path(history_spill: str | Path) -> Path:
    """Where settlements wait while PostgreSQL is gone: beside the history's spill journal."""
    path = Path(history_spill)
    return path.with_name(f"{path.stem}-budgets{path.suffix or '.jsonl'}")


class PgBudgets(Budgets):
    """Budgets over a PgDatabase: reservations on the calling thread (one round trip on a
    connection of their own), settlements on a thread of their own, spilled to ``journal``
    while the server is gone."""

    # How long a reservation waits for the ledger rows (another replica's reservation or
    # settlement holds them for microseconds, milliseconds on a starved machine) or for this
    # replica's connection. Longer than the file's BUSY_S: a wait here ends when a short
    # function ends, where the file's waits on whole transactions; past it, something is
    # stuck (a session holding the rows), and the request is refused as busy.
    LOCK_WAIT_S = 0.5

    def __init__(self, db: PgDatabase, history=None, clock: Callable[[], float] | None = None,
                 journal: str | Path | None = None) -> None:
        super().__init__(db, history, clock)
        self.journal = SpillJournal(journal) if journal is not None else None
        self._unsaved: list[tuple] = []     # no journal (or it failed): kept here
        self._cond = threading.Condition()
        self._queue: list[tuple] = []   # (hold id, cost, its rows)
        self._queued = self._written = 0
        self._closing = False
        self._replay_at = 0.0
        self._replaying = threading.Lock()
        self.settles_lost = 0           # settlements neither written nor kept (logged)
        self._lock_timeout = f"{max(1, round(self.LOCK_WAIT_S * 1000))}ms"
        # Connections of their own, not the pool's: after an outage the pool reconnects with
        # a growing backoff (seconds), and every budgeted request would be refused meanwhile.
        # The reservations' connection is (re)made by the settler thread, never by a caller
        # (an event loop must not wait for a connect); while there is none, they fail at once.
        self._rlock = threading.Lock()
        self._rconn: psycopg.Connection | None = None
        self._sconn: psycopg.Connection | None = None     # the settler's
        self._swrite = threading.Lock()
        self._connect_at = 0.0
        self._prune_at = time.monotonic() + PRUNE_EVERY_S / 10
        self._connect_reserver()
        self._thread = threading.Thread(target=self._run, name="gyroscope-pg-budgets", daemon=True)
        self._thread.start()

    # -- reserving (on the caller's thread: one statement) ------------------------------------
    def _hold(self, bounds: list, amount: float, now: float, sweep: bool):
        # Rows in (scope, period) code point order, PostgreSQL's COLLATE "C" order: every
        # function locks ledger rows in it.
        order = sorted(range(len(bounds)), key=lambda i: (bounds[i][0].scope, bounds[i][1]))
        rows = [bounds[i] for i in order]
        with self._reserver() as conn:
            if sweep:       # its own statement: its locks are gone before the reservation's
                gone = conn.execute(_SWEEP, (now,)).fetchone()[0]
                if gone:
                    _log.warning("Gave back %d budget hold(s) never settled (a replica stopped "
                                 "mid-request?)", gone)
            hold_id = secrets.randbits(63)       # not a sequence: see 0003_budgets.sql
            ok, spent, held = conn.execute(_RESERVE, (
                [lim.scope for lim, _, _, _ in rows], [key for _, key, _, _ in rows],
                [float(lim.usd) for lim, _, _, _ in rows], float(amount), now + self.HOLD_TTL_S,
                self._lock_timeout, hold_id)).fetchone()
        had = [(0.0, 0.0)] * len(bounds)        # back in the plan's order
        for j, i in enumerate(order):
            had[i] = (spent[j], held[j])
        if not ok:      # the first limit passed, in the plan's order (the same sum as the SQL's)
            passed = [i for i, ((lim, _, _, _), (s, h)) in enumerate(zip(bounds, had))
                      if s + h + amount > lim.usd + 1e-12] or [0]
            lim, _, _, end = bounds[passed[0]]
            return (lim, *had[passed[0]], end), None
        return None, ([s + h + amount for s, h in had], hold_id)

    def _read(self, scope: str, key: str) -> tuple[float, float]:
        try:
            with self._reserver(wait_s=CONNECT_TIMEOUT_S) as conn:
                row = conn.execute("SELECT spent, reserved FROM budget_ledger WHERE scope = %s "
                                   "AND period = %s", (scope, key)).fetchone()
        except StorageError as exc:
            raise StorageError(f"The budgets' spend could not be read: the PostgreSQL database "
                               f"{self.db.path} did not answer. Try again in a moment.",
                               retry_in_s=OUTAGE_RETRY_S, detail=exc.detail) from exc
        return (row[0], row[1]) if row else (0.0, 0.0)

    @contextlib.contextmanager
    def _reserver(self, wait_s: float | None = None):
        """The reservations' connection, for one statement or two; PostgreSQL's errors as
        StorageError saying that nothing was sent."""
        if not self._rlock.acquire(timeout=self.LOCK_WAIT_S if wait_s is None else wait_s):
            raise StorageError("The budget could not be checked in time: other requests of this "
                               "replica are checking theirs. Nothing was sent; try again in a "
                               "moment.", retry_in_s=1.0)
        try:
            if self._rconn is None:
                raise self._unchecked(None)
            try:
                yield self._rconn
            except psycopg.errors.LockNotAvailable as exc:
                raise StorageError(
                    "The budget could not be checked: its ledger in PostgreSQL is locked by "
                    "another session. Nothing was sent; try again in a moment.", retry_in_s=1.0,
                    detail=_first_line(exc)) from exc
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                with contextlib.suppress(Exception):
                    self._rconn.close()
                self._rconn = None
                with self._cond:            # the settler thread connects again
                    self._cond.notify()
                raise self._unchecked(exc) from exc
            except psycopg.Error as exc:
                raise StorageError(f"The budget could not be checked: the PostgreSQL database "
                                   f"{self.db.path} failed ({_first_line(exc)}). Nothing was sent.",
                                   detail=_first_line(exc)) from exc
        finally:
            self._rlock.release()

    def _unchecked(self, exc: BaseException | None) -> StorageError:
        why = f" ({_first_line(exc)})" if exc is not None else " a moment ago"
        return StorageError(
            f"The budget could not be checked: the PostgreSQL database {self.db.path} that keeps "
            f"it did not answer{why}. Nothing was sent; try again in a moment. Requests no "
            "budget applies to are still served.", retry_in_s=OUTAGE_RETRY_S,
            detail=_first_line(exc) if exc is not None else None)

    def _connect_reserver(self) -> bool:
        """Make the reservations' connection if there is none (not on a caller's thread)."""
        if self._rconn is not None:
            return True
        try:
            conn = _own_connection(self.db.url)
        except psycopg.Error:
            return False
        with self._rlock:
            self._rconn = conn
        return True

    # -- settling (on the settler thread) --------------------------------------------------
    def settle(self, hold, cost: float) -> None:
        """Queue the hold's settlement to its real cost (never waits)."""
        if hold is None or hold.settled:
            return
        hold.settled = True
        with self._cond:
            self._queue.append((hold.id, float(cost), hold.rows))
            self._queued += 1
            self._cond.notify()

    @property
    def settles_waiting(self) -> int:
        """Settlements answered but not yet in PostgreSQL (journal and memory)."""
        return (self.journal.pending if self.journal is not None else 0) + len(self._unsaved)

    def health(self) -> dict:
        """For /api/health: "ok", "spilling" (settlements wait for PostgreSQL) or
        "unreachable" (budgeted requests are refused until it answers)."""
        waiting = self.settles_waiting
        state = "unreachable" if self._rconn is None else "spilling" if waiting else "ok"
        out = {"budgets": state, "budget_settlements_waiting": waiting}
        if state == "unreachable":
            out["budgets_message"] = (f"The PostgreSQL database {self.db.path} that keeps the "
                                      "budgets does not answer: requests a budget applies to are "
                                      "refused until it does.")
        elif state == "spilling":
            out["budgets_message"] = (f"{waiting} budget settlement(s) wait for PostgreSQL in "
                                      f"{self.journal.path if self.journal else 'memory'}.")
        return out

    def flush(self, timeout: float = 30) -> None:
        """Wait until the settlements queued so far are written (or, the server gone, kept)."""
        with self._cond:
            target = self._queued
            self._cond.wait_for(lambda: self._written >= target, timeout)

    def replay(self) -> bool:
        """Write the settlements that waited for PostgreSQL; True when none waits any more."""
        with self._replaying:
            return self._replay()

    def _replay(self) -> bool:
        self._replay_at = time.monotonic() + REPLAY_S
        rows, upto = self.journal.read() if self.journal is not None else ([], 0)
        waiting = [(r["hold"], float(r["cost"]), tuple(tuple(x) for x in r["rows"])) for r in rows
                   if isinstance(r.get("hold"), int) and isinstance(r.get("cost"), (int, float))
                   and isinstance(r.get("rows"), list)]
        unsaved = list(self._unsaved)
        try:
            self._write(waiting + unsaved)
        except StorageError:
            return False
        del self._unsaved[:len(unsaved)]
        if self.journal is not None and upto:
            self.journal.consume(upto)
        if waiting or unsaved:
            _log.info("Wrote %d budget settlement(s) that waited for PostgreSQL", len(waiting) + len(unsaved))
        return True

    def close(self) -> None:
        """Write what is queued, then stop the settler thread and close the connections."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=CONNECT_TIMEOUT_S * 3)
        with self._rlock:
            for conn in (self._rconn, self._sconn):
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
            self._rconn = self._sconn = None
        if self.journal is not None:
            self.journal.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._queue or self._closing or self._connect_due() or self._replay_due()):
                    self._cond.wait(RECONNECT_S if self._rconn is None else
                                    REPLAY_S if self.settles_waiting else None)
                batch, self._queue = self._queue, []
                closing = self._closing
            if not closing and self._connect_due() and not self._connect_reserver():
                self._connect_at = time.monotonic() + RECONNECT_S
            if batch:
                try:
                    self._write(batch)
                except StorageError as exc:
                    self._keep(batch, exc)
                except Exception as exc:  # noqa: BLE001 - a bug must not stop the thread
                    _log.exception("Writing budget settlements failed")
                    self._keep(batch, StorageError(f"Writing budget settlements failed ({exc})."))
                with self._cond:
                    self._written += len(batch)
                    self._cond.notify_all()
            if self._replay_due():
                try:
                    self.replay()
                except Exception:  # noqa: BLE001 - tried again in REPLAY_S
                    _log.exception("Replaying budget settlements failed")
            if time.monotonic() >= self._prune_at:
                self.prune()
            if closing:
                with self._cond:
                    if not self._queue:
                        return

    def _connect_due(self) -> bool:
        return self._rconn is None and time.monotonic() >= self._connect_at

    def _replay_due(self) -> bool:
        return bool(self.settles_waiting) and time.monotonic() >= self._replay_at

    def _write(self, settles: list[tuple]) -> None:
        """Settle holds in PostgreSQL, (id, cost, rows) each, written once per id; a
        connection broken meanwhile (the server restarted) is made again once."""
        once = sorted({h: (h, c, rows) for h, c, rows in reversed(settles)}.values())
        now = self.clock()
        with self._swrite:
            for retry in (False, True):
                fresh = self._sconn is None
                try:
                    if fresh:
                        self._sconn = _own_connection(self.db.url)
                    for i in range(0, len(once), SETTLE_CHUNK):
                        self._sconn.execute(_SETTLE, (*_settle_args(once[i:i + SETTLE_CHUNK]), now))
                    # The settlements committed without waiting for the disk; this commit
                    # waits, for them too, and holds no lock another replica waits for.
                    self._sconn.execute(_FLUSH, (_OWNER, now))
                    return
                except psycopg.Error as exc:
                    gone = isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))
                    if gone and self._sconn is not None:
                        with contextlib.suppress(Exception):
                            self._sconn.close()
                        self._sconn = None
                    if not gone or fresh or retry:
                        raise StorageError(f"The PostgreSQL database {self.db.path} did not take "
                                           f"budget settlements ({_first_line(exc)}).",
                                           detail=_first_line(exc)) from exc

    def prune(self) -> int:
        """Drop the marks of holds settled over SETTLED_KEEP_S ago (on the settler thread, at
        most every PRUNE_EVERY_S: never on a request's path); how many went."""
        self._prune_at = time.monotonic() + PRUNE_EVERY_S
        with self._swrite:
            try:
                if self._sconn is None:
                    self._sconn = _own_connection(self.db.url)
                return self._sconn.execute("DELETE FROM budget_settled WHERE at < %s",
                                           (self.clock() - SETTLED_KEEP_S,)).rowcount
            except psycopg.Error as exc:      # tried again next time; nothing depends on it
                _log.info("Pruning settled budget holds failed: %s", _first_line(exc))
                if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
                    with contextlib.suppress(Exception):
                        self._sconn.close()
                    self._sconn = None
                return 0

    def _keep(self, settles: list[tuple], exc: StorageError) -> None:
        """Settlements PostgreSQL did not take: into the journal (else memory) until it does."""
        self._replay_at = time.monotonic() + REPLAY_S
        if self.journal is not None:
            try:
                self.journal.append([{"hold": h, "cost": c, "rows": rows} for h, c, rows in settles])
                _log.warning("%s %d settlement(s) wait in %s.", exc.user_message, len(settles),
                             self.journal.path)
                return
            except StorageError as journal_exc:
                _log.error("%s", journal_exc.user_message)
        if len(self._unsaved) + len(settles) > 100_000:      # bounded: memory is not a disk
            self.settles_lost += len(settles)
            _log.error("%d budget settlement(s) lost: PostgreSQL and the journal both failed; "
                       "their holds are given back when they expire.", len(settles))
            return
        self._unsaved.extend(settles)



def _own_connection(url: str) -> psycopg.Connection:
    """A connection for budgets alone. A server that stops answering without closing it (a
    network cut) fails it within seconds instead of leaving a caller waiting on TCP's
    defaults (hours): unacknowledged data for 3 s, or an idle link not answering keepalives."""
    return psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                           application_name="gyroscope-budgets", tcp_user_timeout=3000,
                           keepalives=1, keepalives_idle=10, keepalives_interval=2,
                           keepalives_count=3)


def _settle_args(settles: list[tuple]) -> tuple:
    """gyroscope_budget_settle's arrays: ids, costs, then each hold's rows (its index, scope,
    period)."""
    index, scopes, periods = [], [], []
    for i, (_, _, rows) in enumerate(settles, 1):
        for scope, period in rows:
            index.append(i)
            scopes.append(scope)
            periods.append(period)
    return [h for h, _, _ in settles], [c for _, c, _ in settles], index, scopes, periods
