-- A job id is unique only within its organisation: an app may choose its own ids, and two
-- organisations may choose the same one. Every row is keyed by (organization_id, job_id, ...), so
-- a replay writes nothing new, an insert is never dropped because another organisation's row holds
-- the id, and a read-back (the cost the budget settles, the outcome check before a call) can only
-- find the organisation's own row. The old keys are strictly narrower, so no existing row breaks
-- the new ones.
ALTER TABLE ai_processing_results
  DROP CONSTRAINT ai_processing_results_one_per_job,
  ADD CONSTRAINT ai_processing_results_one_per_job UNIQUE (organization_id, job_id);
ALTER TABLE ai_cost_tracking
  DROP CONSTRAINT ai_cost_tracking_one_per_call,
  ADD CONSTRAINT ai_cost_tracking_one_per_call UNIQUE (organization_id, job_id, execution, call_seq);
ALTER TABLE ai_usage
  DROP CONSTRAINT ai_usage_one_per_call,
  ADD CONSTRAINT ai_usage_one_per_call UNIQUE (organization_id, job_id, execution, call_seq);
ALTER TABLE ai_processing_errors
  DROP CONSTRAINT ai_processing_errors_one_per_call,
  ADD CONSTRAINT ai_processing_errors_one_per_call
    UNIQUE (organization_id, job_id, retry_count, call_seq, error_type);
