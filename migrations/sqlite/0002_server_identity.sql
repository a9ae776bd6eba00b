-- A keyed check value of the server secret (HKDF output, not the secret): a server started
-- with another secret than the one this database was set up with refuses to start.
CREATE TABLE server_identity (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
