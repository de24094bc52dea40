"""`python -m core batch` and `python -m core jobs` (wired in core/cli.py)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import StorageError
from . import files


def add_commands(sub) -> None:
    b = sub.add_parser("batch", help="run many prompts (CSV, JSONL or one per line); resumable",
                       description="Run every row of INPUT through the pipeline and write the "
                       "results to OUTPUT (.csv or .jsonl). Prints the job id first; a job "
                       "stopped by Ctrl-C or a crash resumes with --resume JOB_ID (or last). "
                       "Exit code 0 only when every row finished.")
    b.add_argument("input", nargs="?", help="a .csv/.jsonl file with a prompt column, or text "
                   "with one prompt per line (- for stdin)")
    b.add_argument("-o", "--output", help="where the results go (.csv or .jsonl)")
    b.add_argument("--format", choices=("csv", "jsonl", "lines"), help="how to read INPUT "
                   "(default: by its extension; without one, as CSV when the first line is a "
                   "header of known columns such as prompt,model, as JSONL when it starts with "
                   "{, else one prompt per line)")
    b.add_argument("--concurrency", type=_positive_int, help="rows sent at once "
                   "(default: the batch.concurrency setting)")
    b.add_argument("--resume", metavar="JOB_ID|last", help="go on with an unfinished job")
    b.add_argument("--retry-failed", action="store_true", help="with --resume: run failed rows again")
    b.add_argument("--max-cost", type=float, metavar="USD", help="stop before the job would cost more")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    j = sub.add_parser("jobs", help="list batch jobs")
    j.add_argument("--json", action="store_true")


def _positive_int(text: str) -> int:
    import argparse
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 256:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number from 1 to 256")
    return value


def jobs_command(gyro, args) -> int:
    import json
    jobs = gyro.batch.ledger.jobs()
    if args.json:
        print(json.dumps(jobs, default=str))
        return 0
    if not jobs:
        print("no batch jobs yet (start one with: python -m core batch INPUT -o OUTPUT)")
        return 0
    print(f"{'job':12}  {'created':19}  {'status':9}  {'done':>7}  {'failed':>6}  {'left':>7}  "
          f"{'cost $':>9}  note")
    for j in jobs:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j["created_at"]))
        status = j["status"] if j["alive"] or j["status"] not in ("running", "waiting") else "stopped"
        print(f"{j['id']:12}  {created:19}  {status:9}  {j['done']:>7}  {j['failed']:>6}  "
              f"{j['pending'] + j['running']:>7}  {j['cost']:>9.4f}  {j['note'] or ''}")
    return 0


def batch_command(gyro, args) -> int:
    jobs = gyro.batch
    if args.resume:
        job_id = jobs.ledger.last_unfinished() if args.resume == "last" else args.resume
        job = jobs.ledger.job(job_id) if job_id else None
        if job is None:
            print("error: " + ("no unfinished job to resume; list them with: python -m core jobs"
                               if args.resume == "last" else
                               f"no job {args.resume!r}; list them with: python -m core jobs"),
                  file=sys.stderr)
            return 2
        output = args.output or job["options"].get("output")
        if args.max_cost is not None:
            jobs.set_cap(job_id, args.max_cost)
        if args.retry_failed:
            jobs.retry_failed(job_id)
    else:
        if not args.input or not args.output:
            print("error: give INPUT and -o OUTPUT (or --resume JOB_ID|last)", file=sys.stderr)
            return 2
        output = args.output
        parsed = (jobs.parse(sys.stdin.buffer.read(), None, args.format) if args.input == "-"
                  else jobs.parse_path(args.input, args.format))
        for note in parsed.notes:
            print(f"note: {note}", file=sys.stderr)
        for problem in parsed.problems:
            print(f"skipped {problem}", file=sys.stderr)
        job_id = jobs.create(parsed, name=Path(args.input).name, concurrency=args.concurrency,
                             max_cost=args.max_cost, output=str(Path(output).resolve()))
    print(job_id, flush=True)          # first, so a script can resume it whatever happens next
    if output is None:
        print("error: no OUTPUT for this job; give -o OUTPUT", file=sys.stderr)
        return 2
    # The bar before the job: once the job runs, this thread is in _follow's wait, where a
    # Ctrl-C pauses the job (not importing tqdm, where it ended the process with a traceback).
    from tqdm import tqdm
    bar = tqdm(total=jobs.ledger.job(job_id)["total"], unit="row", file=sys.stderr,
               disable=args.no_progress, dynamic_ncols=True)
    runner = jobs.start(job_id, args.concurrency)
    interrupted = _follow(jobs, job_id, runner, bar)
    if runner.error is not None:
        print(f"error: {runner.error}", file=sys.stderr)
        return 1
    files.write_atomic(output, jobs.export(job_id, files.output_kind(output)))
    p = jobs.progress(job_id)
    print(f"{p['done']} done, {p['failed']} failed, {p['left']} left; ${p['cost']:.4f}; "
          f"results in {output}", file=sys.stderr)
    if interrupted:
        print(f"interrupted; go on with: python -m core batch --resume {job_id}", file=sys.stderr)
        return 130
    if p["status"] != "done" or p["failed"] or p["left"]:
        if p["note"]:
            print(f"job {p['status']}: {p['note']}", file=sys.stderr)
        if p["failed"]:
            print(f"retry the failed rows with: python -m core batch --resume {job_id} "
                  "--retry-failed", file=sys.stderr)
        return 1
    return 0


def _follow(jobs, job_id: str, runner, bar) -> bool:
    """Show progress on ``bar`` until the runner ends; True when Ctrl-C stopped it."""
    interrupted = False
    try:
        while not runner.finished.wait(0.2):
            _update(jobs, job_id, bar)
    except KeyboardInterrupt:
        interrupted = True
        runner.cancel()
        runner.finished.wait(30)
    _update(jobs, job_id, bar)
    bar.close()
    return interrupted


def _update(jobs, job_id: str, bar) -> None:
    try:
        c = jobs.ledger.counts(job_id)
    except StorageError:         # the runner pauses meanwhile and goes on by itself
        bar.set_postfix_str("paused: the database cannot be reached; goes on when it answers")
        return
    bar.n = c["done"] + c["failed"]
    bar.set_postfix(failed=c["failed"], cost=f"${c['cost']:.4f}", refresh=False)
    bar.refresh()
