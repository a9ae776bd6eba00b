-- NanoChat SQLite schema, version 5: replay keys are written in runs of sorted blocks, kept for
-- the replay window.
-- message_ivs kept every stored message's (room_id, iv) in one B-tree. The keys are random, so
-- each sorted step of new keys landed on more distinct leaves the larger the table grew, and
-- the writer's cost per message grew with the number of messages stored. Now each step is a
-- run of its own, stored as blocks of 128 sorted keys (a row per block, appended), so a key
-- costs the same however many are stored. A key only has to be found while a copy of its
-- message could still be accepted (within a day of the message's epoch, as on Postgres: see
-- `replay_window_start`), so a run is deleted whole three days after the newest message it
-- holds (see src/store/sqlite/index.rs).

CREATE TABLE replay_runs (
    run       INTEGER PRIMARY KEY,
    newest_ms INTEGER NOT NULL          -- no message whose key is in the run is newer
);
CREATE TABLE replay_blocks (
    run   INTEGER NOT NULL,
    first BLOB NOT NULL,                -- the block's smallest key: room_id followed by iv
    keys  BLOB NOT NULL,                -- up to 128 keys of 28 bytes, ascending
    PRIMARY KEY (run, first)
);
DROP TABLE message_ivs;

-- The keys of the messages a window can still reach (stored from three UTC days back) are put
-- into runs at start, as after a crash: the mark moves below them.
UPDATE replay_index SET indexed_through = MIN(indexed_through, COALESCE(
    (SELECT MIN(id) - 1 FROM messages
     WHERE created_at >= (CAST(strftime('%s', 'now') AS INTEGER) / 86400 - 3) * 86400000),
    indexed_through));
