-- Budgets shared by every replica (core/budgets.py, core/storage/pg_budgets.py; the file's
-- m008 and m009): per scope and period what was spent and what requests in flight hold,
-- each request's hold until it settles, and the holds settled (so a settlement written twice
-- counts once).
--
-- Reserving, settling and giving back expired holds are functions, so each is one statement
-- from the client (one round trip, its own transaction): a ledger row stays locked only
-- while a function runs and commits, never across a round trip, and every function locks
-- ledger rows in (scope, period) byte order (COLLATE "C", as the client sorts them), so two
-- of them never wait for each other in a cycle.
CREATE TABLE budget_ledger (
    scope text NOT NULL, period text NOT NULL,
    spent double precision NOT NULL DEFAULT 0, reserved double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, period)
);
-- Hold ids are drawn at random by the client (63 bits), not from a sequence: a crash can
-- take back a sequence's last values with the holds that used them, and an id used again
-- would read as settled already.
CREATE TABLE budget_holds (
    id bigint PRIMARY KEY, scopes text[] NOT NULL, periods text[] NOT NULL,
    amount double precision NOT NULL, expires_at double precision NOT NULL
);
CREATE TABLE budget_settled (id bigint PRIMARY KEY, at double precision NOT NULL);

-- Hold p_amount on every (scope, period) if none would pass its limit, else hold nothing.
-- The client gives the rows sorted (byte order), so they are locked in that order. Returns
-- whether it held (as hold p_id) and what each row had spent and held before.
-- The commit does not wait for the WAL flush (the rows' locks go at once); a server crash
-- can lose the last moment's holds, whose settlements still count their cost (see settle).
CREATE FUNCTION gyroscope_budget_reserve(
    p_scopes text[], p_periods text[], p_limits double precision[], p_amount double precision,
    p_expires_at double precision, p_lock_timeout text, p_id bigint)
RETURNS TABLE (held boolean, spent double precision[], reserved double precision[])
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_spent double precision[] := '{}';
    v_reserved double precision[] := '{}';
    v_s double precision;
    v_r double precision;
    v_over boolean := false;
BEGIN
    -- A row locked longer than this (by a stuck session) refuses this request as busy
    -- instead of holding up the caller (an event loop).
    PERFORM set_config('lock_timeout', p_lock_timeout, true);
    PERFORM set_config('synchronous_commit', 'off', true);
    FOR i IN 1 .. array_length(p_scopes, 1) LOOP
        SELECT l.spent, l.reserved INTO v_s, v_r FROM budget_ledger l
         WHERE l.scope = p_scopes[i] AND l.period = p_periods[i] FOR UPDATE;
        IF NOT FOUND THEN       -- the period's first request: its row, then lock it
            INSERT INTO budget_ledger (scope, period) VALUES (p_scopes[i], p_periods[i])
                ON CONFLICT DO NOTHING;
            SELECT l.spent, l.reserved INTO v_s, v_r FROM budget_ledger l
             WHERE l.scope = p_scopes[i] AND l.period = p_periods[i] FOR UPDATE;
        END IF;
        v_spent := v_spent || v_s;
        v_reserved := v_reserved || v_r;
        IF v_s + v_r + p_amount > p_limits[i] + 1e-12 THEN
            v_over := true;
        END IF;
    END LOOP;
    IF v_over THEN
        RETURN QUERY SELECT false, v_spent, v_reserved;
        RETURN;
    END IF;
    UPDATE budget_ledger l SET reserved = l.reserved + p_amount
      FROM unnest(p_scopes, p_periods) AS u(s, p) WHERE l.scope = u.s AND l.period = u.p;
    INSERT INTO budget_holds (id, scopes, periods, amount, expires_at)
        VALUES (p_id, p_scopes, p_periods, p_amount, p_expires_at);
    RETURN QUERY SELECT true, v_spent, v_reserved;
END $$;

-- Settle holds: p_ids and p_costs one per hold (ids distinct), and each hold's ledger rows as
-- (index into p_ids, scope, period). A hold settled before adds nothing; a hold still
-- there is given back and its cost added; a hold no longer there (given back as expired, or
-- lost in a server crash) only has its cost added. Returns how many were settled now.
-- The commit waits for the WAL flush: a settlement confirmed is never lost.
CREATE FUNCTION gyroscope_budget_settle(
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

-- Give back the holds past their expiry (their process died mid-request), at most 1000 a
-- call; holds being settled right now are skipped, not waited for. Marks of settlements
-- older than a week go. Returns how many holds were given back.
CREATE FUNCTION gyroscope_budget_sweep(p_now double precision)
RETURNS integer
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_scopes text[];
    v_periods text[];
    v_amounts double precision[];
    v_n integer;
BEGIN
    DELETE FROM budget_settled WHERE at < p_now - 604800;
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
