-- The same step as SQLite's m004. The principal generation there keeps a cache of
-- sessions exact across processes; this engine reads every session check from the
-- database instead (one indexed join, no cache to keep exact), so it needs only the
-- row that readiness writes to prove that writes work.
CREATE TABLE write_probe (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    at_ms BIGINT NOT NULL
);
INSERT INTO write_probe (id, at_ms) VALUES (1, 0);
