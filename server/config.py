"""The service's settings: one frozen object, built from the environment, failing fast.

Every variable is read once at start. All problems are reported together, each
naming the variable, so that an operator fixes the environment in one go.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import limits
from dotenv import dotenv_values
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)


def _network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    # Validated here rather than with pydantic's IPvAnyNetwork, whose module
    # costs the server memory for this one setting (docs/benchmarks.md).
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    try:
        return ipaddress.ip_network(str(value).strip())
    except ValueError as exc:
        raise ValueError(f"expected an IP network such as 10.0.0.0/8: {str(exc)[:100]}") from None


IPNetwork = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, PlainValidator(_network)]

GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
MIN_SECRET_BYTES = 32
# A random 32-byte key in base64url carries ~190 bits by this estimate; 32 x "a"
# carries 0, and a short repeated pattern little more.
MIN_SECRET_ENTROPY_BITS = 128
# The widest network production believes X-Forwarded-For from (10.0.0.0/8 and
# the IPv6 unique-local fc00::/7 pass).
_MIN_PROXY_PREFIX = {4: 8, 6: 7}
_ORIGIN = re.compile(
    r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?"
)
_LOOPBACK = ("127.0.0.1", "::1", "localhost")
_KEYGEN_HINT = 'python3 -c "import secrets; print(secrets.token_urlsafe(48))"'
_WEBHOOK_KEYGEN_HINT = (
    "python3 -c \"import base64, secrets; print('whsec_' + "
    'base64.b64encode(secrets.token_bytes(32)).decode())"'
)
# The Standard Webhooks specification's bounds on a signing secret.
WEBHOOK_SECRET_BYTES = (24, 64)


class ConfigError(Exception):
    """The environment does not describe a valid configuration.

    Attributes:
        problems: One line per problem, each naming the variable and the fix.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def estimated_entropy_bits(secret: str) -> float:
    """The secret's length times the Shannon entropy of its characters.

    An estimate, not a guarantee: it catches keys typed by hand (`aaaa...`,
    `password123password123...`), not every weak key.
    """
    if not secret:
        return 0.0
    counts = Counter(secret)
    total = len(secret)
    per_char = max(0.0, -sum(n / total * math.log2(n / total) for n in counts.values()))
    return per_char * total


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Config(BaseModel):
    """The service's configuration. Field names are the environment variables, upper-cased."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    app_env: Literal["development", "production"] = "development"
    data_dir: Path = Path("var")
    database_url: str = ""
    database_pool_size: int = Field(default=10, ge=1, le=1000)
    database_connect_timeout_seconds: float = Field(default=5.0, gt=0, le=120)
    database_statement_timeout_ms: int = Field(default=2000, ge=50, le=600_000)
    google_client_id: list[str] = Field(default_factory=list)
    google_certs_url: str = GOOGLE_CERTS_URL
    google_require_verified_email: bool = True
    id_token_clock_skew_seconds: int = Field(default=30, ge=0, le=300)
    session_secret_key: list[SecretStr] = Field(default_factory=list)
    session_secure_cookie: bool = False
    session_idle_timeout_seconds: int = Field(default=30 * 60, ge=60)
    session_max_age_seconds: int = Field(default=12 * 60 * 60, ge=60)
    cors_allowed_origin: list[str] = Field(default_factory=list)
    dev_identity_enabled: bool | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # The edge: TLS, proxies, limits.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    behind_tls_proxy: bool = False
    trusted_proxies: list[IPNetwork] = Field(default_factory=list)
    signin_nonce_required: bool | None = None
    request_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    rate_limit_storage_url: str = "memory://"
    rate_limit_storage_timeout_ms: int = Field(default=100, ge=5, le=5000)
    rate_limit_signin_per_ip: str = "60/minute"
    rate_limit_signin_per_subject: str = "10/minute;30/hour"
    rate_limit_failed_signin_per_ip: str = "5/minute;20/hour"
    rate_limit_failed_signin_per_subject: str = "5/minute;20/hour"
    rate_limit_unauthenticated_per_ip: str = "120/minute"
    rate_limit_probe_per_ip: str = "10/second"
    rate_limit_ipv6_prefix: int = Field(default=64, ge=32, le=128)
    rate_limit_per_session: str = "300/minute"
    rate_limit_per_user: str = "600/minute"
    rate_limit_global: str = "2000/second"
    rate_limit_export_per_user: str = "5/hour"
    retention_session_days: int = Field(default=30, ge=1)
    retention_audit_days: int = Field(default=365, ge=1)
    retention_full_ip_days: int = Field(default=30, ge=1)
    retention_interval_seconds: int = Field(default=3600, ge=1)
    backup_dir: Path | None = None
    backup_interval_seconds: int = Field(default=24 * 3600, ge=1)
    backup_keep: int = Field(default=7, ge=1)
    admin_host: str = "127.0.0.1"
    admin_port: int = Field(default=8081, ge=0, le=65535)
    admin_token: SecretStr | None = None
    drain_seconds: float = Field(default=10.0, ge=0, le=600)
    max_connections: int = Field(default=4096, ge=1, le=1_000_000)
    workers: int = Field(default=1, ge=1, le=256)
    # The forward-auth listener for gateways (server/rpc/forward_auth.py); none unless
    # FORWARD_AUTH_PORT is set (0 picks a free port).
    forward_auth_host: str = "127.0.0.1"
    forward_auth_port: int | None = Field(default=None, ge=0, le=65535)
    # Error tracking (server/ops/error_tracking.py): off without a DSN.
    sentry_dsn: SecretStr | None = None
    sentry_environment: str = ""
    sentry_release: str = ""
    sentry_sample_rate: float = Field(default=1.0, ge=0, le=1)
    sentry_shutdown_timeout_seconds: float = Field(default=2.0, ge=0, le=60)
    # Account lifecycle webhooks (server/domain/lifecycle.py, server/webhooks/): off
    # without URLs.
    webhook_urls: list[str] = Field(default_factory=list)
    webhook_secret: list[SecretStr] = Field(default_factory=list)
    webhook_retry_for_seconds: int = Field(default=3 * 24 * 3600, ge=1, le=30 * 24 * 3600)
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    webhook_max_backoff_seconds: int = Field(default=3600, ge=1, le=24 * 3600)

    @field_validator("forward_auth_port", "sentry_dsn", mode="before")
    @classmethod
    def _unset_when_empty(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("sentry_dsn")
    @classmethod
    def _dsn(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        # The DSN is not quoted back: its key lets anyone send events to the project.
        parts = urlsplit(value.get_secret_value().strip())
        try:
            port_ok = parts.port is None or parts.port > 0
        except ValueError:
            port_ok = False
        project = parts.path.rstrip("/").rpartition("/")[2]
        if (
            parts.scheme not in ("http", "https")
            or not parts.username
            or not parts.hostname
            or not port_ok
            or not project.isdigit()
        ):
            raise ValueError(
                "expected https://PUBLIC_KEY@HOST/PROJECT_ID, the DSN of the project's "
                f"Client Keys settings (got a value of scheme {parts.scheme[:10]!r})"
            )
        return SecretStr(value.get_secret_value().strip())

    @field_validator(
        "google_client_id", "cors_allowed_origin", "trusted_proxies", "webhook_urls", mode="before"
    )
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("session_secret_key", "webhook_secret", mode="before")
    @classmethod
    def _csv_secrets(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("cors_allowed_origin")
    @classmethod
    def _exact_origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if not _ORIGIN.fullmatch(origin):
                raise ValueError(
                    f"each origin must be exact, scheme://host[:port] with no path or wildcard "
                    f"(the literal origin 'null' is never allowed), got {origin!r}"
                )
        return origins

    @field_validator("webhook_urls")
    @classmethod
    def _webhook_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            scheme, _, rest = url.partition("://")
            if scheme not in ("http", "https") or not rest or rest.startswith("/"):
                raise ValueError(f"expected http:// or https:// URLs, comma-separated, got {url!r}")
            if "@" in rest.split("/", 1)[0]:
                raise ValueError(
                    "a URL must not carry credentials (the signature authenticates the "
                    f"sender), got one for {rest.split('@', 1)[1].split('/', 1)[0]!r}"
                )
        if len(set(urls)) != len(urls):
            raise ValueError("a URL is listed twice")
        return urls

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secrets(cls, keys: list[SecretStr]) -> list[SecretStr]:
        low, high = WEBHOOK_SECRET_BYTES
        for i, key in enumerate(keys):
            text = key.get_secret_value()
            try:
                raw = base64.b64decode(text.removeprefix("whsec_"), validate=True)
            except (binascii.Error, ValueError):
                raw = b""
            if not text.startswith("whsec_") or not low <= len(raw) <= high:
                raise ValueError(
                    f"secret #{i + 1} must be whsec_ followed by {low} to {high} random bytes "
                    f"in base64 (Standard Webhooks); generate one with: {_WEBHOOK_KEYGEN_HINT}"
                )
        return keys

    @field_validator(
        "rate_limit_signin_per_ip",
        "rate_limit_signin_per_subject",
        "rate_limit_failed_signin_per_ip",
        "rate_limit_failed_signin_per_subject",
        "rate_limit_unauthenticated_per_ip",
        "rate_limit_probe_per_ip",
        "rate_limit_per_session",
        "rate_limit_per_user",
        "rate_limit_global",
        "rate_limit_export_per_user",
    )
    @classmethod
    def _limits(cls, value: str) -> str:
        try:
            limits.parse_many(value)
        except ValueError:
            raise ValueError(
                f"expected limits such as '10/minute;60/hour', got {value!r}"
            ) from None
        return value

    @field_validator("workers", mode="before")
    @classmethod
    def _auto_workers(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return len(os.sched_getaffinity(0))  # the CPUs this process may run on
        return value

    @field_validator("rate_limit_storage_url")
    @classmethod
    def _storage(cls, value: str) -> str:
        if not value.removeprefix("async+").startswith(("memory://", "redis://", "valkey://")):
            raise ValueError(f"expected memory:// or redis://host:port, got {value[:60]!r}")
        return value

    @field_validator("database_url")
    @classmethod
    def _database(cls, value: str) -> str:
        value = value.strip()
        if value and not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            scheme = value.partition("://")[0] if "://" in value else value[:20]
            raise ValueError(
                "expected sqlite:///PATH (the default, under DATA_DIR) or "
                f"postgresql://USER@HOST:PORT/DATABASE, got a URL of scheme {scheme!r}"
            )
        if value.startswith("sqlite:///") and not value.removeprefix("sqlite:///"):
            raise ValueError("sqlite:/// needs a file path, e.g. sqlite:///var/expense-auth.db")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_consistency(self) -> Config:
        problems: list[str] = []
        for i, key in enumerate(self.session_secret_key):
            if len(key.get_secret_value().encode()) < MIN_SECRET_BYTES:
                problems.append(
                    f"SESSION_SECRET_KEY: key #{i + 1} is shorter than {MIN_SECRET_BYTES} bytes; "
                    f"generate one with: {_KEYGEN_HINT}"
                )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            problems.append(
                "TLS_CERT_FILE, TLS_KEY_FILE: give both (PEM files) to serve HTTPS, or neither"
            )
        for name, path in (
            ("TLS_CERT_FILE", self.tls_cert_file),
            ("TLS_KEY_FILE", self.tls_key_file),
        ):
            if path is not None and not path.is_file():
                problems.append(f"{name}: no such file: {str(path)!r}")
        token = self.admin_token.get_secret_value() if self.admin_token else ""
        if token and len(token.encode()) < MIN_SECRET_BYTES:
            problems.append(
                f"ADMIN_TOKEN: must be at least {MIN_SECRET_BYTES} bytes; "
                f"generate one with: {_KEYGEN_HINT}"
            )
        if (
            self.forward_auth_port
            and self.forward_auth_port == self.admin_port
            and self.forward_auth_host == self.admin_host
        ):
            problems.append(
                f"FORWARD_AUTH_PORT: {self.forward_auth_port} is ADMIN_PORT too; the "
                "forward-auth listener needs a port of its own"
            )
        if self.webhook_urls and not self.webhook_secret:
            problems.append(
                "WEBHOOK_SECRET: required with WEBHOOK_URLS (receivers verify every delivery "
                f"with it); generate one with: {_WEBHOOK_KEYGEN_HINT}"
            )
        if self.session_max_age_seconds < self.session_idle_timeout_seconds:
            problems.append(
                "SESSION_MAX_AGE_SECONDS: must be at least SESSION_IDLE_TIMEOUT_SECONDS "
                f"({self.session_idle_timeout_seconds}), got {self.session_max_age_seconds}"
            )
        if self.workers > 1 and self.rate_limit_storage_url.removeprefix("async+").startswith(
            "memory://"
        ):
            problems.append(
                f"RATE_LIMIT_STORAGE_URL: with WORKERS={self.workers} the rate limits must be "
                "shared, or every worker counts alone and a client gets "
                f"{self.workers} times each limit; set it to redis://HOST:PORT/DB"
            )
        if self.app_env == "production":
            if not self.google_client_id:
                problems.append(
                    "GOOGLE_CLIENT_ID: required in production (the OAuth client id of the "
                    "frontend; comma-separated for several)"
                )
            if not self.session_secret_key:
                problems.append(
                    "SESSION_SECRET_KEY: required in production (comma-separated, oldest first; "
                    f"each at least {MIN_SECRET_BYTES} bytes)"
                )
            if not self.session_secure_cookie:
                problems.append(
                    "SESSION_SECURE_COOKIE: must be true in production (cookies only over HTTPS)"
                )
            if self.tls_cert_file is None and not self.behind_tls_proxy:
                problems.append(
                    "TLS_CERT_FILE: production needs HTTPS: give TLS_CERT_FILE and TLS_KEY_FILE, "
                    "or set BEHIND_TLS_PROXY=true when a TLS-terminating proxy is in front"
                )
            if self.signin_nonce_required is False:
                problems.append(
                    "SIGNIN_NONCE_REQUIRED: must stay on in production (it stops login CSRF "
                    "and token replay); unset it"
                )
            if self.dev_identity_enabled:
                problems.append(
                    "DEV_IDENTITY_ENABLED: the development issuer must be off in production; "
                    "unset it or set it to false"
                )
            problems += self._production_hardening()
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _production_hardening(self) -> list[str]:
        """What production refuses beyond the basics: each a way to weaken it silently."""
        problems: list[str] = []
        if not self.google_certs_url.startswith("https://"):
            problems.append(
                "GOOGLE_CERTS_URL: must be an https:// URL in production (over plain HTTP "
                "anyone on the path could hand us keys to sign our own tokens), got "
                f"{self.google_certs_url[:80]!r}"
            )
        for origin in self.cors_allowed_origin:
            if not origin.startswith("https://"):
                problems.append(
                    f"CORS_ALLOWED_ORIGIN: must be https:// origins in production (the cookie "
                    f"is Secure), got {origin!r}"
                )
        for i, key in enumerate(self.session_secret_key):
            bits = estimated_entropy_bits(key.get_secret_value())
            if bits < MIN_SECRET_ENTROPY_BITS:
                problems.append(
                    f"SESSION_SECRET_KEY: key #{i + 1} looks guessable (about {bits:.0f} bits "
                    f"of entropy, at least {MIN_SECRET_ENTROPY_BITS} needed); generate one "
                    f"with: {_KEYGEN_HINT}"
                )
        token = self.admin_token.get_secret_value() if self.admin_token else ""
        if token and estimated_entropy_bits(token) < MIN_SECRET_ENTROPY_BITS:
            problems.append(
                f"ADMIN_TOKEN: looks guessable (at least {MIN_SECRET_ENTROPY_BITS} bits of "
                f"entropy needed); generate one with: {_KEYGEN_HINT}"
            )
        dsn = urlsplit(self.sentry_dsn.get_secret_value()) if self.sentry_dsn else None
        if dsn is not None and dsn.scheme != "https" and dsn.hostname not in _LOOPBACK:
            problems.append(
                "SENTRY_DSN: must be an https:// DSN in production (events carry stack traces "
                "and request ids), or a Relay on this host (127.0.0.1, ::1, localhost)"
            )
        for url in self.webhook_urls:
            if url.startswith("http://") and urlsplit(url).hostname not in _LOOPBACK:
                problems.append(
                    f"WEBHOOK_URLS: must be https:// in production (the events carry email "
                    f"addresses), got {url[:80]!r}"
                )
        for network in self.trusted_proxies:
            if network.prefixlen < _MIN_PROXY_PREFIX[network.version]:
                problems.append(
                    f"TRUSTED_PROXIES: {network} trusts X-Forwarded-For from "
                    f"{'everyone' if network.prefixlen == 0 else 'a huge range'}, so any "
                    "client could choose its own address; list your proxies' own networks"
                )
        return problems

    @property
    def production(self) -> bool:
        """Whether the service runs with production rules."""
        return self.app_env == "production"

    @property
    def dev_identity(self) -> bool:
        """Whether the local development issuer is accepted (default: in development only)."""
        if self.dev_identity_enabled is None:
            return not self.production
        return self.dev_identity_enabled

    @property
    def nonce_required(self) -> bool:
        """Whether SignIn requires a nonce from CreateSignInNonce (default: in production)."""
        if self.signin_nonce_required is None:
            return self.production
        return self.signin_nonce_required

    @property
    def https(self) -> bool:
        """Whether clients reach the service over HTTPS (directly or through a proxy)."""
        return self.tls_cert_file is not None or self.behind_tls_proxy

    @property
    def postgres(self) -> bool:
        """Whether the database is PostgreSQL (else the embedded SQLite file)."""
        return self.database_url.startswith(("postgresql://", "postgres://"))

    @property
    def sqlite_path(self) -> Path:
        """The SQLite database file, from DATABASE_URL or under DATA_DIR."""
        url = self.database_url
        if not url or self.postgres:
            return self.data_dir / "expense-auth.db"
        return Path(url.removeprefix("sqlite:///"))


def load_config(
    environ: Mapping[str, str] | None = None,
    *,
    env_file: str | Path | None = ".env",
    overrides: Mapping[str, str] | None = None,
) -> Config:
    """Build the configuration from `environ` (default: the process environment).

    Args:
        environ: Variables to read instead of the process environment, for tests.
        env_file: An optional dotenv file, read when `environ` is None; the real
            environment wins over it.
        overrides: Variables that win over both (command-line options).

    Raises:
        ConfigError: Listing every problem found, each naming its variable.
    """
    if environ is None:
        merged: dict[str, str] = {}
        if env_file is not None and Path(env_file).is_file():
            merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
        merged.update(os.environ)
        environ = merged
    environ = {**environ, **(overrides or {})}
    known = set(Config.model_fields)
    values = {k.lower(): v for k, v in environ.items() if k.lower() in known}
    try:
        # model_validate reads only `values`: no hidden settings sources.
        return Config.model_validate(values)
    except ValidationError as exc:
        problems = _describe(exc)
        bad = {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
        if bad:
            # Check the rest too, so that every problem is reported in one go.
            try:
                Config.model_validate({k: v for k, v in values.items() if k not in bad})
            except ValidationError as rest:
                problems += [p for p in _describe(rest) if p not in problems]
        raise ConfigError(problems) from None


def _describe(exc: ValidationError) -> list[str]:
    problems: list[str] = []
    for error in exc.errors(include_url=False):
        loc = [str(part) for part in error["loc"]]
        if not loc:
            # Whole-model checks carry their own variable names, one per line.
            message = error["msg"].removeprefix("Value error, ")
            problems.extend(message.splitlines())
            continue
        name = loc[0].upper()
        if error["type"] == "value_error":  # our own validators quote the value themselves
            problems.append(f"{name}: {error['msg'].removeprefix('Value error, ')}")
            continue
        value = error.get("input")
        secret = name in ("SESSION_SECRET_KEY", "ADMIN_TOKEN", "SENTRY_DSN", "WEBHOOK_SECRET")
        shown = "<secret>" if secret else repr(value)
        problems.append(f"{name}: {error['msg']}, got {shown}")
    return problems
