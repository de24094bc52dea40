-- Batch jobs and their rows (core/schema.py m007), worked by several replicas at once:
-- each running row carries the lease of the replica that claimed it (owner, lease_until),
-- so the rows of a replica that died are claimed again once their lease runs out.
CREATE TABLE batch_jobs (
    id text PRIMARY KEY, created_at double precision NOT NULL, updated_at double precision NOT NULL,
    name text, status text NOT NULL, total integer NOT NULL, concurrency integer,
    max_cost double precision, owner text, lease_until double precision, note text, options text
);
CREATE INDEX idx_batch_jobs_created ON batch_jobs (created_at);
CREATE TABLE batch_rows (
    job_id text NOT NULL, idx integer NOT NULL, line integer,
    status text NOT NULL DEFAULT 'pending', request text NOT NULL, content text, result text,
    error text, error_kind text, cost double precision, max_cost double precision,
    tries integer NOT NULL DEFAULT 0, started_at double precision, finished_at double precision,
    request_id text, owner text, lease_until double precision,
    PRIMARY KEY (job_id, idx)
);
CREATE INDEX idx_batch_rows_status ON batch_rows (job_id, status, idx);
