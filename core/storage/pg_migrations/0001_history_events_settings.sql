-- History, events and settings: the SQLite file's `requests`, `events`, `settings` and
-- `meta` tables (core/schema.py m001, m006 and m007's job_id), with the same columns.
-- Booleans stay integers (0/1) so that the same filters read both backends.
CREATE TABLE requests (
    id bigserial PRIMARY KEY,
    ts double precision NOT NULL,
    request_id text NOT NULL UNIQUE,
    source text, provider text, base_url text, upstream text, model text,
    outcome text NOT NULL, error_kind text, http_status integer, error_message text,
    attempts integer DEFAULT 0, retry_wait_s double precision DEFAULT 0,
    latency_ms double precision, ttft_ms double precision,
    prompt_tokens bigint, completion_tokens bigint, total_tokens bigint,
    tokens_estimated integer DEFAULT 0, cost double precision, cost_unknown integer DEFAULT 0,
    from_cache integer DEFAULT 0, cost_saved double precision DEFAULT 0,
    optimizer_tokens_saved bigint DEFAULT 0, optimizer_cost_saved double precision DEFAULT 0,
    cached_tokens bigint, cache_write_tokens bigint, reasoning_tokens bigint,
    token_source text, finish_reason text, job_id text
);
CREATE INDEX idx_requests_ts ON requests (ts);
CREATE INDEX idx_requests_model_ts ON requests (model, ts);
CREATE INDEX idx_requests_source_ts ON requests (source, ts);
-- Latency percentiles read answered requests only.
CREATE INDEX idx_requests_ok_latency ON requests (ts, latency_ms)
    WHERE outcome = 'ok' AND from_cache = 0;
CREATE INDEX idx_requests_job ON requests (job_id) WHERE job_id IS NOT NULL;

CREATE TABLE events (
    id bigserial PRIMARY KEY,
    ts double precision NOT NULL, kind text NOT NULL, subject text, old text, new text,
    cause text, actor text
);
CREATE INDEX idx_events_kind_ts ON events (kind, ts);

CREATE TABLE settings (
    name text PRIMARY KEY, value text, version integer, updated_at double precision,
    updated_by text
);
CREATE TABLE meta (key text PRIMARY KEY, value text);
