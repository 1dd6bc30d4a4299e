-- Per-organisation limits an operator changes at run time (`aiq org set-limits`), beside the
-- dollar overrides: the most jobs of the organisation leased at once across the fleet, and its
-- jobs per minute. NULL keeps the tier's default (AIQ_ORG_MAX_IN_FLIGHT, AIQ_ORG_JOBS_PER_MINUTE);
-- 0 means no limit for this organisation, as 0 does in those settings.
ALTER TABLE ai_cost_limits
  ADD COLUMN max_in_flight INTEGER CHECK (max_in_flight BETWEEN 0 AND 1000000),
  ADD COLUMN jobs_per_minute INTEGER CHECK (jobs_per_minute BETWEEN 0 AND 1000000000);
