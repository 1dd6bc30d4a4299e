-- Retention (AIQ_RETAIN_*): a raw answer older than its retention is replaced by a marker and
-- the time it was pruned is kept; the row stays. The pruner finds its next batch through these
-- indexes, oldest first: a raw answer not pruned yet, and any row of a table it deletes from.
-- ai_usage (created_at, cost_usd) and ai_cost_tracking (created_at) already have theirs.
ALTER TABLE ai_processing_results ADD COLUMN raw_pruned_at TIMESTAMPTZ;
CREATE INDEX ai_processing_results_raw_unpruned ON ai_processing_results (created_at)
  WHERE raw_pruned_at IS NULL;
CREATE INDEX ai_processing_results_created ON ai_processing_results (created_at);
CREATE INDEX ai_processing_errors_created ON ai_processing_errors (created_at);
