-- In-call retries and fallbacks make several provider calls in one attempt. An error row is now
-- one per call: call_seq numbers the calls of an execution, as in ai_cost_tracking. Rows written
-- before this migration keep call_seq 0, which is what they were.
ALTER TABLE ai_processing_errors ADD COLUMN call_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE ai_processing_errors DROP CONSTRAINT ai_processing_errors_one_per_attempt;
ALTER TABLE ai_processing_errors
  ADD CONSTRAINT ai_processing_errors_one_per_call UNIQUE (job_id, retry_count, call_seq, error_type);
