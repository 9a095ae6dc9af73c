-- The append-only audit log, the deletion log, and disabled accounts.
CREATE TABLE audit_events (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time_ms BIGINT NOT NULL,
    kind TEXT NOT NULL,
    user_id TEXT,
    reason TEXT NOT NULL,
    session_id TEXT NOT NULL,
    ip TEXT NOT NULL,
    user_agent TEXT NOT NULL,
    subject_hash TEXT NOT NULL
);
CREATE INDEX audit_events_by_user ON audit_events (user_id, id DESC);
CREATE INDEX audit_events_by_time ON audit_events (time_ms);
-- Survives restores: `expense-auth restore` re-applies it, so that a backup taken
-- before a deletion cannot bring the account back.
CREATE TABLE deleted_accounts (
    subject_hash TEXT PRIMARY KEY,
    deleted_ms BIGINT NOT NULL
);
ALTER TABLE users ADD COLUMN disabled_ms BIGINT;
