-- Signed webhooks (Standard Webhooks) for jobs' final states.
--
-- webhook_endpoints: an organisation's receivers. `secrets` holds one or more `whsec_` secrets,
-- newest first: during a rotation every one of them signs (one `v1,` signature each), so a
-- receiver can move to the new one at its pace. `failing_since` is the first failure of the
-- current run of failures (a success clears it); `aiq webhooks list` shows an endpoint failing
-- once that is older than AIQ_WEBHOOK_FAILING_AFTER_S.
CREATE TABLE webhook_endpoints (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  organization_id UUID NOT NULL,
  url TEXT NOT NULL CHECK (length(url) <= 2048),
  secrets TEXT[] NOT NULL CHECK (cardinality(secrets) BETWEEN 1 AND 8),
  created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  disabled BOOLEAN NOT NULL DEFAULT FALSE,
  failing_since TIMESTAMPTZ,
  last_error TEXT
);
CREATE INDEX webhook_endpoints_by_org ON webhook_endpoints (organization_id) WHERE NOT disabled;

-- webhook_outbox: one message per (job, target), written in the same transaction as the job's
-- final ai_processing_results row, so a job with an outcome always has its deliveries and a
-- replayed write adds none (the unique key). `id` is the message's `webhook-id`, the same on
-- every try; `body` is the exact JSON text sent (and signed) on every try. The target is an
-- endpoint (`target` = its id) or the job's own callback_url (`target` = 'callback').
CREATE TABLE webhook_outbox (
  id TEXT PRIMARY KEY,
  organization_id UUID NOT NULL,
  job_id TEXT NOT NULL,
  target TEXT NOT NULL,
  endpoint_id UUID REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
  callback_url TEXT CHECK (length(callback_url) <= 2048),
  event_type TEXT NOT NULL
    CHECK (event_type IN ('job.succeeded', 'job.failed', 'job.dead', 'job.cancelled')),
  body TEXT NOT NULL,
  created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  attempts INTEGER NOT NULL DEFAULT 0,
  next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  first_failed_at TIMESTAMPTZ,
  delivered_at TIMESTAMPTZ,
  given_up_at TIMESTAMPTZ,
  last_status INTEGER,
  last_error TEXT,
  CONSTRAINT webhook_outbox_one_per_target UNIQUE (organization_id, job_id, target),
  CONSTRAINT webhook_outbox_one_target CHECK ((endpoint_id IS NULL) <> (callback_url IS NULL))
);
-- The hot path adds a row per job and receiver: two indexes only (the key and the due messages;
-- `aiq webhooks list` counts an endpoint's pending messages through the second). Finished
-- messages are pruned after a week by the delivery loop, oldest first, in bounded steps.
CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt_at)
  WHERE delivered_at IS NULL AND given_up_at IS NULL;
CREATE INDEX webhook_outbox_finished ON webhook_outbox (created_at)
  WHERE delivered_at IS NOT NULL OR given_up_at IS NOT NULL;
