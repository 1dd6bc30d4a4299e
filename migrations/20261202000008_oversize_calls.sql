-- A call the provider answered with a success status and a body above AIQ_MAX_RESPONSE_MB: aiq
-- stops reading at the cap, and records the call at its reservation's estimate, since the
-- provider has most likely billed it.
ALTER TABLE ai_cost_tracking
  DROP CONSTRAINT ai_cost_tracking_call_status_check,
  ADD CONSTRAINT ai_cost_tracking_call_status_check
    CHECK (call_status IN ('succeeded', 'failed', 'expired', 'unusable', 'oversize'));
