-- NanoChat schema for the embedded SQLite backend, version 1.
-- Append-only: never edit a released migration; add the next number instead.
-- Times are milliseconds since the Unix epoch.

CREATE TABLE rooms (
    id           BLOB PRIMARY KEY,      -- 16-byte room id
    auth_wrapped BLOB NOT NULL,         -- auth key wrapped with the server's wrap key
    created_at   INTEGER NOT NULL,
    last_active  INTEGER NOT NULL,      -- creation or last message
    last_seq     INTEGER NOT NULL DEFAULT 0,
    wiped_at     INTEGER                -- set by panic: the room is a tombstone
);
CREATE INDEX rooms_idle ON rooms (last_active) WHERE wiped_at IS NULL;
CREATE INDEX rooms_tombstones ON rooms (wiped_at) WHERE wiped_at IS NOT NULL;

CREATE TABLE messages (
    room_id    BLOB NOT NULL,
    seq        INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    epoch      INTEGER NOT NULL,
    iv         BLOB NOT NULL,
    ct         BLOB NOT NULL,
    PRIMARY KEY (room_id, seq)
);
CREATE UNIQUE INDEX messages_room_iv ON messages (room_id, iv);
CREATE INDEX messages_created ON messages (created_at);
