-- Token and unit counts are BIGINT: a provider's count above 2^31 (a bug of theirs, or a
-- long-context batch) must be stored as it was reported, never wrapped or refused by the column
-- after the call was paid. The columns widen in place; every value fits.
ALTER TABLE ai_cost_tracking
  ALTER COLUMN units TYPE BIGINT,
  ALTER COLUMN input_tokens TYPE BIGINT,
  ALTER COLUMN cached_tokens TYPE BIGINT,
  ALTER COLUMN output_tokens TYPE BIGINT;
ALTER TABLE ai_usage
  ALTER COLUMN input_tokens TYPE BIGINT,
  ALTER COLUMN output_tokens TYPE BIGINT,
  ALTER COLUMN cached_tokens TYPE BIGINT;
