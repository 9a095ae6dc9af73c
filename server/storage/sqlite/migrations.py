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
