-- Row-level security for Supabase: the product plan's policy, for Supabase's `authenticated`
-- role. A signed-in user reads the rows of the organisation its row in public.users names:
--   organization_id = (SELECT organization_id FROM public.users WHERE id = auth.uid())
-- Not one of aiq's migrations (sqlx reads only the files directly in migrations/): an operator
-- installs it after `aiq migrate`, as a role that owns the tables or a superuser, e.g.
--   psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f migrations/optional/supabase_rls.sql
-- It needs auth.uid() and public.users (id, organization_id), and `authenticated` must be able to
-- read its own users row. It adds to aiq's policies (migrations/20261203000012_*) and can be
-- installed again: each policy is dropped and created. `authenticated` gets SELECT only.
BEGIN;

DROP POLICY IF EXISTS supabase_user_org ON public.ai_processing_results;
CREATE POLICY supabase_user_org ON public.ai_processing_results FOR SELECT TO authenticated
  USING (organization_id = (SELECT u.organization_id FROM public.users u WHERE u.id = auth.uid()));
GRANT SELECT ON public.ai_processing_results TO authenticated;

DROP POLICY IF EXISTS supabase_user_org ON public.ai_cost_tracking;
CREATE POLICY supabase_user_org ON public.ai_cost_tracking FOR SELECT TO authenticated
  USING (organization_id = (SELECT u.organization_id FROM public.users u WHERE u.id = auth.uid()));
GRANT SELECT ON public.ai_cost_tracking TO authenticated;

DROP POLICY IF EXISTS supabase_user_org ON public.ai_usage;
CREATE POLICY supabase_user_org ON public.ai_usage FOR SELECT TO authenticated
  USING (organization_id = (SELECT u.organization_id FROM public.users u WHERE u.id = auth.uid()));
GRANT SELECT ON public.ai_usage TO authenticated;

DROP POLICY IF EXISTS supabase_user_org ON public.ai_processing_errors;
CREATE POLICY supabase_user_org ON public.ai_processing_errors FOR SELECT TO authenticated
  USING (organization_id = (SELECT u.organization_id FROM public.users u WHERE u.id = auth.uid()));
GRANT SELECT ON public.ai_processing_errors TO authenticated;

DROP POLICY IF EXISTS supabase_user_org ON public.ai_cost_alerts;
CREATE POLICY supabase_user_org ON public.ai_cost_alerts FOR SELECT TO authenticated
  USING (organization_id = (SELECT u.organization_id FROM public.users u WHERE u.id = auth.uid()));
GRANT SELECT ON public.ai_cost_alerts TO authenticated;

DROP POLICY IF EXISTS supabase_user_org ON public.ai_corrections;
CREATE POLICY supabase_user_org ON public.ai_corrections FOR SELECT TO authenticated
  USING (organization_id = (SELECT u.organization_id FROM public.users u WHERE u.id = auth.uid()));
GRANT SELECT ON public.ai_corrections TO authenticated;

COMMIT;
