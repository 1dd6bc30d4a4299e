-- What operators did, and who: one row per step of an action (`aiq org export` and `aiq org
-- purge` write one when they start and one when they end, with their counts). Generic, so the
-- console's actions can be recorded here too. `actor` is the name the operator gave (--by),
-- `action` a dotted name such as 'org.purge.end', `details` the action's own facts. Rows are
-- never updated; a purge of an organisation keeps them (they are the record that it happened).
CREATE TABLE aiq_audit_log (
  id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  actor TEXT NOT NULL CHECK (length(actor) BETWEEN 1 AND 200),
  action TEXT NOT NULL CHECK (length(action) BETWEEN 1 AND 100),
  organization_id UUID,
  details JSONB NOT NULL DEFAULT '{}'
);
CREATE INDEX aiq_audit_log_org_at ON aiq_audit_log (organization_id, at);
