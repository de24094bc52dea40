"""Runs a job's rows through the one pipeline (``Gyroscope.agenerate``, source ``batch``)
with bounded concurrency, keeping the ledger up to date.

What a failed row means for the job:
- breaker open (CircuitOpen, or a failure that opened it): the row goes back to pending
  uncounted and the job *waits* until the breaker's next probe, then goes on by itself;
- the upstream or pacing asks to wait past the deadline (RetryLater): the same, for that long;
- quota exhausted, the key refused or a spending budget used up: the row goes back and the
  job *pauses* (every row would fail the same way) with the reason in its note;
- a transient failure (5xx, 429, timeout, connection) after the pipeline's own retries:
  the row goes back and is tried again later, up to ``batch.row_attempts`` runs;
- anything else (a bad request, a prompt too long, an unknown model): the row fails with
  the message the user would see.

The ledger's database unreachable (PostgreSQL gone): the job *pauses* by itself. No row is
sent or claimed; rows in flight finish, and their results go to the spill journal with their
claim (PgLedger.done). The runner retries the database every ``DB_RETRY_S``; once it answers,
the journal is replayed first (so those rows are done and never sent again), then the rows
this runner still holds are renewed (``Ledger.rejoin``) and the job goes on.

The cost cap counts what done rows cost plus the *maximum* cost of every row in flight: a
row whose maximum would pass the cap is not sent, and the job stops as ``capped``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading

from .. import errors, portal
from ..models import GenerationRequest
from .ledger import JobBusy, ledger_for, owner_id

POLL_S = 0.25           # how often a pause or cancel from elsewhere (the page) is looked for
RENEW_S = 5.0           # how often the job's lease is renewed
MAX_HOLD_STEP_S = 1.0   # a wait for the breaker is taken in steps, so a pause is noticed
DB_RETRY_S = 2.0        # while the ledger's database is unreachable, how often it is retried
# Back from an outage, leases of other runners' rows ran out meanwhile (their clocks went on):
# for this long only pending rows are claimed, so those runners, back too, record the answers
# they kept in their journal before their rows are taken (and sent again).
REJOIN_GRACE_S = RENEW_S + 2 * DB_RETRY_S
_log = logging.getLogger(__name__)


class JobRunner:
    """One run of one job in this process (``run`` is a coroutine on any event loop)."""

    def __init__(self, gyro, job_id: str, concurrency: int | None = None) -> None:
        self.gyro = gyro
        self.job_id = job_id
        self.ledger = ledger_for(gyro)
        self.owner = owner_id()
        self.concurrency = concurrency
        self.finished = threading.Event()
        self.final: str | None = None
        self.error: Exception | None = None
        self.requeued_at_start = 0
        self._hold_until = 0.0
        self._stop_note: str | None = None
        self._exhausted = False
        self._db_down: str | None = None       # why the job is paused for its database
        self.outages = 0                       # how many times it paused for it
        self._reclaim_after = 0.0              # (monotonic) after an outage: see REJOIN_GRACE_S
        self._task: asyncio.Task | None = None

    # -- the loop ------------------------------------------------------------------------------
    async def run(self) -> str:
        """Run until no row is left, or a pause, cancel, cost cap or Ctrl-C; the final status."""
        self._task = asyncio.current_task()
        clock, ledger = self.gyro.clock, self.ledger
        status, note = "paused", "interrupted"
        tasks: dict[asyncio.Task, dict] = {}
        ready: collections.deque[dict] = collections.deque()    # claimed, not sent yet
        claim: asyncio.Task | None = None                       # a claim on its way
        wanted = 0
        try:
            self.requeued_at_start = await portal.off_loop(ledger.take, self.job_id, self.owner)
        except JobBusy as exc:      # another live process runs it: leave it alone
            self.error, self.final = exc, "busy"
            self.finished.set()
            return "busy"
        try:
            job = await portal.off_loop(ledger.job, self.job_id)
            concurrency = (self.concurrency or job["concurrency"]
                           or self.gyro.settings.get("batch.concurrency"))
            cap = job["max_cost"] or None
            spent = await portal.off_loop(ledger.spent, self.job_id)
            in_flight_max = 0.0
            capped = waiting = False
            next_poll = next_renew = clock.monotonic()
            while True:
                now = clock.monotonic()
                if now >= next_poll:
                    next_poll = now + POLL_S
                    asked = self._asked()
                    if asked in ("paused", "cancelled"):
                        status, note = asked, None
                        break
                if self._stop_note:
                    status, note = "paused", self._stop_note
                    break
                if now >= next_renew and not self._db_down:
                    next_renew = now + RENEW_S
                    try:                # the heartbeat: this runner's rows stay its own
                        await ledger.renew(self.job_id, self.owner)
                    except errors.StorageError as exc:
                        self._database_gone(exc)
                hold = self._hold_until - clock.time()
                if hold > 0 and not waiting and not self._db_down:
                    waiting = True
                    await self._off(ledger.set_status, self.job_id, "waiting",
                                    f"upstream paused; going on in {hold:.0f} s", ("running",))
                elif hold <= 0 and waiting and not self._db_down:
                    waiting = False
                    await self._off(ledger.set_status, self.job_id, "running", None, ("waiting",))
                if claim is not None and claim.done():
                    try:
                        claimed, claim = claim.result(), None
                        self._exhausted = len(claimed) < wanted
                    except errors.StorageError as exc:
                        claimed, claim = [], None
                        self._database_gone(exc)
                    ready.extend(claimed)
                free = concurrency - len(tasks)
                if (claim is None and hold <= 0 and not capped and not self._exhausted
                        and not self._db_down and len(ready) < free + concurrency // 2):
                    # Claimed ahead, half a round at a time, in the background: a claim
                    # waits for its commit, and slots left empty meanwhile cost throughput
                    # (measured: 1.35x of the ideal with the claim awaited here, see
                    # docs/benchmarks.md).
                    wanted = free - len(ready) + concurrency // 2
                    claim = asyncio.ensure_future(ledger.claim(self.job_id, wanted,
                                                               now >= self._reclaim_after))
                while hold <= 0 and not capped and not self._db_down and ready and len(tasks) < concurrency:
                    worst = ready[0]["max_cost"] or 0.0
                    if cap is not None and spent + in_flight_max + worst > cap:
                        capped = True       # claimed rows left go back when the job is released
                        break
                    in_flight_max += worst
                    row = ready.popleft()
                    tasks[asyncio.ensure_future(self._row(row))] = row
                if not tasks and claim is not None:
                    await asyncio.wait((claim,))
                    continue
                if not tasks and self._db_down:
                    ready = await self._rejoin(ready)   # paused until the database answers
                    next_renew = clock.monotonic() + RENEW_S
                    continue
                if not tasks:
                    if hold > 0:
                        await clock.sleep(min(hold, MAX_HOLD_STEP_S))
                        continue
                    # Other replicas still hold rows of this job (a shared ledger): wait for
                    # them, and claim those whose lease runs out (their replica died).
                    others = None if capped else await self._off(ledger.others_hold, self.job_id)
                    if self._db_down:
                        continue
                    if others is not None and not ready:
                        self._exhausted = False
                        await clock.sleep(min(max(others, 0.05), POLL_S))
                        continue
                    if capped:
                        status = "capped"
                        note = (f"stopped before the cost cap of ${cap:.4f}: ${spent:.4f} spent; "
                                "raise the cap to go on")
                    else:
                        status, note = "done", None
                    break
                finished, _ = await asyncio.wait((*tasks, claim) if claim is not None else tasks,
                                                 timeout=POLL_S, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    if task is claim:
                        continue
                    row = tasks.pop(task)
                    in_flight_max -= row["max_cost"] or 0.0
                    spent += task.result()
            if claim is not None:         # its rows go back to pending when the job is released
                await asyncio.gather(claim, return_exceptions=True)
            if tasks:                     # a pause lets the rows in flight finish (they are paid)
                if status == "cancelled":
                    for task in tasks:
                        task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        except asyncio.CancelledError:     # Ctrl-C, or the service stopping: rows go back
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, *([claim] if claim is not None else []),
                                 return_exceptions=True)
            raise
        finally:
            self.final = status
            try:
                await portal.off_loop(self.ledger.release, self.job_id, self.owner, status, note)
            except errors.StorageError as exc:   # stopped during an outage: its leases run out
                _log.warning("Batch job %s: could not record that this runner left it (%s); its "
                             "rows are taken up again when their lease runs out", self.job_id,
                             exc.user_message)
            finally:
                self.finished.set()
        return status

    def _asked(self) -> str | None:
        """The status somebody else set (the page's Pause or Cancel), read without waiting."""
        try:
            row = self.ledger.db.query_one_nowait("SELECT status FROM batch_jobs WHERE id = ?",
                                                (self.job_id,))
        except errors.StorageError:
            return None
        return row["status"] if row else None

    async def _off(self, fn, *args):
        """A ledger call off the loop; None (and the job pauses) if its database is unreachable."""
        try:
            return await portal.off_loop(fn, *args)
        except errors.StorageError as exc:
            self._database_gone(exc)
            return None

    def _database_gone(self, exc: errors.StorageError) -> None:
        if self._db_down is None:
            self._db_down = exc.user_message
            self.outages += 1
            _log.warning("Batch job %s paused: its database is unreachable (%s). It goes on by "
                         "itself when the database answers.", self.job_id, exc.user_message)

    async def _rejoin(self, ready: collections.deque) -> collections.deque:
        """Wait until the database answers, write what was kept meanwhile (the journal: done
        rows, history), then renew the rows still held; the claimed rows this runner keeps."""
        clock = self.gyro.clock
        while True:
            try:
                await portal.off_loop(self.ledger.ping)
                if await portal.off_loop(self.gyro.history.drain):
                    keep = {r["idx"]: r.get("claim") for r in ready}
                    held = await portal.off_loop(self.ledger.rejoin, self.job_id, keep)
                    break
            except errors.StorageError:
                pass
            await clock.sleep(DB_RETRY_S)
        _log.info("Batch job %s goes on: its database answers again", self.job_id)
        self._db_down = None
        self._exhausted = False
        self._reclaim_after = clock.monotonic() + REJOIN_GRACE_S
        return collections.deque(r for r in ready if r["idx"] in held)

    def _hold(self, seconds: float | None) -> None:
        until = self.gyro.clock.time() + max(0.05, seconds or 1.0)
        self._hold_until = max(self._hold_until, until)

    # -- one row -------------------------------------------------------------------------------
    async def _row(self, row: dict) -> float:
        """Run one row; what it cost."""
        ledger, job_id, idx = self.ledger, self.job_id, row["idx"]
        req = GenerationRequest(**row["request"], source="batch", job_id=job_id)
        try:
            result = await self.gyro.agenerate(req)
        except errors.CircuitOpen as exc:
            self._hold(exc.retry_in_s)
            return await self._back(row, exc, tried=False)
        except errors.RetryLater as exc:
            self._hold(exc.retry_in_s)
            return await self._back(row, exc, tried=False)
        except (errors.QuotaExhausted, errors.AuthFailed, errors.BudgetExceeded) as exc:
            self._stop_note = exc.user_message
            return await self._back(row, exc, tried=False)
        except errors.StorageError as exc:       # its history cannot be saved: the database is gone
            self._database_gone(exc)
            return await self._back(row, exc, tried=False)
        except (errors.RetryableError, errors.StreamInterrupted) as exc:
            open_for = self._breaker_open_for(req)
            if open_for:
                self._hold(open_for)
                return await self._back(row, exc, tried=False)
            if row["tries"] + 1 < self.gyro.settings.get("batch.row_attempts"):
                return await self._back(row, exc, tried=True)
            return await self._fail(row, exc)
        except errors.GyroscopeError as exc:
            return await self._fail(row, exc)
        ledger.done(job_id, idx, result.as_dict(), claim=row.get("claim"))
        return result.cost or 0.0

    async def _back(self, row: dict, exc: errors.GyroscopeError, tried: bool) -> float:
        try:
            await self.ledger.back(self.job_id, row["idx"], tried, claim=row.get("claim"))
        except errors.StorageError as db_exc:    # the row goes back when the job rejoins
            self._database_gone(db_exc)
        self._exhausted = False
        return _cost_of(exc)

    async def _fail(self, row: dict, exc: errors.GyroscopeError) -> float:
        result = getattr(exc, "result", None)
        try:
            await self.ledger.failed(self.job_id, row["idx"], exc.kind, exc.user_message,
                                     result.request_id if result is not None else None,
                                     claim=row.get("claim"))
        except errors.StorageError as db_exc:    # not recorded: the row is tried again later
            self._database_gone(db_exc)
        return _cost_of(exc)

    def _breaker_open_for(self, req: GenerationRequest) -> float:
        model = req.model or self.gyro.settings.get("provider.default_model")
        return self.gyro.breakers.get(self.gyro.provider.upstream_id, model).retry_in()

    def cancel(self) -> None:
        """Stop now from any thread (Ctrl-C): rows in flight go back to pending."""
        task = self._task
        if task is not None and not task.done():
            task.get_loop().call_soon_threadsafe(task.cancel)


def _cost_of(exc: errors.GyroscopeError) -> float:
    result = getattr(exc, "result", None)
    return (result.cost or 0.0) if result is not None else 0.0
