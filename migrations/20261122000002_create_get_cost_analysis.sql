-- The product plan's cost analysis function, as the plan wrote it: apps call it and it must keep
-- returning the same shape from the rows aiq writes.
CREATE OR REPLACE FUNCTION get_cost_analysis(p_organization_id UUID, p_days INTEGER DEFAULT 30)
RETURNS TABLE (
  service_name TEXT,
  total_cost DECIMAL,
  request_count BIGINT,
  avg_cost_per_request DECIMAL,
  cost_trend DECIMAL
) AS $$
BEGIN
  RETURN QUERY
  SELECT
    act.service_name,
    SUM(act.cost_usd) as total_cost,
    SUM(act.request_count) as request_count,
    AVG(act.cost_usd / act.request_count) as avg_cost_per_request,
    (SUM(CASE WHEN act.billing_date >= CURRENT_DATE - 7 THEN act.cost_usd ELSE 0 END) /
     NULLIF(SUM(CASE WHEN act.billing_date < CURRENT_DATE - 7 THEN act.cost_usd ELSE 0 END), 0)) as cost_trend
  FROM ai_cost_tracking act
  WHERE act.organization_id = p_organization_id
    AND act.billing_date >= CURRENT_DATE - p_days
  GROUP BY act.service_name
  ORDER BY total_cost DESC;
END;
$$ LANGUAGE plpgsql SECURITY DEFINER;
