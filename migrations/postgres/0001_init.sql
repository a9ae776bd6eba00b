-- NanoChat schema for Postgres, version 1.
-- Append-only: never edit a released migration; add the next number instead.

CREATE TABLE rooms (
    id           bytea PRIMARY KEY,            -- 16-byte room id
    auth_wrapped bytea NOT NULL,               -- auth key wrapped with the server's wrap key
    created_at   timestamptz NOT NULL,
    last_active  timestamptz NOT NULL,         -- creation or last message
    last_seq     bigint NOT NULL DEFAULT 0,
    wiped_at     timestamptz                   -- set by panic: the room is a tombstone
);
CREATE INDEX rooms_idle ON rooms (last_active) WHERE wiped_at IS NULL;
CREATE INDEX rooms_tombstones ON rooms (wiped_at) WHERE wiped_at IS NOT NULL;

-- One partition per UTC day (messages_pYYYYMMDD), created ahead and dropped whole by the
-- maintenance task once every row in it is older than the retention.
CREATE TABLE messages (
    room_id    bytea NOT NULL,
    seq        bigint NOT NULL,
    created_at timestamptz NOT NULL,
    epoch      integer NOT NULL,
    iv         bytea NOT NULL,
    ct         bytea NOT NULL,
    PRIMARY KEY (room_id, seq, created_at)
) PARTITION BY RANGE (created_at);
-- Replay check: a room never stores one IV twice (checked under the room's row lock).
CREATE INDEX messages_room_iv ON messages (room_id, iv);

-- Spent proof-of-work tokens, kept until they expire; shared by every server process.
CREATE TABLE pow_spent (
    nonce      bytea PRIMARY KEY,
    expires_at timestamptz NOT NULL
);
CREATE INDEX pow_spent_expires ON pow_spent (expires_at);
