"""Schema of the SQLite file, as sqlite-utils migrations (append new ones, never edit)."""

from __future__ import annotations

from sqlite_utils.migrations import Migrations

migrations = Migrations("gyroscope")


@migrations()
def m001_initial(db) -> None:
    db["requests"].create({
        "id": int, "ts": float, "request_id": str, "source": str, "provider": str,
        "base_url": str, "upstream": str, "model": str, "outcome": str, "error_kind": str,
        "http_status": int, "error_message": str, "attempts": int, "retry_wait_s": float,
        "latency_ms": float, "ttft_ms": float, "prompt_tokens": int,
        "completion_tokens": int, "total_tokens": int, "tokens_estimated": int,
        "cost": float, "cost_unknown": int, "from_cache": int, "cost_saved": float,
        "optimizer_tokens_saved": int, "optimizer_cost_saved": float,
    }, pk="id", not_null={"ts", "request_id", "outcome"},
        defaults={"attempts": 0, "retry_wait_s": 0.0, "from_cache": 0, "cost_saved": 0.0,
                  "tokens_estimated": 0, "cost_unknown": 0, "optimizer_tokens_saved": 0,
                  "optimizer_cost_saved": 0.0})
    db["requests"].create_index(["request_id"], unique=True)
    # Covering index for the charts: range scans by time never touch the table.
    db.execute(
        "CREATE INDEX idx_requests_ts_cover ON requests (ts, model, source, outcome, "
        "from_cache, cost, cost_saved, prompt_tokens, completion_tokens, latency_ms)")

    db["events"].create({
        "id": int, "ts": float, "kind": str, "subject": str, "old": str, "new": str,
        "cause": str, "actor": str,
    }, pk="id", not_null={"ts", "kind"})
    db["events"].create_index(["kind", "ts"])

    db["settings"].create({
        "name": str, "value": str, "version": int, "updated_at": float, "updated_by": str,
    }, pk="name")
    db["meta"].create({"key": str, "value": str}, pk="key")

    db["cache"].create({
        "key": str, "created_at": float, "last_used_at": float, "hits": int,
        "provider": str, "model": str, "content": str, "finish_reason": str,
        "prompt_tokens": int, "completion_tokens": int, "cost": float, "bytes": int,
    }, pk="key", defaults={"hits": 0})
    db["cache"].create_index(["last_used_at"])
    db["cache"].create_index(["created_at"])

    db["breakers"].create({
        "name": str, "state": str, "fail_counter": int, "success_counter": int,
        "opened_at": float, "updated_at": float,
    }, pk="name", defaults={"state": "closed", "fail_counter": 0, "success_counter": 0})
