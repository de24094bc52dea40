"""Batch jobs: many prompts through the one pipeline, resumable after a crash.

- ``files``: pasted lines, CSV and JSONL in (checked per row), CSV and JSONL out;
- ``ledger``: jobs and rows in the SQLite file (pending / running / done / failed);
- ``runner``: runs a job's rows with bounded concurrency, pausing for outages;
- ``jobs``: what the service offers (``Gyroscope.batch``): create, start, pause, progress.
"""

from .files import InputRefused, ParsedInput, Problem
from .jobs import BatchJobs
from .ledger import JobBusy, Ledger
from .runner import JobRunner

__all__ = ["BatchJobs", "InputRefused", "JobBusy", "JobRunner", "Ledger", "ParsedInput", "Problem"]
