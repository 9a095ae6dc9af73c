"""`expense-auth`: serve, migrate, and mint development tokens."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from server import logs
from server.config import Config, ConfigError, load_config
from server.identity.dev_issuer import DEV_AUDIENCE, DevIssuer
from server.storage.sqlite import SchemaTooNew, migrate

log = logging.getLogger("expense_auth.cli")

APP_REF = "server.asgi:app"


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
        "--app",
        default=APP_REF,
        help=f"the ASGI app as module:attribute (default {APP_REF})",
    )
    serve.add_argument(
        "--no-migrate",
        action="store_true",
        help="refuse to start with pending migrations instead of applying them",
    )

    commands.add_parser("migrate", help="apply pending database migrations")

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
    applied = migrate(config.sqlite_path)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = _parser().parse_args(argv)
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"expense-auth: {exc}", file=sys.stderr)
        return 2
    logs.configure(production=config.production, level=config.log_level)
    try:
        if args.command == "migrate":
            _migrate(config)
            return 0
        if args.command == "dev-token":
            return _dev_token(config, args)
        if not args.no_migrate:
            _migrate(config)
        from server.serve import serve

        return asyncio.run(
            serve(
                args.app,
                host=args.host,
                port=args.port,
                tls_cert_file=config.tls_cert_file,
                tls_key_file=config.tls_key_file,
            )
        )
    except SchemaTooNew as exc:
        print(f"expense-auth: {exc}; upgrade expense-auth", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
