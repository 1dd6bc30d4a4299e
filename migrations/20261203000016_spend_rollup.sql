-- Spend per day, organisation and provider, per month and organisation, and the platform's per
-- day and provider, kept beside
-- ai_cost_tracking so the console reads a page of sums instead of adding up a month of cost rows.
--
-- Every statement that inserts, deletes or updates cost rows appends its sums (one row per day,
-- organisation and provider it touched) to aiq_spend_delta from a statement trigger, in the
-- writer's own transaction: the sums are exact, and a writer takes no lock another writer waits
-- for (the table is append-only). aiq_fold_spend(), run by every daemon every few seconds and by
-- the console before it reads, moves the deltas into aiq_spend_day, aiq_spend_month and
-- aiq_spend_platform in one transaction, one folder at a time (so the platform's few rows are
-- never a point where writers queue); a sum that reaches zero calls is deleted, so an
-- organisation purged with its cost rows leaves no row here. The day and the month tables plus
-- the deltas not yet folded each add up to ai_cost_tracking's rows, and so does the platform's.
-- Rows without a billing_date are left out (every reader filters on it).

CREATE TABLE aiq_spend_delta (
  id BIGSERIAL PRIMARY KEY,
  billing_date DATE NOT NULL,
  organization_id UUID,
  service_name TEXT NOT NULL,
  cost_micros BIGINT NOT NULL,
  calls BIGINT NOT NULL
);

CREATE TABLE aiq_spend_day (
  billing_date DATE NOT NULL,
  organization_id UUID,
  service_name TEXT NOT NULL,
  cost_micros BIGINT NOT NULL,
  calls BIGINT NOT NULL,
  CONSTRAINT aiq_spend_day_key UNIQUE NULLS NOT DISTINCT (billing_date, organization_id, service_name)
);
-- An organisation's day (the console's "today").
CREATE INDEX aiq_spend_day_org ON aiq_spend_day (organization_id, billing_date);
-- The sums a fold brought to zero calls, deleted by the same fold.
CREATE INDEX aiq_spend_day_empty ON aiq_spend_day (billing_date) WHERE calls = 0;

CREATE TABLE aiq_spend_month (
  month DATE NOT NULL,
  organization_id UUID,
  cost_micros BIGINT NOT NULL,
  calls BIGINT NOT NULL,
  CONSTRAINT aiq_spend_month_key UNIQUE NULLS NOT DISTINCT (month, organization_id)
);
-- The console's page of organisations by this month's spend, most first.
CREATE INDEX aiq_spend_month_rank ON aiq_spend_month (month, cost_micros DESC, organization_id);
CREATE INDEX aiq_spend_month_empty ON aiq_spend_month (month) WHERE calls = 0;

CREATE TABLE aiq_spend_platform (
  billing_date DATE NOT NULL,
  service_name TEXT NOT NULL,
  cost_micros BIGINT NOT NULL,
  calls BIGINT NOT NULL,
  PRIMARY KEY (billing_date, service_name)
);
CREATE INDEX aiq_spend_platform_empty ON aiq_spend_platform (billing_date) WHERE calls = 0;

CREATE FUNCTION aiq_spend_added() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO aiq_spend_delta (billing_date, organization_id, service_name, cost_micros, calls)
  SELECT billing_date, organization_id, service_name, (sum(cost_usd) * 1000000)::bigint, count(*)
  FROM added WHERE billing_date IS NOT NULL GROUP BY 1, 2, 3;
  RETURN NULL;
END
$$;

CREATE FUNCTION aiq_spend_removed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO aiq_spend_delta (billing_date, organization_id, service_name, cost_micros, calls)
  SELECT billing_date, organization_id, service_name, -(sum(cost_usd) * 1000000)::bigint, -count(*)
  FROM removed WHERE billing_date IS NOT NULL GROUP BY 1, 2, 3;
  RETURN NULL;
END
$$;

CREATE FUNCTION aiq_spend_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO aiq_spend_delta (billing_date, organization_id, service_name, cost_micros, calls)
  SELECT billing_date, organization_id, service_name, sum(micros)::bigint, sum(n)::bigint
  FROM (SELECT billing_date, organization_id, service_name, -(cost_usd * 1000000) AS micros, -1 AS n
        FROM removed
        UNION ALL
        SELECT billing_date, organization_id, service_name, cost_usd * 1000000, 1 FROM added) c
  WHERE billing_date IS NOT NULL
  GROUP BY 1, 2, 3
  HAVING sum(micros) <> 0 OR sum(n) <> 0;
  RETURN NULL;
END
$$;

-- TRUNCATE of the cost rows leaves nothing to sum.
CREATE FUNCTION aiq_spend_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM aiq_spend_delta;
  DELETE FROM aiq_spend_day;
  DELETE FROM aiq_spend_month;
  DELETE FROM aiq_spend_platform;
  RETURN NULL;
END
$$;

-- Folds at most `max_rows` deltas, oldest first; returns how many it folded. A second caller
-- waits for the first (both then see every delta committed before they fold).
CREATE FUNCTION aiq_fold_spend(max_rows INTEGER) RETURNS BIGINT LANGUAGE plpgsql AS $$
DECLARE
  n BIGINT;
BEGIN
  PERFORM pg_advisory_xact_lock(hashtext('aiq_fold_spend'));
  WITH moved AS (
    DELETE FROM aiq_spend_delta
    WHERE id IN (SELECT id FROM aiq_spend_delta ORDER BY id LIMIT max_rows)
    RETURNING billing_date, organization_id, service_name, cost_micros, calls
  ), day AS (
    INSERT INTO aiq_spend_day AS d (billing_date, organization_id, service_name, cost_micros, calls)
    SELECT billing_date, organization_id, service_name, sum(cost_micros), sum(calls)
    FROM moved GROUP BY 1, 2, 3
    ON CONFLICT ON CONSTRAINT aiq_spend_day_key DO UPDATE
      SET cost_micros = d.cost_micros + EXCLUDED.cost_micros, calls = d.calls + EXCLUDED.calls
  ), mon AS (
    INSERT INTO aiq_spend_month AS m (month, organization_id, cost_micros, calls)
    SELECT date_trunc('month', billing_date)::date, organization_id, sum(cost_micros), sum(calls)
    FROM moved GROUP BY 1, 2
    ON CONFLICT ON CONSTRAINT aiq_spend_month_key DO UPDATE
      SET cost_micros = m.cost_micros + EXCLUDED.cost_micros, calls = m.calls + EXCLUDED.calls
  ), platform AS (
    INSERT INTO aiq_spend_platform AS p (billing_date, service_name, cost_micros, calls)
    SELECT billing_date, service_name, sum(cost_micros), sum(calls)
    FROM moved GROUP BY 1, 2
    ON CONFLICT (billing_date, service_name) DO UPDATE
      SET cost_micros = p.cost_micros + EXCLUDED.cost_micros, calls = p.calls + EXCLUDED.calls
  )
  SELECT count(*) INTO n FROM moved;
  DELETE FROM aiq_spend_day WHERE calls = 0;
  DELETE FROM aiq_spend_month WHERE calls = 0;
  DELETE FROM aiq_spend_platform WHERE calls = 0;
  RETURN n;
END
$$;

-- No cost row is written between the triggers and the sums of the rows already there.
LOCK TABLE ai_cost_tracking IN SHARE ROW EXCLUSIVE MODE;

CREATE TRIGGER aiq_spend_added AFTER INSERT ON ai_cost_tracking
  REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION aiq_spend_added();
CREATE TRIGGER aiq_spend_removed AFTER DELETE ON ai_cost_tracking
  REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION aiq_spend_removed();
CREATE TRIGGER aiq_spend_changed AFTER UPDATE ON ai_cost_tracking
  REFERENCING OLD TABLE AS removed NEW TABLE AS added
  FOR EACH STATEMENT EXECUTE FUNCTION aiq_spend_changed();
CREATE TRIGGER aiq_spend_truncated AFTER TRUNCATE ON ai_cost_tracking
  FOR EACH STATEMENT EXECUTE FUNCTION aiq_spend_truncated();

INSERT INTO aiq_spend_day (billing_date, organization_id, service_name, cost_micros, calls)
SELECT billing_date, organization_id, service_name, (sum(cost_usd) * 1000000)::bigint, count(*)
FROM ai_cost_tracking WHERE billing_date IS NOT NULL GROUP BY 1, 2, 3;
INSERT INTO aiq_spend_month (month, organization_id, cost_micros, calls)
SELECT date_trunc('month', billing_date)::date, organization_id, sum(cost_micros), sum(calls)
FROM aiq_spend_day GROUP BY 1, 2;
INSERT INTO aiq_spend_platform (billing_date, service_name, cost_micros, calls)
SELECT billing_date, service_name, sum(cost_micros), sum(calls) FROM aiq_spend_day GROUP BY 1, 2;

-- The same row-level security as the cost rows they sum (20261203000012).
ALTER TABLE aiq_spend_delta ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY aiq_own ON aiq_spend_delta FOR ALL TO CURRENT_USER USING (true) WITH CHECK (true);
ALTER TABLE aiq_spend_day ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY aiq_own ON aiq_spend_day FOR ALL TO CURRENT_USER USING (true) WITH CHECK (true);
CREATE POLICY aiq_reader_org ON aiq_spend_day FOR SELECT TO aiq_reader
  USING (organization_id = NULLIF(current_setting('aiq.organization_id', true), '')::uuid);
GRANT SELECT ON aiq_spend_day TO aiq_reader;
ALTER TABLE aiq_spend_month ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY aiq_own ON aiq_spend_month FOR ALL TO CURRENT_USER USING (true) WITH CHECK (true);
CREATE POLICY aiq_reader_org ON aiq_spend_month FOR SELECT TO aiq_reader
  USING (organization_id = NULLIF(current_setting('aiq.organization_id', true), '')::uuid);
GRANT SELECT ON aiq_spend_month TO aiq_reader;
-- The platform's sums name no organisation: aiq's own, no reader's.
ALTER TABLE aiq_spend_platform ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY aiq_own ON aiq_spend_platform FOR ALL TO CURRENT_USER USING (true) WITH CHECK (true);
