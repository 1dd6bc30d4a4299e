-- A call the provider answered with a success status but whose body aiq cannot use (not the
-- documented shape, empty, cut off, or counts no model can produce) has most likely been billed:
-- it is recorded at its reservation's estimate with a status of its own.
ALTER TABLE ai_cost_tracking
  DROP CONSTRAINT ai_cost_tracking_call_status_check,
  ADD CONSTRAINT ai_cost_tracking_call_status_check
    CHECK (call_status IN ('succeeded', 'failed', 'expired', 'unusable'));
