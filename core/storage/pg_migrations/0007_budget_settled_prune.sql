-- The marks of settled holds are pruned by the settler thread, off the request path, at
-- most every few minutes and after a day (0003's sweep pruned them after a week, inside a
-- reservation: with a mark per request that scan grew with the traffic, on the event loop).
-- A BRIN index on `at` keeps that prune cheap (marks arrive in time order) at almost no cost
-- per insert. A settlement replayed after its mark is gone (the database away for over a
-- day, and the first write had in fact committed) counts its cost twice: more, never less.
CREATE INDEX idx_budget_settled_at ON budget_settled USING brin (at);

CREATE OR REPLACE FUNCTION gyroscope_budget_sweep(p_now double precision)
RETURNS integer
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_scopes text[];
    v_periods text[];
    v_amounts double precision[];
    v_n integer;
BEGIN
    WITH gone AS (
        DELETE FROM budget_holds WHERE id IN (
            SELECT id FROM budget_holds WHERE expires_at < p_now
            ORDER BY id LIMIT 1000 FOR UPDATE SKIP LOCKED)
        RETURNING scopes, periods, amount),
    per AS (SELECT u.s, u.p, sum(g.amount) AS amount
              FROM gone g, unnest(g.scopes, g.periods) AS u(s, p) GROUP BY u.s, u.p)
    SELECT (SELECT array_agg(s ORDER BY s COLLATE "C", p COLLATE "C") FROM per),
           (SELECT array_agg(p ORDER BY s COLLATE "C", p COLLATE "C") FROM per),
           (SELECT array_agg(amount ORDER BY s COLLATE "C", p COLLATE "C") FROM per),
           (SELECT count(*) FROM gone)
      INTO v_scopes, v_periods, v_amounts, v_n;
    IF v_n = 0 THEN
        RETURN 0;
    END IF;
    PERFORM 1 FROM budget_ledger l JOIN unnest(v_scopes, v_periods) AS u(s, p)
        ON l.scope = u.s AND l.period = u.p
        ORDER BY l.scope COLLATE "C", l.period COLLATE "C" FOR UPDATE OF l;
    UPDATE budget_ledger l SET reserved = greatest(0, l.reserved - u.a)
      FROM unnest(v_scopes, v_periods, v_amounts) AS u(s, p, a)
     WHERE l.scope = u.s AND l.period = u.p;
    RETURN v_n;
END $$;
