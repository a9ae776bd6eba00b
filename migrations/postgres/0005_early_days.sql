-- Replay check without reading yesterday. A message is accepted with an epoch at most one day
-- from the server's, so a copy of a message of epoch E can be stored on day E - 1 only if it
-- was sent early (the sender's clock a day ahead). Each room row remembers the latest UTC day
-- (days since 1970-01-01) on which it stored such a message; the writers look into day E - 1
-- for a room only when that day is this one or later. Most messages then need no index
-- lookup in another day's partition at all: their own day's unique key refuses a repeat.
-- Messages stored before this version carry no mark: the writers look into every day up to
-- the second day after this migration was applied (schema_migrations.applied_at), so binaries
-- of version 4 still running beside it during the upgrade are covered.
ALTER TABLE rooms ADD COLUMN early_day integer;
