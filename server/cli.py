"""`expense-auth`: serve, migrate, purge, back up and restore, mint development tokens."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from server.config import Config, ConfigError, load_config
from server.domain.clock import SystemClock
from server.domain.errors import Unavailable
from server.domain.lifecycle import ChangeEvents, LifecycleEvents
from server.identity.dev_issuer import DEV_AUDIENCE, DevIssuer
from server.ops import logs
from server.ops.backup_status import record_success
from server.ops.readiness import SHUTDOWN_MARKER_ENV
from server.storage.backup import BackupError, backup, restore
from server.storage.failures import BrokenInstallation, DatabaseUnreachable, SchemaTooNew
from server.storage.files import UMASK, open_to_others, private_dir, tighten_database
from server.storage.postgres import backup as postgres_backup
from server.storage.sqlite import check_integrity

log = logging.getLogger("expense_auth.cli")

APP_REF = "server.runtime.asgi:app"
ADMIN_APP_REF = "server.runtime.asgi:admin_app"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="expense-auth",
        description="Authentication and user backend of the expense manager.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the server (Connect, gRPC-Web and gRPC on one port; "
        "HTTPS only when TLS_CERT_FILE and TLS_KEY_FILE are set)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port; 0 picks a free one")
    serve.add_argument(
        "--app", default=APP_REF, help=f"the ASGI app as module:attribute (default {APP_REF})"
    )
    serve.add_argument(
        "--admin-app",
        default=None,
        help="the admin ASGI app (default: `admin_app` in the --app module)",
    )
    serve.add_argument(
        "--no-admin", action="store_true", help="do not open the admin listener at all"
    )
    serve.add_argument(
        "--workers",
        metavar="N",
        help="serving processes on the port: a number, or `auto` for one per CPU "
        "(default: WORKERS, else 1); more than one needs a shared RATE_LIMIT_STORAGE_URL",
    )
    serve.add_argument(
        "--no-migrate",
        action="store_true",
        help="refuse to start with pending migrations instead of applying them",
    )

    commands.add_parser("migrate", help="apply pending database migrations")
    commands.add_parser("purge", help="apply the retention windows now (the server does it hourly)")
    backup_cmd = commands.add_parser(
        "backup", help="take an online, verified backup (to a file, or a dated file in a directory)"
    )
    backup_cmd.add_argument("dest", type=Path)
    restore_cmd = commands.add_parser(
        "restore",
        help="replace the database with a backup, keeping later account deletions (server stopped)",
    )
    restore_cmd.add_argument("src", type=Path)
    deletions = commands.add_parser(
        "deletions",
        help="PostgreSQL point-in-time recovery: save the account-deletion log before, "
        "apply it again after (docs/operations.md)",
    )
    deletions.add_argument("action", choices=["save", "apply"])
    deletions.add_argument("file", type=Path)

    token = commands.add_parser(
        "dev-token",
        help="print a development ID token for SignIn (development issuer only)",
    )
    token.add_argument("--email", required=True)
    token.add_argument("--name", default="")
    token.add_argument("--sub", default="", help="subject; default derived from the email")
    token.add_argument(
        "--nonce", default="", help="the nonce from CreateSignInNonce, when sign-in requires one"
    )
    return parser


def _migrate(config: Config) -> None:
    from server.app import migrate_database

    applied = migrate_database(config)
    if applied:
        log.info("migrations applied", extra={"migrations": ",".join(applied)})


def _dev_token(config: Config, args: argparse.Namespace) -> int:
    if not config.dev_identity:
        print(
            "expense-auth: the development issuer is off (APP_ENV=production or "
            "DEV_IDENTITY_ENABLED=false); sign in with a real Google token instead",
            file=sys.stderr,
        )
        return 2
    issuer = DevIssuer.load_or_create(config.data_dir)
    token = issuer.mint(
        email=args.email, name=args.name, subject=args.sub, nonce=args.nonce, audience=DEV_AUDIENCE
    )
    print(token)
    return 0


def _purge(config: Config) -> int:
    from server.app import SchemaNotReady, build_retention, open_store, pending_migrations

    try:
        if pending_migrations(config):  # on PostgreSQL, also: can we reach it at all?
            raise SchemaNotReady
        store = open_store(config)
    except SchemaNotReady:
        print("expense-auth: run `expense-auth migrate` first", file=sys.stderr)
        return 2

    async def purge() -> dict[str, int]:
        try:
            return await build_retention(config, store, SystemClock()).run()
        finally:
            await store.aclose()

    try:
        counts = asyncio.run(purge())
    except Unavailable as exc:  # the database went away mid-way (logged as an incident)
        print(f"expense-auth: purge stopped: {exc}", file=sys.stderr)
        return 1
    print(" ".join(f"{kind}={count}" for kind, count in counts.items()))
    return 0


def _backup(config: Config, dest: Path) -> int:
    if config.postgres:
        path = postgres_backup.backup(config.database_url, dest)
    else:
        path = backup(config.sqlite_path, dest)
    record_success(config.data_dir, now_s=SystemClock().now_ms() / 1000)
    print(f"{path}: integrity ok")
    return 0


def _deletion_events(config: Config) -> ChangeEvents:
    """The `user.deleted` events of re-applied deletions, for WEBHOOK_URLS."""
    return LifecycleEvents(config.webhook_urls, clock=SystemClock()).changed


def _restore(config: Config, src: Path) -> int:
    if config.postgres:
        restored = postgres_backup.restore(
            src, config.database_url, events=_deletion_events(config)
        )
    else:
        restored = restore(src, config.sqlite_path, events=_deletion_events(config))
    if restored.moved_aside is not None:
        print(f"the current database was damaged; moved aside to {restored.moved_aside}")
    if restored.deletions_unknown:
        print(
            "warning: the damaged database's deletion log could not be read: accounts "
            "deleted after the backup was taken may be back",
            file=sys.stderr,
        )
    print(f"restored {src}; account deletions re-applied: {restored.reapplied}")
    _migrate(config)  # an older backup may predate migrations
    return 0


def _deletions(config: Config, action: str, path: Path) -> int:
    if not config.postgres:
        print(
            "expense-auth: `deletions` is for PostgreSQL's point-in-time recovery; with "
            "SQLite, `expense-auth restore` keeps later deletions by itself",
            file=sys.stderr,
        )
        return 2
    if action == "save":
        count = postgres_backup.save_deletions(config.database_url, path)
        print(f"{path}: {count} account deletions saved")
    else:
        count = postgres_backup.apply_deletions(
            config.database_url, path, events=_deletion_events(config)
        )
        print(f"account deletions re-applied: {count}")
    return 0


def _refuse_damaged(config: Config) -> bool:
    """Print why, and True, when the database file is damaged (SQLite would serve it).

    PostgreSQL checks its own pages (data checksums, if the cluster has them on).
    """
    if config.postgres:
        return False
    problem = check_integrity(config.sqlite_path)
    if problem == "ok":
        return False
    print(
        f"expense-auth: the database {config.sqlite_path} is damaged ({problem[:300]}); "
        "restore the latest backup with `expense-auth restore BACKUP` (the damaged file "
        "is moved aside, not deleted)",
        file=sys.stderr,
    )
    return True


def _serve(config: Config, args: argparse.Namespace) -> int:
    from server.app import pending_migrations, serving_lock
    from server.runtime.serve import AdminListener, PortInUse, StartupError, serve
    from server.storage.serving_lock import AnotherServer

    if _refuse_damaged(config):
        return 2
    if not args.no_migrate:
        _migrate(config)
    elif pending := pending_migrations(config):
        print(
            f"expense-auth: the database needs migrations ({', '.join(pending)}); "
            "run `expense-auth migrate` or start without --no-migrate",
            file=sys.stderr,
        )
        return 2
    admin = None
    if not args.no_admin:
        module = args.app.partition(":")[0]
        admin = AdminListener(
            app=args.admin_app or f"{module}:admin_app",
            host=config.admin_host,
            port=config.admin_port,
        )
    forward_auth = None
    if config.forward_auth_port is not None:
        forward_auth = AdminListener(
            app=f"{args.app.partition(':')[0]}:forward_auth_app",
            host=config.forward_auth_host,
            port=config.forward_auth_port,
        )
    _check_file_modes(config)
    run_dir = config.data_dir / "run"
    private_dir(run_dir)
    marker = run_dir / f"shutdown-{os.getpid()}"
    marker.unlink(missing_ok=True)
    state_dir = run_dir / f"workers-{os.getpid()}"
    try:
        return asyncio.run(
            serve(
                args.app,
                host=args.host,
                port=args.port,
                env={SHUTDOWN_MARKER_ENV: str(marker.resolve())},
                drain_seconds=config.drain_seconds,
                tls_cert_file=config.tls_cert_file,
                tls_key_file=config.tls_key_file,
                admin=admin,
                forward_auth=forward_auth,
                shutdown_marker=marker,
                https=config.https,
                max_connections=config.max_connections,
                workers=config.workers,
                state_dir=state_dir if config.workers > 1 else None,
                guard=serving_lock(config),
            )
        )
    except (PortInUse, StartupError, AnotherServer) as exc:
        print(f"expense-auth: {exc}", file=sys.stderr)
        return 2
    finally:
        marker.unlink(missing_ok=True)
        shutil.rmtree(state_dir, ignore_errors=True)


def _check_file_modes(config: Config) -> None:
    """Make the database files private, and warn when their directory is not."""
    for directory in {config.data_dir, config.sqlite_path.parent}:
        mode = open_to_others(directory)
        if mode is not None:
            log.warning(
                "data directory is open to other users; run: chmod 700 DIR",
                extra={"directory": str(directory), "mode": f"{mode:04o}"},
            )
    if config.postgres:
        return
    changed = tighten_database(config.sqlite_path)
    if changed:
        log.warning(
            "database files were readable by others; made them 0600",
            extra={"files": ",".join(changed)},
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    # Everything the service writes (database, backups, keys) is for its own
    # user only, whatever umask it was started with.
    os.umask(UMASK)
    args = _parser().parse_args(argv)
    try:
        workers = getattr(args, "workers", None)
        config = load_config(overrides={"WORKERS": workers} if workers else None)
    except ConfigError as exc:
        print(f"expense-auth: {exc}", file=sys.stderr)
        return 2
    logs.configure(production=config.production, level=config.log_level)
    try:
        match args.command:
            case "migrate":
                if _refuse_damaged(config):
                    return 2
                _migrate(config)
                return 0
            case "dev-token":
                return _dev_token(config, args)
            case "purge":
                return _purge(config)
            case "backup":
                return _backup(config, args.dest)
            case "restore":
                return _restore(config, args.src)
            case "deletions":
                return _deletions(config, args.action, args.file)
            case _:
                return _serve(config, args)
    except SchemaTooNew as exc:
        print(f"expense-auth: {exc}; upgrade expense-auth", file=sys.stderr)
        return 2
    except (BackupError, DatabaseUnreachable) as exc:
        print(f"expense-auth: {exc}", file=sys.stderr)
        return 1
    except BrokenInstallation as exc:
        print(f"expense-auth: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
