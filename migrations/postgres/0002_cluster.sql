-- A keyed check value of the server secret (HKDF output, not the secret): every node of a
-- cluster must use the same secret; a node started with another one refuses to start.
CREATE TABLE server_identity (
    key   text PRIMARY KEY,
    value bytea NOT NULL
);
-- Room creations in the last minute, counted by every node for the cluster-wide creation
-- limit and the proof-of-work signal.
CREATE INDEX rooms_created ON rooms (created_at);
