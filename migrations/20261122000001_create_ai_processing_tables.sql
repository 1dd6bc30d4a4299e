-- The product plan's AI tables (shared/reference/seed-schema.sql), generalised from photos to any
-- subject: photo_id becomes subject_id (+ subject_type), the foreign keys to tables the daemon does
-- not own are dropped, timestamps carry a time zone, and each table gains the job columns and the
-- unique key that make a replayed job write nothing new.

CREATE TABLE ai_processing_results (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  subject_id UUID,
  subject_type TEXT,
  organization_id UUID,
  processing_type TEXT NOT NULL DEFAULT 'initial'
    CHECK (processing_type IN ('initial', 'reprocessing', 'correction')),
  ai_provider TEXT NOT NULL DEFAULT 'google_vision',
  raw_response JSONB NOT NULL,
  confidence_scores JSONB DEFAULT '{}',
  processing_time_ms INTEGER,
  api_cost_usd NUMERIC(12, 6),
  error_message TEXT,
  status TEXT NOT NULL DEFAULT 'completed'
    CHECK (status IN ('pending', 'processing', 'completed', 'failed')),
  created_at TIMESTAMPTZ DEFAULT NOW(),
  processed_at TIMESTAMPTZ,
  -- aiq's own columns
  job_id TEXT NOT NULL,
  job_kind TEXT NOT NULL,
  tier TEXT,
  model TEXT,
  correlation_id TEXT,
  attempts INTEGER NOT NULL DEFAULT 1,
  CONSTRAINT ai_processing_results_one_per_job UNIQUE (job_id)
);
CREATE INDEX ai_processing_results_org_created ON ai_processing_results (organization_id, created_at);

-- One row per provider call, success or failure. `execution` is the queue's lease token: a job
-- re-run after its worker died is a new execution whose calls are new rows, a replay of the same
-- execution writes nothing new.
CREATE TABLE ai_cost_tracking (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  organization_id UUID,
  service_name TEXT NOT NULL,
  operation_type TEXT NOT NULL,
  request_count INTEGER DEFAULT 1,
  cost_usd NUMERIC(12, 6) NOT NULL,
  billing_date DATE DEFAULT CURRENT_DATE,
  metadata JSONB DEFAULT '{}',
  created_at TIMESTAMPTZ DEFAULT NOW(),
  -- aiq's own columns
  job_id TEXT NOT NULL,
  attempt INTEGER NOT NULL,
  execution BIGINT NOT NULL DEFAULT 0,
  call_seq INTEGER NOT NULL DEFAULT 0,
  tier TEXT,
  model TEXT,
  units INTEGER,
  input_tokens INTEGER,
  cached_tokens INTEGER,
  output_tokens INTEGER,
  -- succeeded / failed: the provider answered; expired: the worker died during the call and the
  -- reservation was swept in at its estimate, because the provider may have billed it.
  call_status TEXT NOT NULL DEFAULT 'succeeded' CHECK (call_status IN ('succeeded', 'failed', 'expired')),
  price_version TEXT,
  estimate_usd NUMERIC(12, 6),
  CONSTRAINT ai_cost_tracking_one_per_call UNIQUE (job_id, execution, call_seq)
);
CREATE INDEX ai_cost_tracking_org_date ON ai_cost_tracking (organization_id, billing_date);
CREATE INDEX ai_cost_tracking_date ON ai_cost_tracking (billing_date);
-- The spike check reads the last 25 hours by created_at, every minute, in every process.
CREATE INDEX ai_cost_tracking_created ON ai_cost_tracking (created_at);

CREATE TABLE ai_processing_errors (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  subject_id UUID,
  organization_id UUID,
  error_type TEXT NOT NULL,
  error_message TEXT NOT NULL,
  error_details JSONB DEFAULT '{}',
  retry_count INTEGER DEFAULT 0,
  resolved_at TIMESTAMPTZ,
  created_at TIMESTAMPTZ DEFAULT NOW(),
  -- aiq's own columns
  job_id TEXT NOT NULL,
  job_kind TEXT,
  tier TEXT,
  provider TEXT,
  http_status INTEGER,
  CONSTRAINT ai_processing_errors_one_per_attempt UNIQUE (job_id, retry_count, error_type)
);
CREATE INDEX ai_processing_errors_org_created ON ai_processing_errors (organization_id, created_at);

-- Token usage of LLM calls. company_id is the plan's name for the organisation.
CREATE TABLE ai_usage (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  user_id UUID,
  organization_id UUID NOT NULL,
  company_id UUID GENERATED ALWAYS AS (organization_id) STORED,
  model VARCHAR(100) NOT NULL,
  endpoint VARCHAR(100) NOT NULL,
  input_tokens INTEGER NOT NULL,
  output_tokens INTEGER NOT NULL,
  cached_tokens INTEGER NOT NULL DEFAULT 0,
  cost_usd NUMERIC(12, 6) NOT NULL,
  subscription_tier VARCHAR(50) NOT NULL,
  created_at TIMESTAMPTZ DEFAULT NOW(),
  job_id TEXT NOT NULL,
  attempt INTEGER NOT NULL,
  execution BIGINT NOT NULL DEFAULT 0,
  call_seq INTEGER NOT NULL DEFAULT 0,
  CONSTRAINT ai_usage_one_per_call UNIQUE (job_id, execution, call_seq)
);
CREATE INDEX idx_ai_usage_user_date ON ai_usage (user_id, created_at);
CREATE INDEX idx_ai_usage_company_date ON ai_usage (company_id, created_at);
CREATE INDEX idx_ai_usage_cost_tracking ON ai_usage (created_at, cost_usd);
