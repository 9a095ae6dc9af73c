-- Users keyed by (issuer, subject); sessions keyed by the hash of their secret.
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    issuer TEXT NOT NULL,
    subject TEXT NOT NULL,
    email TEXT NOT NULL,
    email_verified BOOLEAN NOT NULL,
    display_name TEXT NOT NULL,
    picture_uri TEXT NOT NULL,
    currency_code TEXT NOT NULL,
    time_zone TEXT NOT NULL,
    locale TEXT NOT NULL,
    create_ms BIGINT NOT NULL,
    update_ms BIGINT NOT NULL,
    UNIQUE (issuer, subject)
);
CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_hash BYTEA NOT NULL UNIQUE,
    create_ms BIGINT NOT NULL,
    last_seen_ms BIGINT NOT NULL,
    expire_ms BIGINT NOT NULL,
    revoke_ms BIGINT,
    user_agent TEXT NOT NULL
);
CREATE INDEX sessions_by_user ON sessions (user_id, create_ms DESC, id DESC);
