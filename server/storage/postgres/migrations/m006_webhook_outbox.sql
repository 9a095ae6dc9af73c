-- The outbox of account lifecycle events (server/domain/lifecycle.py): one row per
-- event and endpoint, written in the transaction of the change it reports, removed
-- once delivered. `seq` orders it: a user's events go out in that order (they are
-- written under the user's row lock, so a later event of a user always has a
-- higher seq and commits after the earlier one).
CREATE TABLE webhook_outbox (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    user_id TEXT NOT NULL,
    type TEXT NOT NULL,
    payload TEXT NOT NULL,
    create_ms BIGINT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    since_ms BIGINT NOT NULL,
    next_attempt_ms BIGINT NOT NULL,
    lease_until_ms BIGINT NOT NULL,
    lease_owner TEXT NOT NULL,
    last_error TEXT NOT NULL,
    UNIQUE (event_id, endpoint)
);
CREATE INDEX webhook_outbox_by_user ON webhook_outbox (user_id, endpoint, seq)
    WHERE state = 'pending';
CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt_ms) WHERE state = 'pending';
CREATE INDEX webhook_outbox_by_state ON webhook_outbox (state, seq);
