-- Per-organisation spending limits that override the tier defaults from the settings. NULL keeps
-- the tier default for that window.
CREATE TABLE ai_cost_limits (
  organization_id UUID PRIMARY KEY,
  daily_limit_usd NUMERIC(12, 6) CHECK (daily_limit_usd >= 0),
  monthly_limit_usd NUMERIC(12, 6) CHECK (monthly_limit_usd >= 0),
  note TEXT,
  updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

-- Budget alerts, one per (scope, window, threshold): the unique key is what makes an alert fire
-- exactly once however many processes cross the threshold. Rows are also the delivery outbox:
-- delivered_at stays NULL until the webhook accepted it.
CREATE TABLE ai_cost_alerts (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  scope TEXT NOT NULL,                 -- 'global' or 'org:<uuid>'
  organization_id UUID,
  window_kind TEXT NOT NULL CHECK (window_kind IN ('day', 'month', 'hour')),
  window_start TEXT NOT NULL,          -- '2026-11-22', '2026-11', or '2026-11-22T14' for spikes
  threshold TEXT NOT NULL,             -- '80', '95', '100' (percent of the limit) or 'spike'
  spent_usd NUMERIC(12, 6) NOT NULL,
  limit_usd NUMERIC(12, 6),
  message TEXT NOT NULL,
  created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  delivery_attempts INTEGER NOT NULL DEFAULT 0,
  next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  last_delivery_error TEXT,
  delivered_at TIMESTAMPTZ,
  CONSTRAINT ai_cost_alerts_once UNIQUE (scope, window_kind, window_start, threshold)
);
CREATE INDEX ai_cost_alerts_undelivered ON ai_cost_alerts (next_attempt_at) WHERE delivered_at IS NULL;
