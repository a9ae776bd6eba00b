-- Replay check without reading yesterday. A message is accepted with an epoch at most one day
-- from the server's, so a copy of a message of epoch E can be stored on day E - 1 only if it
-- was sent early (the sender's clock a day ahead). Each room row remembers the latest UTC day
-- (days since 1970-01-01) on which it stored such a message; the writers look into day E - 1
-- for a room only when that day is this one or later. Most messages then need no index
-- lookup in another day's partition at all: their own day's unique key refuses a repeat.
ALTER TABLE rooms ADD COLUMN early_day integer;
-- The first day whose early messages are marked. Messages stored before this version carry no
-- mark: on a database that holds messages, the writers look into every day of the window up
-- to the second day after this migration, so binaries of version 4 still running beside a
-- newer one during the upgrade are covered. A database without any has nothing unmarked.
CREATE TABLE early_marks (from_day integer NOT NULL);
INSERT INTO early_marks (from_day)
SELECT CASE WHEN EXISTS (SELECT 1 FROM messages)
            THEN (now() AT TIME ZONE 'UTC')::date - DATE '1970-01-01' + 2
            ELSE -2147483648 END;
