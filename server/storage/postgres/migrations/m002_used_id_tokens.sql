-- ID tokens already used to sign in (and spent sign-in nonces), kept until they
-- expire: each is accepted once.
CREATE TABLE used_id_tokens (
    token_hash BYTEA PRIMARY KEY,
    expire_ms BIGINT NOT NULL
);
CREATE INDEX used_id_tokens_by_expiry ON used_id_tokens (expire_ms);
