-- Settlements no longer hold the ledger rows' locks through a disk write (0003's did: a
-- reservation on another replica waited for that flush, ~0.5-3 ms, on its event loop).
-- gyroscope_budget_settle now commits without waiting for the WAL flush, like a
-- reservation; the settler then makes its settlements durable with a small synchronous
-- write of its own row in budget_settlers (its commit flushes the WAL up to there, the
-- settlements included), holding no lock anyone else waits for. A settlement is confirmed
-- (and dropped by the settler) only after that; if the flush fails, it goes to the journal
-- and is written again (budget_settled makes that count once).
CREATE TABLE budget_settlers (owner text PRIMARY KEY, at double precision NOT NULL);

CREATE OR REPLACE FUNCTION gyroscope_budget_settle(
    p_ids bigint[], p_costs double precision[], p_row_hold integer[], p_row_scopes text[],
    p_row_periods text[], p_now double precision)
RETURNS integer
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_scopes text[];
    v_periods text[];
    v_costs double precision[];
    v_back double precision[];
    v_n integer;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    WITH s AS (SELECT * FROM unnest(p_ids, p_costs) WITH ORDINALITY AS u(id, cost, i)),
    fresh AS (INSERT INTO budget_settled (id, at) SELECT s.id, p_now FROM s
              ON CONFLICT DO NOTHING RETURNING id),
    gone AS (DELETE FROM budget_holds h USING fresh WHERE h.id = fresh.id
             RETURNING h.id, h.amount),
    per AS (SELECT r.s, r.p, sum(s.cost) AS cost, sum(coalesce(g.amount, 0)) AS back
              FROM fresh JOIN s ON s.id = fresh.id
              JOIN unnest(p_row_hold, p_row_scopes, p_row_periods) AS r(i, s, p) ON r.i = s.i
              LEFT JOIN gone g ON g.id = s.id
             GROUP BY r.s, r.p)
    SELECT (SELECT array_agg(s ORDER BY s COLLATE "C", p COLLATE "C") FROM per),
           (SELECT array_agg(p ORDER BY s COLLATE "C", p COLLATE "C") FROM per),
           (SELECT array_agg(cost ORDER BY s COLLATE "C", p COLLATE "C") FROM per),
           (SELECT array_agg(back ORDER BY s COLLATE "C", p COLLATE "C") FROM per),
           (SELECT count(*) FROM fresh)
      INTO v_scopes, v_periods, v_costs, v_back, v_n;
    IF v_scopes IS NULL THEN
        RETURN v_n;
    END IF;
    -- (a hold lost in a crash may have taken its period's first row with it)
    INSERT INTO budget_ledger (scope, period)
        SELECT u.s, u.p FROM unnest(v_scopes, v_periods) WITH ORDINALITY AS u(s, p, i) ORDER BY u.i
        ON CONFLICT DO NOTHING;
    PERFORM 1 FROM budget_ledger l JOIN unnest(v_scopes, v_periods) AS u(s, p)
        ON l.scope = u.s AND l.period = u.p
        ORDER BY l.scope COLLATE "C", l.period COLLATE "C" FOR UPDATE OF l;
    UPDATE budget_ledger l SET spent = l.spent + u.c, reserved = greatest(0, l.reserved - u.b)
      FROM unnest(v_scopes, v_periods, v_costs, v_back) AS u(s, p, c, b)
     WHERE l.scope = u.s AND l.period = u.p;
    RETURN v_n;
END $$;
