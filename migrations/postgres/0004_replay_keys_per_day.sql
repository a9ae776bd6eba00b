-- Replay check, cheaper: every day's partition keeps its (room_id, iv) pairs unique with an
-- index of its own, named <partition>_iv. A repeat of a message stored the same day is then
-- refused by the insert itself, and the writers' lookup visits only the other days of the
-- replay window (usually yesterday). The server creates the index with each new partition
-- (PgStore::ensure_partitions). A partition that already holds a repeated pair (possible only
-- if a clock stepped back) gets a plain index instead, and the writers keep looking into it.
DO $$
DECLARE
    part text;
BEGIN
    FOR part IN
        SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'messages'::regclass
    LOOP
        BEGIN
            EXECUTE format('CREATE UNIQUE INDEX %I ON %I (room_id, iv)', part || '_iv', part);
        EXCEPTION WHEN unique_violation THEN
            EXECUTE format('CREATE INDEX %I ON %I (room_id, iv)', part || '_iv', part);
        END;
    END LOOP;
END $$;
-- The partitioned index it replaces (and its copy on every partition).
DROP INDEX messages_room_iv;
