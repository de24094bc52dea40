"""Batch jobs as the service offers them: create from parsed input (with the estimate),
start in the background, pause, resume, cancel, retry failed rows, progress, results."""

from __future__ import annotations

import threading
from concurrent.futures import Future

from .. import portal, prices, tokens
from ..models import chat_messages
from . import files
from .ledger import ledger_for
from .runner import JobRunner


class BatchJobs:
    """The batch side of a Gyroscope: jobs started here run on the service's portal loop
    (a background thread that outlives page reruns); the ledger is the truth for all."""

    def __init__(self, gyro) -> None:
        self.gyro = gyro
        self.ledger = ledger_for(gyro)
        self._lock = threading.Lock()
        self._running: dict[str, tuple[JobRunner, Future]] = {}

    # -- before a job --------------------------------------------------------------------------
    def parse(self, data: bytes, name: str | None, kind: str | None = None) -> files.ParsedInput:
        """An upload or a file's bytes, checked against batch.max_file_mb and batch.max_rows."""
        s = self.gyro.settings.snapshot()
        return files.read_bytes(data, name, int(s["batch.max_file_mb"] * 1e6), s["batch.max_rows"],
                                kind)

    def parse_path(self, path, kind: str | None = None) -> files.ParsedInput:
        s = self.gyro.settings.snapshot()
        return files.read_path(path, int(s["batch.max_file_mb"] * 1e6), s["batch.max_rows"], kind)

    def estimate(self, rows: list[dict]) -> dict:
        """Per row and in all: prompt tokens, the most tokens asked for and the most it can
        cost (rows whose model has no known price are counted apart)."""
        s = self.gyro.settings.snapshot()
        pricing = self.gyro.pipeline.pricing(s)
        total_prompt = total_out = 0
        total_cost = 0.0
        unpriced = 0
        for row in rows:
            model = row.get("model") or s["provider.default_model"]
            messages = row.get("messages") or chat_messages(row.get("prompt", ""), row.get("system"))
            n_prompt = tokens.count_messages(messages, model)
            n_out = row.get("max_tokens") or s["generate.max_tokens"]
            worst = prices.price(model, pricing, n_prompt, n_out)   # as this upstream is priced
            row["_estimate"] = (n_prompt, n_out, worst)
            total_prompt += n_prompt
            total_out += n_out
            if worst is None:
                unpriced += 1
            else:
                total_cost += worst
        return {"rows": len(rows), "prompt_tokens": total_prompt, "max_completion_tokens": total_out,
                "max_cost": total_cost, "unpriced_rows": unpriced}

    def create(self, parsed: files.ParsedInput, *, name: str = "", concurrency: int | None = None,
               max_cost: float | None = None, output: str | None = None) -> str:
        """A job of the good rows of ``parsed`` (nothing is written when there are none)."""
        if not parsed.rows:
            raise files.InputRefused("There is no row to run: "
                                     + ("; ".join(map(str, parsed.problems[:5])) or "the input is empty")
                                     + ". Nothing was started.")
        if "_estimate" not in parsed.rows[0]:
            self.estimate(parsed.rows)
        if max_cost is None:
            max_cost = self.gyro.settings.get("batch.max_cost_usd") or None
        rows = [{"line": r["line"], "max_cost": r["_estimate"][2],
                 "request": {k: v for k, v in r.items() if k in files.COLUMNS}} for r in parsed.rows]
        return self.ledger.create(rows, name=name, concurrency=concurrency, max_cost=max_cost,
                                  options={"output": output, "problems": len(parsed.problems)})

    # -- running -------------------------------------------------------------------------------
    def start(self, job_id: str, concurrency: int | None = None) -> JobRunner:
        """Run the job in the background (a no-op when it already runs here)."""
        with self._lock:
            running = self._running.get(job_id)
            if running is not None and not running[0].finished.is_set():
                return running[0]
            runner = JobRunner(self.gyro, job_id, concurrency)
            future = portal.submit(runner.run())
            self._running[job_id] = (runner, future)
            return runner

    def runner(self, job_id: str) -> JobRunner | None:
        running = self._running.get(job_id)
        return running[0] if running is not None and not running[0].finished.is_set() else None

    def running_here(self, job_id: str) -> bool:
        return self.runner(job_id) is not None

    def pause(self, job_id: str) -> bool:
        """Ask the job to stop sending rows (those in flight finish); resume with ``start``."""
        return self.ledger.set_status(job_id, "paused", "paused by user",
                                      only_if=("pending", "running", "waiting", "capped"))

    def cancel(self, job_id: str) -> bool:
        """Stop the job for good: rows in flight are cancelled, the rest never run."""
        return self.ledger.set_status(job_id, "cancelled", "cancelled by user",
                                      only_if=("pending", "running", "waiting", "paused", "capped"))

    def retry_failed(self, job_id: str) -> int:
        return self.ledger.retry_failed(job_id)

    def set_cap(self, job_id: str, max_cost: float | None) -> None:
        self.ledger.db.write(lambda conn: conn.execute(
            "UPDATE batch_jobs SET max_cost = ? WHERE id = ?", (max_cost, job_id)))

    def stop_all(self, timeout: float = 10.0) -> None:
        """Stop every job running here (the service is closing): rows in flight go back to
        pending and the jobs stay resumable."""
        with self._lock:
            runners = [r for r, _ in self._running.values() if not r.finished.is_set()]
        for runner in runners:
            runner.cancel()
        for runner in runners:
            runner.finished.wait(timeout)

    # -- reading -------------------------------------------------------------------------------
    def progress(self, job_id: str) -> dict | None:
        """The job with its counts, its rate (rows a second over the last minute) and the
        seconds left at that rate (None when unknown)."""
        job = self.ledger.job(job_id)
        if job is None:
            return None
        finished = job["done"] + job["failed"]
        left = job["pending"] + job["running"]
        span = min(60.0, max(1.0, self.gyro.clock.time() - job["created_at"]))
        rate = job["recent"] / span if job["recent"] else 0.0
        job.update(finished=finished, left=left, rate=rate,
                   eta_s=(left / rate) if rate > 0 and left else (0.0 if not left else None),
                   running_here=self.running_here(job_id))
        return job

    def records(self, job_id: str) -> list[dict]:
        """Every row as written to CSV/JSONL (input order)."""
        return [files.output_record(r) for r in self.ledger.rows(job_id)]

    def export(self, job_id: str, kind: str) -> str:
        return files.render(self.records(job_id), kind)
