-- The product plan's ai_corrections table and get_ai_accuracy_metrics(). Apps write corrections
-- when a user changes what an AI answer said; aiq only reads them. As in the first migration,
-- photo_id becomes subject_id (+ subject_type), the foreign keys to tables aiq does not own are
-- dropped, and timestamps carry a time zone. organization_id is NOT NULL: row-level security
-- keys every read by it, so a correction without one could never be read by its app. job_id
-- names the aiq job whose answer was corrected, when the app knows it.
CREATE TABLE ai_corrections (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  subject_id UUID,
  subject_type TEXT,
  user_id UUID,
  organization_id UUID NOT NULL,
  correction_type TEXT NOT NULL CHECK (correction_type IN ('tag_added', 'tag_removed',
    'tag_modified', 'description_edited', 'suggestion_accepted', 'suggestion_rejected')),
  original_value JSONB,
  corrected_value JSONB,
  ai_confidence NUMERIC(3, 2) CHECK (ai_confidence BETWEEN 0 AND 1),
  user_confidence TEXT CHECK (user_confidence IN ('low', 'medium', 'high')),
  context_data JSONB DEFAULT '{}',
  created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  job_id TEXT
);
CREATE INDEX ai_corrections_org_created ON ai_corrections (organization_id, created_at);

-- An organisation's accuracy over the last p_days days (now() - p_days days, to now): how many
-- answers aiq completed, how many corrections users made, and how often they kept what the AI
-- suggested. The plan built its interval with Python's '%s days' % p_days, which PostgreSQL does
-- not parse; make_interval takes the number as it is. Ratios are NULL when their denominator is
-- 0 and are rounded to 4 places. It runs as its caller, so row-level security applies to it.
CREATE FUNCTION get_ai_accuracy_metrics(p_organization_id UUID, p_days INTEGER DEFAULT 30)
RETURNS TABLE (
  results_completed BIGINT,
  total_corrections BIGINT,
  suggestions_accepted BIGINT,
  suggestions_rejected BIGINT,
  acceptance_rate NUMERIC,
  corrections_per_result NUMERIC,
  avg_confidence_accepted NUMERIC,
  avg_confidence_rejected NUMERIC,
  corrections_by_type JSONB
) AS $$
BEGIN
  IF p_days IS NULL OR p_days < 0 THEN
    RAISE EXCEPTION 'get_ai_accuracy_metrics: p_days must be 0 or more, not %', p_days
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  RETURN QUERY
  WITH c AS (
    SELECT ac.correction_type, ac.ai_confidence
    FROM ai_corrections ac
    WHERE ac.organization_id = p_organization_id
      AND ac.created_at >= NOW() - make_interval(days => p_days)
  ), r AS (
    SELECT count(*) AS n
    FROM ai_processing_results pr
    WHERE pr.organization_id = p_organization_id
      AND pr.status = 'completed'
      AND pr.created_at >= NOW() - make_interval(days => p_days)
  ), t AS (
    SELECT
      count(*) AS total,
      count(*) FILTER (WHERE c.correction_type = 'suggestion_accepted') AS accepted,
      count(*) FILTER (WHERE c.correction_type = 'suggestion_rejected') AS rejected,
      avg(c.ai_confidence) FILTER (WHERE c.correction_type = 'suggestion_accepted') AS conf_accepted,
      avg(c.ai_confidence) FILTER (WHERE c.correction_type = 'suggestion_rejected') AS conf_rejected
    FROM c
  )
  SELECT
    r.n,
    t.total,
    t.accepted,
    t.rejected,
    round(t.accepted::numeric / NULLIF(t.accepted + t.rejected, 0), 4),
    round(t.total::numeric / NULLIF(r.n, 0), 4),
    round(t.conf_accepted, 4),
    round(t.conf_rejected, 4),
    COALESCE((SELECT jsonb_object_agg(g.correction_type, g.n)
              FROM (SELECT c.correction_type, count(*) AS n FROM c GROUP BY c.correction_type) g),
             '{}'::jsonb)
  FROM r, t;
END;
$$ LANGUAGE plpgsql STABLE;
