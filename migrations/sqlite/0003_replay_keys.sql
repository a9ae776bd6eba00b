-- NanoChat SQLite schema, version 3: the replay check's keys leave the messages table.
-- Each message's (room_id, iv) used to go into a unique index on messages as the message was
-- stored: one random leaf page written per message. The keys now live in a table of their
-- own that the server fills in large sorted steps, keeping the newest keys in memory until
-- then (see src/store/sqlite/replay.rs).

CREATE TABLE message_ivs (
    room_id BLOB NOT NULL,
    iv      BLOB NOT NULL,
    PRIMARY KEY (room_id, iv)
) WITHOUT ROWID;
INSERT INTO message_ivs (room_id, iv) SELECT room_id, iv FROM messages ORDER BY room_id, iv;
DROP INDEX messages_room_iv;

-- Every message at or below this rowid has its key in message_ivs; on start the server puts
-- the keys of the messages above it (stored before a crash) into the table.
CREATE TABLE replay_index (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    indexed_through INTEGER NOT NULL
);
INSERT INTO replay_index (id, indexed_through)
    SELECT 1, COALESCE(MAX(rowid), 0) FROM messages;
