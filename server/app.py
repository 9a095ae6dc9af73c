"""THE wiring point: every dependency of the service is built here and nowhere else."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict
from urllib.parse import urlsplit

from connectrpc.codec import Codec, proto_binary_codec
from connectrpc.interceptor import Interceptor
from connectrpc_grpcreflect import (
    ServerReflectionAlphaASGIApplication,
    ServerReflectionAlphaService,
    ServerReflectionASGIApplication,
    ServerReflectionService,
)
from pydantic import SecretStr
from starlette.types import ASGIApp, Scope

from gen.expense.admin.v1.admin_connect import AdminServiceASGIApplication
from gen.expense.auth.v1 import auth_pb
from gen.expense.auth.v1.auth_connect import AuthServiceASGIApplication
from gen.expense.user.v1 import user_pb
from gen.expense.user.v1.user_connect import UserServiceASGIApplication
from gen.grpc.health.v1 import health_pb
from gen.grpc.health.v1.health_connect import HealthASGIApplication
from interceptors.admin_auth import AdminAuth
from interceptors.browser_guard import BrowserGuard
from interceptors.client_ip import ClientAddress
from interceptors.deadline import Deadline
from interceptors.errors import ErrorBoundary
from interceptors.logging import RequestLogger
from interceptors.metrics import MetricsRecorder
from interceptors.rate_limit import NetworkRateLimit, PrincipalRateLimit, ProbeRateLimit
from interceptors.session import SessionInterceptor
from server.config import Config, load_config
from server.domain.accounts import Accounts
from server.domain.admin import Admin
from server.domain.audit import Audit
from server.domain.clock import Clock, SystemClock
from server.domain.lifecycle import LifecycleEvents
from server.domain.retention import Retention, RetentionPolicy
from server.domain.sessions import SessionPolicy, Sessions
from server.domain.signin import SignIns
from server.domain.throttle import FAIL_OPEN, POLICIES, Throttle
from server.domain.tokens import new_public_id
from server.domain.users import Users
from server.domain.webhooks import Deliveries, DeliveryPolicy
from server.edge.middleware import with_edge
from server.edge.router import PlainResponse, Route, Router
from server.identity.certs import CertsSource, HttpCerts, StaticCerts
from server.identity.dev_issuer import DEV_AUDIENCE, DEV_ISSUER, DevIssuer
from server.identity.verifier import GOOGLE_ISSUERS, IdTokenVerifier
from server.ops import logs, telemetry
from server.ops.backup_status import last_success, record_success
from server.ops.jobs import Periodic, backup_job, retention_job
from server.ops.metrics import Metrics
from server.ops.readiness import (
    SHUTDOWN_MARKER_ENV,
    WORKERS_STATUS_ENV,
    Readiness,
    healthz,
    workers_check,
)
from server.ops.reports import Report
from server.ops.webhooks import DeliveryWorker
from server.rpc.admin import AdminService
from server.rpc.auth import AuthService
from server.rpc.codecs import DepthLimitedJSONCodec, GuardedEncoding
from server.rpc.context import PUBLIC_PROCEDURES, REFLECTION_PROCEDURES
from server.rpc.cookies import SessionCookies
from server.rpc.forward_auth import ForwardAuth
from server.rpc.health import HealthService
from server.rpc.nonces import SignInNonces
from server.rpc.page_tokens import PageTokens
from server.rpc.signing import CookieSigner
from server.rpc.user import UserService
from server.rpc.user_agent import warm_up
from server.runtime.home_loop import HomeLoop, OnHomeLoop
from server.runtime.receive_fix import ReceiveAfterBodyFix
from server.storage.backup import BACKUP_SUFFIX, backup
from server.storage.files import private_dir
from server.storage.limits import Counters, parse_limits
from server.storage.sqlite import SQLiteStore, check_schema, migrate
from server.webhooks.sender import HttpSender

# Imported at run time only when configured, so that a process carries only the
# libraries it uses: sentry-sdk with SENTRY_DSN (see _error_tracker), asyncpg and the
# PostgreSQL engine with a postgresql:// DATABASE_URL (aiohttp, for webhooks, is
# imported by the sender on its first delivery).
if TYPE_CHECKING:
    from server.ops.error_tracking import ErrorTracker
    from server.storage.postgres.store import PostgresStore

    # The engine DATABASE_URL selects; the domain sees only its ports.
    Store = SQLiteStore | PostgresStore

# Requests to this API are tiny (the largest is a ~1.5 KB ID token); refusing
# big bodies early keeps memory flat under abuse. Applied after decompression too.
READ_MAX_BYTES = 64 * 1024
DEV_SECRET_FILE = "dev-session-secret"  # noqa: S105 (a file name, not a secret)


class _Limits(TypedDict):
    """What every Connect application is built with."""

    read_max_bytes: int
    codecs: Sequence[Codec[Any, Any]]


class SchemaNotReady(Exception):
    """The database needs `expense-auth migrate` before the service can start."""


@dataclass(frozen=True, slots=True)
class App:
    """The ASGI applications pyvoy serves: the public port, the admin listener and the
    forward-auth listener (opened only with FORWARD_AUTH_PORT)."""

    asgi: ASGIApp
    admin: ASGIApp
    forward_auth: ASGIApp


def session_keys(config: Config) -> list[str]:
    """The cookie keys, oldest first. In development without any, a persistent random one
    (production refuses to start without SESSION_SECRET_KEY)."""
    if config.session_secret_key:
        return [key.get_secret_value() for key in config.session_secret_key]
    return [_dev_secret(config.data_dir)]


def pending_migrations(config: Config) -> list[str]:
    """The migrations the configured database still needs (SchemaTooNew for unknown ones)."""
    if config.postgres:
        from server.storage.postgres import schema as postgres_schema

        timeout = config.database_connect_timeout_seconds
        return asyncio.run(postgres_schema.check_schema(config.database_url, timeout_s=timeout))
    return check_schema(config.sqlite_path)


def migrate_database(config: Config) -> list[str]:
    """Apply pending migrations to the configured database; returns their names."""
    if config.postgres:
        from server.storage.postgres import schema as postgres_schema

        timeout = config.database_connect_timeout_seconds
        return asyncio.run(postgres_schema.migrate(config.database_url, timeout_s=timeout))
    return migrate(config.sqlite_path)


def serving_lock(config: Config) -> contextlib.AbstractAsyncContextManager[None]:
    """The configured database's serving lock (server/storage/serving_lock.py): shared
    when the rate limits are shared, exclusive when they are in this process's memory."""
    from server.storage.serving_lock import postgres_serving_lock, sqlite_serving_lock

    shared = not config.rate_limit_storage_url.removeprefix("async+").startswith("memory://")
    if config.postgres:
        return postgres_serving_lock(
            config.database_url,
            shared=shared,
            timeout_s=config.database_connect_timeout_seconds,
        )
    return sqlite_serving_lock(config.sqlite_path, shared=shared)


def open_store(config: Config, *, check: bool = True) -> Store:
    """The configured store, refusing a database that needs migrations.

    PostgreSQL's schema is checked by `expense-auth serve` before the server starts
    (and by readiness): this runs in the server's event loop, which must not block.

    Raises:
        SchemaNotReady: The SQLite database has pending migrations.
    """
    if config.postgres:
        from server.storage.postgres.store import PostgresStore

        return PostgresStore(
            config.database_url,
            pool_size=config.database_pool_size,
            connect_timeout_s=config.database_connect_timeout_seconds,
            statement_timeout_ms=config.database_statement_timeout_ms,
        )
    pending = check_schema(config.sqlite_path) if check else []
    if pending:
        raise SchemaNotReady(
            f"the database needs migrations ({', '.join(pending)}); run: expense-auth migrate"
        )
    return SQLiteStore(config.sqlite_path)


def build_retention(config: Config, store: Store, clock: Clock) -> Retention:
    """The retention rules of the configuration, over `store` (the job and `purge`)."""
    return Retention(
        store,
        clock=clock,
        policy=RetentionPolicy(
            session_days=config.retention_session_days,
            audit_days=config.retention_audit_days,
            full_ip_days=config.retention_full_ip_days,
            session_idle_ms=config.session_idle_timeout_seconds * 1000,
        ),
    )


def app_from_environment(*, clock: Clock | None = None) -> App:
    """The service as `expense-auth serve` runs it: configuration and logging from the
    environment, and the shutdown marker the serving process named (pyvoy imports this
    through server/runtime/asgi.py; tests pass their own clock)."""
    config = load_config()
    logs.configure(production=config.production, level=config.log_level)
    marker = os.environ.get(SHUTDOWN_MARKER_ENV)
    workers = os.environ.get(WORKERS_STATUS_ENV)
    return create_app(
        config,
        clock=clock,
        shutdown_marker=Path(marker) if marker else None,
        workers_status=Path(workers) if workers else None,
    )


def _dev_secret(data_dir: Path) -> str:
    path = data_dir / DEV_SECRET_FILE
    private_dir(data_dir)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as out:
        secret = secrets.token_urlsafe(48)
        out.write(secret)
    return secret


def build_verifier(config: Config, *, clock: Clock, dev: DevIssuer | None) -> IdTokenVerifier:
    """Google's issuers (certs from GOOGLE_CERTS_URL), plus the development issuer if given."""
    google = HttpCerts(config.google_certs_url, clock=clock)
    issuers: dict[str, CertsSource] = dict.fromkeys(GOOGLE_ISSUERS, google)
    audiences = list(config.google_client_id)
    if dev is not None:
        issuers[DEV_ISSUER] = StaticCerts(dev.certs())
        audiences.append(DEV_AUDIENCE)
    return IdTokenVerifier(
        audiences=audiences,
        issuers=issuers,
        clock_skew_s=config.id_token_clock_skew_seconds,
        require_verified_email=config.google_require_verified_email,
        clock=clock,
    )


def create_app(
    config: Config,
    *,
    clock: Clock | None = None,
    identity: IdTokenVerifier | None = None,
    shutdown_marker: Path | None = None,
    workers_status: Path | None = None,
) -> App:
    """Build the whole service from its configuration.

    Args:
        config: The validated configuration.
        clock: The time source; tests pass a controllable one.
        identity: The ID token verifier; by default Google's (and the development
            issuer's when enabled), built from `config`.
        shutdown_marker: A file whose existence means shutdown has begun (readiness
            turns false); `expense-auth serve` creates it on SIGTERM.
        workers_status: With `serve --workers N`, the supervisor's status file
            (readiness reports the `workers` dependency from it).

    Raises:
        SchemaNotReady: The database has pending migrations.
    """
    clock = clock or SystemClock()
    keys = session_keys(config)
    tracker = _error_tracker(config, keys)
    report = tracker.report if tracker is not None else None
    store = open_store(config)
    policy = SessionPolicy(
        idle_ms=config.session_idle_timeout_seconds * 1000,
        max_age_ms=config.session_max_age_seconds * 1000,
    )
    lifecycle = LifecycleEvents(config.webhook_urls, clock=clock)
    sessions = Sessions(store, clock=clock, policy=policy, events=lifecycle.changed)
    metrics = Metrics()
    signer = CookieSigner(keys, on_old_key=metrics.cookie_old_key.inc)
    cookies = SessionCookies(
        signer, secure=config.session_secure_cookie, max_age_s=config.session_max_age_seconds
    )
    dev = DevIssuer.load_or_create(config.data_dir) if config.dev_identity else None
    verifier = identity or build_verifier(config, clock=clock, dev=dev)
    warm_up()
    counters = Counters(
        config.rate_limit_storage_url,
        clock=clock,
        fail_open=FAIL_OPEN,
        on_error=metrics.rate_limit_storage_errors.inc,
        timeout_s=config.rate_limit_storage_timeout_ms / 1000,
    )
    throttle = Throttle(
        counters.counter,
        {name: parse_limits(getattr(config, f"rate_limit_{name}")) for name in POLICIES},
    )
    audit_log = Audit(store, clock=clock)
    readiness = Readiness(
        store,
        dependencies={
            "identity_keys": lambda: _keys_status(verifier),
            "rate_limit_storage": counters.status,
            **({"workers": workers_check(workers_status)} if workers_status else {}),
        },
        shutdown_marker=shutdown_marker,
        clock=clock,
        on_check=metrics.readiness_checks.inc,
    )
    store.incidents.observe(lambda kind: metrics.storage_errors.labels(kind).inc())
    metrics.track_active_sessions(
        lambda: store.count_live_sessions(
            now_ms=clock.now_ms(), idle_cutoff_ms=clock.now_ms() - policy.idle_ms
        )
    )
    metrics.track_readiness(readiness.checks, readiness.dependencies)
    metrics.track(
        lambda: asyncio.to_thread(lambda: metrics.last_backup.set(last_success(config.data_dir)))
    )
    metrics.session_max_age.set(config.session_max_age_seconds)
    sender = HttpSender(
        [key.get_secret_value() for key in config.webhook_secret],
        timeout_s=config.webhook_timeout_seconds,
        clock=clock,
    )
    deliveries = build_deliveries(config, store, sender, clock=clock, metrics=metrics)
    metrics.track_webhook_events(deliveries.counts)

    # The interceptor order, written once, first = outermost. All but Deadline
    # are metadata interceptors, so they run before the request body is read.
    otel = telemetry.interceptor()
    boundary = ErrorBoundary(report=report)
    edge: Sequence[Interceptor] = (
        *([otel] if otel is not None else []),
        boundary,
        ClientAddress(config.trusted_proxies, ipv6_prefix=config.rate_limit_ipv6_prefix),
        RequestLogger(),
        MetricsRecorder(metrics),
    )
    network_limit = NetworkRateLimit(throttle, public=PUBLIC_PROCEDURES | REFLECTION_PROCEDURES)
    probe_limit = ProbeRateLimit(
        throttle,
        trusted_proxies=config.trusted_proxies,
        ipv6_prefix=config.rate_limit_ipv6_prefix,
    )
    authenticated: Sequence[Interceptor] = (
        *edge,
        BrowserGuard(config.cors_allowed_origin),
        network_limit,
        SessionInterceptor(sessions, cookies, public=PUBLIC_PROCEDURES),
        PrincipalRateLimit(throttle, public=PUBLIC_PROCEDURES, audit_log=audit_log),
        Deadline(config.request_timeout_seconds),
    )
    admin_chain: Sequence[Interceptor] = (*edge, AdminAuth(_secret(config.admin_token)))

    auth = AuthService(
        sessions=sessions,
        sign_ins=SignIns(
            verifier=verifier, sessions=sessions, throttle=throttle, audit_log=audit_log
        ),
        cookies=cookies,
        nonces=SignInNonces(
            keys, secure=config.session_secure_cookie, required=config.nonce_required, clock=clock
        ),
        page_tokens=PageTokens(keys, name="ListSessions"),
        audit_log=audit_log,
    )
    user = UserService(
        users=Users(store, clock=clock, events=lifecycle.changed),
        accounts=Accounts(
            store, clock=clock, audit_log=audit_log, throttle=throttle, events=lifecycle.changed
        ),
        verifier=verifier,
        cookies=cookies,
        page_tokens=PageTokens(keys, name="ListSecurityEvents"),
        clock=clock,
    )
    health = HealthService(
        readiness,
        services=[
            "expense.auth.v1.AuthService",
            "expense.user.v1.UserService",
            "grpc.health.v1.Health",
        ],
    )
    files = [auth_pb.desc(), user_pb.desc(), health_pb.desc()]
    codecs = [
        GuardedEncoding(codec, on_error=boundary.encode_failed)
        for codec in (proto_binary_codec(), DepthLimitedJSONCodec())
    ]
    limits = _Limits(read_max_bytes=READ_MAX_BYTES, codecs=codecs)
    public_apps = [
        AuthServiceASGIApplication(auth, interceptors=authenticated, **limits),
        UserServiceASGIApplication(user, interceptors=authenticated, **limits),
        HealthASGIApplication(health, interceptors=(*edge, probe_limit), **limits),
        ServerReflectionASGIApplication(
            ServerReflectionService(*files), interceptors=(*edge, network_limit), **limits
        ),
        ServerReflectionAlphaASGIApplication(
            ServerReflectionAlphaService(*files), interceptors=(*edge, network_limit), **limits
        ),
    ]
    routes: dict[str, Route] = {
        "/healthz": probe_limit.route(healthz),
        "/readyz": probe_limit.route(readiness.readyz),
    }
    if dev is not None:
        routes["/dev/certs"] = _constant(PlainResponse.json(200, dev.certs()))

    jobs = _jobs(config, store, clock, report)
    background: list[DeliveryWorker | Periodic] = [*jobs]
    if lifecycle.enabled:
        background.append(
            DeliveryWorker(
                deliveries,
                grace_s=config.webhook_timeout_seconds + 1,
                on_close=sender.aclose,
            )
        )
    # The admin app shares the store, readiness and limits, which belong to the
    # public app's event loop: its requests run there (server/runtime/home_loop.py).
    home = HomeLoop()
    public = Router(
        public_apps,
        get_routes=routes,
        on_startup=[home.capture, *(job.start for job in background)],
        # Last: what the steps before it reported is sent before the process ends.
        on_shutdown=[
            home.release,
            *(job.stop for job in background),
            _closer(store),
            *([tracker.flush] if tracker is not None else []),
        ],
    )
    admin_service = AdminService(
        admin=Admin(
            store, clock=clock, audit_log=audit_log, policy=policy, events=lifecycle.changed
        ),
        page_tokens=PageTokens(keys, name="ListUsers"),
        deliveries=deliveries,
        event_page_tokens=PageTokens(keys, name="ListWebhookEvents"),
    )
    admin = Router(
        [AdminServiceASGIApplication(admin_service, interceptors=admin_chain, **limits)],
        get_routes={"/metrics": metrics.endpoint, "/healthz": healthz},
    )
    # Gateways' checks for the other services, with the API's rules and limits. Not
    # behind the HTTP edge: it answers gateways, whose clients never see CORS from it.
    forward_auth = ForwardAuth(
        sessions=sessions,
        cookies=cookies,
        throttle=throttle,
        audit_log=audit_log,
        allowed_origins=config.cors_allowed_origin,
        trusted_proxies=config.trusted_proxies,
        ipv6_prefix=config.rate_limit_ipv6_prefix,
        on_result=lambda result: metrics.forward_auth_checks.labels(result).inc(),
        report=report,
    )
    # pyvoy's receive() needs the fix on the Connect listeners (see receive_fix.py);
    # forward auth never reads a body.
    built = App(
        asgi=ReceiveAfterBodyFix(
            with_edge(public, allowed_origins=config.cors_allowed_origin, https=config.https)
        ),
        admin=ReceiveAfterBodyFix(
            OnHomeLoop(with_edge(admin, allowed_origins=(), https=False), home)
        ),
        # Its own listener, so its own loop in pyvoy: the store and the limiter's
        # Redis client belong to the public app's (server/runtime/home_loop.py).
        forward_auth=OnHomeLoop(forward_auth, home),
    )
    if tracker is None:
        return built
    return App(
        asgi=tracker.around(built.asgi, listener="public"),
        admin=tracker.around(built.admin, listener="admin"),
        forward_auth=tracker.around(built.forward_auth, listener="forward_auth"),
    )


def _error_tracker(config: Config, keys: Sequence[str]) -> ErrorTracker | None:
    """Sentry, when SENTRY_DSN is set; its SDK is not even imported otherwise."""
    if config.sentry_dsn is None:
        return None
    from server.ops import error_tracking

    never_sent = [*keys, _secret(config.admin_token) or ""]
    never_sent += [_password(config.database_url), _password(config.rate_limit_storage_url)]
    return error_tracking.start(config, secrets=[s for s in never_sent if s])


def _password(url: str) -> str:
    """The password in a URL, or ""."""
    try:
        return urlsplit(url).password or ""
    except ValueError:
        return ""


def build_deliveries(
    config: Config, store: Store, sender: HttpSender, *, clock: Clock, metrics: Metrics
) -> Deliveries:
    """The webhook deliveries of this process (the worker's rules, and the admin API's)."""
    timeout_ms = math.ceil(config.webhook_timeout_seconds * 1000)
    return Deliveries(
        store,
        sender,
        clock=clock,
        policy=DeliveryPolicy(
            retry_for_ms=config.webhook_retry_for_seconds * 1000,
            max_backoff_ms=config.webhook_max_backoff_seconds * 1000,
            # Longer than an attempt can last, so that no other process takes the event
            # while it is on the wire; the slack covers a slow write of the outcome.
            lease_ms=timeout_ms + 5000,
        ),
        endpoints=config.webhook_urls,
        owner=new_public_id("wkr"),
        on_outcome=lambda outcome: metrics.webhook_deliveries.labels(outcome).inc(),
    )


def _jobs(config: Config, store: Store, clock: Clock, report: Report | None) -> list[Periodic]:
    async def claim(name: str, interval_s: float) -> bool:
        # Once per period for every process on this database. A timer that fires a
        # little early still claims its period: 10 % of slack.
        return await store.claim_job(name, now_ms=clock.now_ms(), interval_ms=int(interval_s * 900))

    retention = build_retention(config, store, clock)
    jobs = [
        retention_job(
            retention, interval_s=config.retention_interval_seconds, claim=claim, report=report
        )
    ]
    if config.backup_dir is not None:
        take: Callable[[Path], Path]
        if config.postgres:
            from server.storage.postgres import backup as postgres_backup

            take = functools.partial(postgres_backup.backup, config.database_url)
            suffix = postgres_backup.SUFFIX
        else:
            take = functools.partial(backup, config.sqlite_path)
            suffix = BACKUP_SUFFIX
        jobs.append(
            backup_job(
                take,
                config.backup_dir,
                keep=config.backup_keep,
                suffix=suffix,
                interval_s=config.backup_interval_seconds,
                before=store.checkpoint,
                after=lambda: record_success(config.data_dir, now_s=clock.now_ms() / 1000),
                claim=claim,
                report=report,
            )
        )
    return jobs


def _closer(store: Store) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        await store.aclose()

    return close


async def _keys_status(verifier: IdTokenVerifier) -> str:
    if await verifier.keys_available():
        return "ok"
    return "unavailable: no keys to verify ID tokens (GOOGLE_CERTS_URL unreachable, none cached)"


def _constant(response: PlainResponse) -> Route:
    async def route(scope: Scope) -> PlainResponse:
        return response

    return route


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None
