"""Schema migrations of the SQLite store, applied in order and recorded in the database."""

from __future__ import annotations

from sqlite_utils import Database, Migrations

migrations = Migrations("expense-auth")


@migrations()
def m001_users_and_sessions(db: Database) -> None:
    """Users keyed by (issuer, subject); sessions keyed by the hash of their secret."""
    db.execute(
        """
        CREATE TABLE users (
            id TEXT PRIMARY KEY,
            issuer TEXT NOT NULL,
            subject TEXT NOT NULL,
            email TEXT NOT NULL,
            email_verified INTEGER NOT NULL,
            display_name TEXT NOT NULL,
            picture_uri TEXT NOT NULL,
            currency_code TEXT NOT NULL,
            time_zone TEXT NOT NULL,
            locale TEXT NOT NULL,
            create_ms INTEGER NOT NULL,
            update_ms INTEGER NOT NULL,
            UNIQUE (issuer, subject)
        ) STRICT
        """
    )
    db.execute(
        """
        CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
            token_hash BLOB NOT NULL UNIQUE,
            create_ms INTEGER NOT NULL,
            last_seen_ms INTEGER NOT NULL,
            expire_ms INTEGER NOT NULL,
            revoke_ms INTEGER,
            user_agent TEXT NOT NULL
        ) STRICT
        """
    )
    db.execute("CREATE INDEX sessions_by_user ON sessions (user_id, create_ms DESC, id DESC)")


@migrations()
def m002_used_id_tokens(db: Database) -> None:
    """ID tokens already used to sign in, kept until they expire: each is accepted once."""
    db.execute(
        """
        CREATE TABLE used_id_tokens (
            token_hash BLOB PRIMARY KEY,
            expire_ms INTEGER NOT NULL
        ) STRICT, WITHOUT ROWID
        """
    )
    db.execute("CREATE INDEX used_id_tokens_by_expiry ON used_id_tokens (expire_ms)")


@migrations()
def m003_audit_and_deletions(db: Database) -> None:
    """The append-only audit log, the deletion log, and disabled accounts."""
    db.execute(
        """
        CREATE TABLE audit_events (
            id INTEGER PRIMARY KEY,
            time_ms INTEGER NOT NULL,
            kind TEXT NOT NULL,
            user_id TEXT,
            reason TEXT NOT NULL,
            session_id TEXT NOT NULL,
            ip TEXT NOT NULL,
            user_agent TEXT NOT NULL,
            subject_hash TEXT NOT NULL
        ) STRICT
        """
    )
    db.execute("CREATE INDEX audit_events_by_user ON audit_events (user_id, id DESC)")
    db.execute("CREATE INDEX audit_events_by_time ON audit_events (time_ms)")
    # Survives restores: `expense-auth restore` re-applies it, so that a backup
    # taken before a deletion cannot bring the account back.
    db.execute(
        """
        CREATE TABLE deleted_accounts (
            subject_hash TEXT PRIMARY KEY,
            deleted_ms INTEGER NOT NULL
        ) STRICT
        """
    )
    db.execute("ALTER TABLE users ADD COLUMN disabled_ms INTEGER")


@migrations()
def m004_principal_generation_and_probe(db: Database) -> None:
    """A counter that every change to a cached principal moves, and a row for write probes.

    The principal cache (principals.py) stays valid while `principal_generation.n`
    is unchanged. Triggers move it on any change to a user, and on any change to
    a session but its last-seen time, whoever makes it: this process, another
    process, `expense-auth purge`, or an operator's `sqlite3`. Touches (last-seen)
    do not move it, so they do not empty the cache.
    """
    db.execute(
        "CREATE TABLE principal_generation "
        "(id INTEGER PRIMARY KEY CHECK (id = 1), n INTEGER NOT NULL) STRICT"
    )
    db.execute("INSERT INTO principal_generation (id, n) VALUES (1, 0)")
    bump = "UPDATE principal_generation SET n = n + 1 WHERE id = 1;"
    db.execute(
        f"""
        CREATE TRIGGER sessions_changed AFTER UPDATE ON sessions
        WHEN OLD.revoke_ms IS NOT NEW.revoke_ms OR OLD.expire_ms IS NOT NEW.expire_ms
          OR OLD.user_id IS NOT NEW.user_id OR OLD.token_hash IS NOT NEW.token_hash
          OR OLD.id IS NOT NEW.id OR OLD.create_ms IS NOT NEW.create_ms
          OR OLD.user_agent IS NOT NEW.user_agent
        BEGIN {bump} END
        """
    )
    db.execute(f"CREATE TRIGGER sessions_deleted AFTER DELETE ON sessions BEGIN {bump} END")
    db.execute(
        f"""
        CREATE TRIGGER users_changed AFTER UPDATE ON users
        WHEN OLD.id IS NOT NEW.id OR OLD.issuer IS NOT NEW.issuer
          OR OLD.subject IS NOT NEW.subject OR OLD.email IS NOT NEW.email
          OR OLD.email_verified IS NOT NEW.email_verified
          OR OLD.display_name IS NOT NEW.display_name
          OR OLD.picture_uri IS NOT NEW.picture_uri
          OR OLD.currency_code IS NOT NEW.currency_code
          OR OLD.time_zone IS NOT NEW.time_zone OR OLD.locale IS NOT NEW.locale
          OR OLD.create_ms IS NOT NEW.create_ms OR OLD.update_ms IS NOT NEW.update_ms
          OR OLD.disabled_ms IS NOT NEW.disabled_ms
        BEGIN {bump} END
        """
    )
    db.execute(f"CREATE TRIGGER users_deleted AFTER DELETE ON users BEGIN {bump} END")
    # Readiness writes here (a real write, through the writer) to prove writes work.
    db.execute(
        "CREATE TABLE write_probe "
        "(id INTEGER PRIMARY KEY CHECK (id = 1), at_ms INTEGER NOT NULL) STRICT"
    )
    db.execute("INSERT INTO write_probe (id, at_ms) VALUES (1, 0)")


@migrations()
def m005_job_runs(db: Database) -> None:
    """Periodic jobs (retention, scheduled backups) claim their period here, so that
    they run once per period for all the workers on the file, not once each."""
    db.execute("CREATE TABLE job_runs (name TEXT PRIMARY KEY, last_run_ms INTEGER NOT NULL) STRICT")


@migrations()
def m006_webhook_outbox(db: Database) -> None:
    """The outbox of account lifecycle events (server/domain/lifecycle.py): one row per
    event and endpoint, written in the transaction of the change it reports, removed
    once delivered. `seq` orders it: a user's events go out in that order. A plain
    rowid can be reused after the newest row is removed, which keeps the order:
    every new row is still above every row that remains."""
    db.execute(
        """
        CREATE TABLE webhook_outbox (
            seq INTEGER PRIMARY KEY,
            event_id TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            user_id TEXT NOT NULL,
            type TEXT NOT NULL,
            payload TEXT NOT NULL,
            create_ms INTEGER NOT NULL,
            state TEXT NOT NULL,
            attempts INTEGER NOT NULL,
            since_ms INTEGER NOT NULL,
            next_attempt_ms INTEGER NOT NULL,
            lease_until_ms INTEGER NOT NULL,
            lease_owner TEXT NOT NULL,
            last_error TEXT NOT NULL,
            UNIQUE (event_id, endpoint)
        ) STRICT
        """
    )
    db.execute(
        "CREATE INDEX webhook_outbox_by_user ON webhook_outbox (user_id, endpoint, seq) "
        "WHERE state = 'pending'"
    )
    db.execute(
        "CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt_ms) "
        "WHERE state = 'pending'"
    )
    db.execute("CREATE INDEX webhook_outbox_by_state ON webhook_outbox (state, seq)")
