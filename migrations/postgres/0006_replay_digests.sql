-- Replay keys as 64-bit digests. Each day's partition kept its (room_id, iv) pairs unique with
-- an index of its own (version 4): 40 bytes an entry, inserted at a random place, and at a few
-- million messages a day larger than the buffer cache. From this version the servers also
-- write `replay_key`, the first 8 bytes of HMAC-SHA256(the key below, room_id || iv), and the
-- partitions they make from now on keep that unique instead (`<partition>_rk`): 16 bytes an
-- entry, compared as integers. The key is the database's own, so every server on it computes
-- the same digests, and clients cannot choose IVs whose digests meet. Two different pairs of
-- one day with one digest (at 100 million messages a day, about once in ten years) are both
-- stored, the second without a digest; partitions made before this version keep their
-- (room_id, iv) index and are looked into by it.
ALTER TABLE messages ADD COLUMN replay_key bigint;
-- 32 bytes from the server's strong random source (each version 4 UUID carries 122 bits).
INSERT INTO server_identity (key, value)
SELECT 'replay_digest', decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex')
ON CONFLICT (key) DO NOTHING;
