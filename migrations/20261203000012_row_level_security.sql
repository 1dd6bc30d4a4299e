-- Row-level security on the tables that hold an organisation's AI data. Each table is forced,
-- so its owner is held to policies too, and has two:
--   aiq_own: the role running this migration (aiq's own role: `aiq migrate` and `aiq run` use the
--     one AIQ_DATABASE_URL) reads and writes every row, through a policy rather than ownership.
--     It reads no setting, so nothing an app sets on a session can narrow or break aiq's writes.
--   aiq_reader_org: the NOLOGIN role aiq_reader, which an operator grants to an app's login role,
--     reads the rows of the organisation named by the transaction's setting
--     (SET LOCAL aiq.organization_id = '<uuid>'). No setting, or an empty one, matches nothing;
--     a value that is not a UUID is an error. Platform-wide alerts (organization_id NULL) match
--     no setting. aiq_reader gets SELECT only.
-- Roles belong to the whole cluster, so aiq_reader is created only when absent; a migrating role
-- without CREATEROLE gets an error that says what to run instead.
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'aiq_reader') THEN
    BEGIN
      CREATE ROLE aiq_reader NOLOGIN;
    EXCEPTION
      -- Another database's migration created it meanwhile.
      WHEN duplicate_object OR unique_violation THEN NULL;
      WHEN insufficient_privilege THEN
        RAISE EXCEPTION 'the role aiq_reader does not exist and % may not create it: as a role '
          'with CREATEROLE, run CREATE ROLE aiq_reader NOLOGIN, then aiq migrate again', current_user
          USING ERRCODE = 'insufficient_privilege';
    END;
  END IF;
END
$$;

-- The plan's cost analysis ran as its owner, which would hand any caller every organisation's
-- costs past the policies. It runs as its caller now: aiq still sees every row, a reader its own.
ALTER FUNCTION get_cost_analysis(UUID, INTEGER) SECURITY INVOKER;

-- The policies filter on organization_id. ai_processing_results, ai_cost_tracking,
-- ai_processing_errors and ai_corrections have an index leading with it, ai_usage its unique
-- key; the alerts had none.
CREATE INDEX ai_cost_alerts_org_created ON ai_cost_alerts (organization_id, created_at);

ALTER TABLE ai_processing_results ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY aiq_own ON ai_processing_results FOR ALL TO CURRENT_USER USING (true) WITH CHECK (true);
CREATE POLICY aiq_reader_org ON ai_processing_results FOR SELECT TO aiq_reader
  USING (organization_id = NULLIF(current_setting('aiq.organization_id', true), '')::uuid);
GRANT SELECT ON ai_processing_results TO aiq_reader;

ALTER TABLE ai_cost_tracking ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY aiq_own ON ai_cost_tracking FOR ALL TO CURRENT_USER USING (true) WITH CHECK (true);
CREATE POLICY aiq_reader_org ON ai_cost_tracking FOR SELECT TO aiq_reader
  USING (organization_id = NULLIF(current_setting('aiq.organization_id', true), '')::uuid);
GRANT SELECT ON ai_cost_tracking TO aiq_reader;

ALTER TABLE ai_usage ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY aiq_own ON ai_usage FOR ALL TO CURRENT_USER USING (true) WITH CHECK (true);
CREATE POLICY aiq_reader_org ON ai_usage FOR SELECT TO aiq_reader
  USING (organization_id = NULLIF(current_setting('aiq.organization_id', true), '')::uuid);
GRANT SELECT ON ai_usage TO aiq_reader;

ALTER TABLE ai_processing_errors ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY aiq_own ON ai_processing_errors FOR ALL TO CURRENT_USER USING (true) WITH CHECK (true);
CREATE POLICY aiq_reader_org ON ai_processing_errors FOR SELECT TO aiq_reader
  USING (organization_id = NULLIF(current_setting('aiq.organization_id', true), '')::uuid);
GRANT SELECT ON ai_processing_errors TO aiq_reader;

ALTER TABLE ai_cost_alerts ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY aiq_own ON ai_cost_alerts FOR ALL TO CURRENT_USER USING (true) WITH CHECK (true);
CREATE POLICY aiq_reader_org ON ai_cost_alerts FOR SELECT TO aiq_reader
  USING (organization_id = NULLIF(current_setting('aiq.organization_id', true), '')::uuid);
GRANT SELECT ON ai_cost_alerts TO aiq_reader;

ALTER TABLE ai_corrections ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY aiq_own ON ai_corrections FOR ALL TO CURRENT_USER USING (true) WITH CHECK (true);
CREATE POLICY aiq_reader_org ON ai_corrections FOR SELECT TO aiq_reader
  USING (organization_id = NULLIF(current_setting('aiq.organization_id', true), '')::uuid);
GRANT SELECT ON ai_corrections TO aiq_reader;
