-- Every stored batch updates its rooms' rows (last_seq, last_active). Room rows are kept
-- updatable in place ("HOT" updates: no new index entries, no dead entries for lookups to step
-- over): writers move the indexed last_active only when it is a minute or more behind, and
-- pages keep free space for the new row versions.
ALTER TABLE rooms SET (fillfactor = 50);
