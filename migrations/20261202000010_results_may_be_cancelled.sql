-- A job cancelled while it waited (jobs/cancel.lua) gets a result row of its own status: it
-- never ran and cost nothing.
ALTER TABLE ai_processing_results
  DROP CONSTRAINT ai_processing_results_status_check,
  ADD CONSTRAINT ai_processing_results_status_check
    CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'cancelled'));
-- `aiq job show ID` finds a job Redis has forgotten by its id alone.
CREATE INDEX ai_processing_results_job ON ai_processing_results (job_id);
