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
import contextvars
import functools
import logging
import threading

from .. import errors, pipeline, portal
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
        # What the loop and the slots share (one event loop: no locks).
        self._slots: set[asyncio.Task] = set()
        # Each row's own task (to its ledger write), with the future its answer settles.
        self._rows: dict[asyncio.Task, asyncio.Future] = {}
        self._ready: collections.deque[dict] = collections.deque()   # claimed, not sent yet
        self._waiter: asyncio.Future | None = None
        self._halted = self._capped = False
        self._cap: float | None = None
        self._spent = self._in_flight_max = 0.0
        self._slot_error: BaseException | None = None

    # -- the loop ------------------------------------------------------------------------------
    # Each of up to ``concurrency`` slots sends rows back to back: when its row has its
    # answer it takes the next claimed row itself, at once, while nothing stops the job (a
    # pause, a hold, the cap, the database gone). The loop below only claims rows ahead,
    # watches for a pause or cancel, renews the lease and refills slots that stopped; a slot
    # wakes it after each row. (Measured: with every row going back through this loop, which
    # waited on all rows in flight at each step, slots stood empty 3-10 % of the time on a
    # busy machine; see docs/benchmarks.md.)
    async def run(self) -> str:
        """Run until no row is left, or a pause, cancel, cost cap or Ctrl-C; the final status."""
        self._task = asyncio.current_task()
        clock, ledger = self.gyro.clock, self.ledger
        status, note = "paused", "interrupted"
        slots, rows = self._slots, self._rows
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
            self._cap = job["max_cost"] or None
            self._spent = await portal.off_loop(ledger.spent, self.job_id)
            waiting = False
            next_poll = next_renew = clock.monotonic()
            while True:
                if self._slot_error is not None:
                    raise self._slot_error
                ready = self._ready
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
                free = concurrency - len(slots)
                if (claim is None and hold <= 0 and not self._capped and not self._exhausted
                        and not self._db_down and len(ready) < free + concurrency // 2):
                    # Claimed ahead in the background: a claim waits for its commit, and
                    # slots left empty meanwhile cost throughput (measured: 1.35x of the
                    # ideal with the claim awaited here, see docs/benchmarks.md). Below half
                    # a round ready, claim up to a full round: topping up to the mark each
                    # time claimed one row per commit, and on a busy machine slots found
                    # nothing ready at one row in six.
                    wanted = free - len(ready) + concurrency
                    claim = asyncio.ensure_future(ledger.claim(self.job_id, wanted,
                                                               now >= self._reclaim_after))
                    claim.add_done_callback(self._wake)
                while len(slots) < concurrency:
                    row = self._next_row()
                    if row is None:
                        break
                    slot = asyncio.ensure_future(self._slot(row))
                    slots.add(slot)
                    slot.add_done_callback(self._slot_ended)
                if not slots and not rows and claim is not None:
                    await asyncio.wait((claim,))
                    continue
                if not slots and not rows and self._db_down:
                    # paused until the database answers
                    self._ready = await self._rejoin(ready)
                    next_renew = clock.monotonic() + RENEW_S
                    continue
                if not slots and not rows:
                    if hold > 0:
                        await clock.sleep(min(hold, MAX_HOLD_STEP_S))
                        continue
                    # Other replicas still hold rows of this job (a shared ledger): wait for
                    # them, and claim those whose lease runs out (their replica died).
                    others = None if self._capped else await self._off(ledger.others_hold, self.job_id)
                    if self._db_down:
                        continue
                    if others is not None and not ready:
                        self._exhausted = False
                        await clock.sleep(min(max(others, 0.05), POLL_S))
                        continue
                    if self._capped:
                        status = "capped"
                        note = (f"stopped before the cost cap of ${self._cap:.4f}: ${self._spent:.4f} "
                                "spent; raise the cap to go on")
                    else:
                        status, note = "done", None
                    break
                await self._woken(POLL_S)
            self._halted = True           # slots finish the row they run and take no other
            if claim is not None:         # its rows go back to pending when the job is released
                await asyncio.gather(claim, return_exceptions=True)
            # A pause lets the rows in flight finish (they are paid); a cancel stops those
            # still waiting for their answer.
            await self._drain(cancel=status == "cancelled")
            if self._slot_error is not None:
                raise self._slot_error
        except asyncio.CancelledError:     # Ctrl-C, or the service stopping: rows go back
            self._halted = True
            await self._drain(cancel=True, also=claim)
            raise
        finally:
            self._halted = True
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

    async def _drain(self, cancel: bool, also: asyncio.Task | None = None) -> None:
        """Wait for every slot and row to end; ``cancel``: rows without their answer yet are
        cancelled (they go back to pending). A row that has its answer is left to write it
        to the ledger: it is paid for."""
        if cancel:
            # Which rows have no answer yet is read first: cancelling a slot cancels the
            # ``freed`` future it waits on, and a cancelled one is done too (those rows ran
            # on to their answer, and a stop waited for the slowest upstream).
            unanswered = [task for task, freed in self._rows.items() if not freed.done()]
            for slot in self._slots:
                slot.cancel()
            for task in unanswered:
                task.cancel()
        await asyncio.gather(*self._slots, *self._rows, *([also] if also is not None else []),
                             return_exceptions=True)

    def _next_row(self) -> dict | None:
        """The next claimed row to send, when nothing stops the job; None otherwise (the cap
        reached sets ``_capped``: the claimed rows left go back when the job is released)."""
        if (self._halted or self._stop_note or self._db_down or not self._ready or self._capped
                or self._hold_until > self.gyro.clock.time()):
            return None
        worst = self._ready[0]["max_cost"] or 0.0
        if self._cap is not None and self._spent + self._in_flight_max + worst > self._cap:
            self._capped = True
            return None
        self._in_flight_max += worst
        return self._ready.popleft()

    async def _slot(self, row: dict) -> None:
        """Send rows one after another, starting with ``row``, until none may be sent now.
        A row's answer frees the slot: the wait for its history row's commit and its write
        to the ledger go on in the row's own task (measured on a busy VM: that commit took
        14-20 ms a row at the median and 46-167 ms at p90, all of it time the slot stood
        idle; see docs/benchmarks.md)."""
        loop = asyncio.get_running_loop()
        while row is not None:
            freed = loop.create_future()
            context = contextvars.copy_context()
            context.run(pipeline.answered.set, functools.partial(_settle, freed))
            task = loop.create_task(self._own_row(row, freed), context=context)
            self._rows[task] = freed
            task.add_done_callback(self._row_ended)
            await freed
            row = self._next_row()
            self._wake()          # the loop claims ahead and notices a stop

    async def _own_row(self, row: dict, freed: asyncio.Future) -> None:
        try:
            cost = await self._row(row)
        finally:
            self._in_flight_max -= row["max_cost"] or 0.0
            _settle(freed)
        self._spent += cost

    def _slot_ended(self, slot: asyncio.Task) -> None:
        self._slots.discard(slot)
        self._note_error(slot)
        self._wake()

    def _row_ended(self, task: asyncio.Task) -> None:
        self._rows.pop(task, None)
        self._note_error(task)
        self._wake()

    def _note_error(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None and self._slot_error is None:
            self._slot_error = task.exception()

    def _wake(self, _=None) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _woken(self, timeout: float) -> None:
        """Wait until a slot, a row or a claim wakes the loop, or ``timeout`` passes."""
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout, self._wake)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

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
        # What the ledger keeps of the answer (``as_dict`` deep-copies all of it: ~0.1 ms).
        ledger.done(job_id, idx, {
            "content": result.content, "model": result.model, "finish_reason": result.finish_reason,
            "usage": result.usage_dict(), "cost": result.cost, "from_cache": result.from_cache,
            "attempts": result.attempts, "latency_ms": round(result.latency_ms, 3),
            "request_id": result.request_id}, claim=row.get("claim"))
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


def _settle(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _cost_of(exc: errors.GyroscopeError) -> float:
    result = getattr(exc, "result", None)
    return (result.cost or 0.0) if result is not None else 0.0
