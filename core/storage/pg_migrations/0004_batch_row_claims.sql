-- Fencing for shared batch jobs: every claim of a row bumps its claim generation, and a
-- runner finishes (done, failed, put back) only the claim it holds. A replica that stalled
-- past its lease, whose row another replica claimed since, is refused (pg_ledger.py).
ALTER TABLE batch_rows ADD COLUMN claim bigint NOT NULL DEFAULT 0;
