-- NanoChat SQLite schema, version 4: the history index leaves the messages table.
-- The messages' primary key (room_id, seq) was a B-tree the server wrote one random leaf of
-- per room and commit: with many busy rooms, a commit wrote about a page per message. The
-- rows are now kept in the order they were stored (`id`, an explicit alias of the rowid so that
-- VACUUM keeps the numbers), and (room_id, seq) → id goes into a table of its own that the
-- server fills in large sorted steps together with the replay keys (see
-- src/store/sqlite/index.rs); `replay_index.indexed_through` now covers both tables.

CREATE TABLE messages_by_id (
    id         INTEGER PRIMARY KEY,
    room_id    BLOB NOT NULL,
    seq        INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    epoch      INTEGER NOT NULL,
    iv         BLOB NOT NULL,
    ct         BLOB NOT NULL
);
INSERT INTO messages_by_id (id, room_id, seq, created_at, epoch, iv, ct)
    SELECT rowid, room_id, seq, created_at, epoch, iv, ct FROM messages ORDER BY rowid;
DROP TABLE messages;
ALTER TABLE messages_by_id RENAME TO messages;
CREATE INDEX messages_created ON messages (created_at);

CREATE TABLE message_seqs (
    room_id BLOB NOT NULL,
    seq     INTEGER NOT NULL,
    id      INTEGER NOT NULL,           -- messages.id
    PRIMARY KEY (room_id, seq)
) WITHOUT ROWID;
INSERT INTO message_seqs (room_id, seq, id) SELECT room_id, seq, id FROM messages ORDER BY room_id, seq;
