"""The current call: who makes it, from where, and what it is. One home for both sides.

Interceptors set these values (in `on_start`, reset in `on_end`) and handlers
read them, as connect-go's authn `SetInfo`/`GetInfo`: the interceptors import
this module, the handlers import this module, and neither imports the other.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from typing import Any

from connectrpc.request import RequestContext

from server.domain.audit import Origin
from server.domain.models import Principal
from server.rpc.user_agent import summarize

# Procedures named in more than one place of the chain.
SIGN_IN = "/expense.auth.v1.AuthService/SignIn"
CREATE_SIGN_IN_NONCE = "/expense.auth.v1.AuthService/CreateSignInNonce"
# Callable without a session.
PUBLIC_PROCEDURES = frozenset({SIGN_IN, CREATE_SIGN_IN_NONCE})
REFLECTION_PROCEDURES = frozenset(
    {
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    }
)
REQUEST_ID_HEADER = "x-request-id"

_principal: ContextVar[Principal | None] = ContextVar("expense_auth_principal", default=None)
_client_ip: ContextVar[str] = ContextVar("expense_auth_client_ip", default="")
_client_network: ContextVar[str] = ContextVar("expense_auth_client_network", default="")
_request_id: ContextVar[str] = ContextVar("expense_auth_request_id", default="")


def current_principal() -> Principal:
    """The caller of the current authenticated RPC.

    Raises:
        RuntimeError: Called from a public RPC, which is a programming error.
    """
    principal = _principal.get()
    if principal is None:
        raise RuntimeError("no principal: the procedure is not behind the session interceptor")
    return principal


def set_principal(principal: Principal) -> Token[Principal | None]:
    """Make `principal` the caller of the current call (the session interceptor)."""
    return _principal.set(principal)


def reset_principal(token: Token[Principal | None]) -> None:
    """Forget the caller at the end of the call."""
    _principal.reset(token)


def client_ip() -> str:
    """The current call's client IP ("" outside a call or when unknown)."""
    return _client_ip.get()


def client_network() -> str:
    """The current call's client, as per-client rate limits key it (an IPv6 client's /64)."""
    return _client_network.get()


def set_client(ip: str, network: str) -> tuple[Token[str], Token[str]]:
    """Record the resolved client address of the current call (the client-address interceptor)."""
    return _client_ip.set(ip), _client_network.set(network)


def reset_client(tokens: tuple[Token[str], Token[str]]) -> None:
    """Forget the client address at the end of the call."""
    _client_ip.reset(tokens[0])
    _client_network.reset(tokens[1])


def procedure_of(ctx: RequestContext[Any, Any]) -> str:
    """The `/package.Service/Method` path of the call."""
    return f"/{ctx.method.service_name}/{ctx.method.name}"


def protocol_of(content_type: str) -> str:
    """The RPC protocol a request used, from its content type."""
    if content_type.startswith("application/grpc-web"):
        return "grpc-web"
    if content_type.startswith("application/grpc"):
        return "grpc"
    return "connect"


def set_request_id(request_id: str) -> None:
    """Record the current call's request id (the logging interceptor).

    Not reset when the call's interceptors end: connectrpc encodes a Connect unary
    response after that, and an encoding failure is logged with this id. Each
    request runs in a task of its own, whose context ends with it.
    """
    _request_id.set(request_id)


def current_request_id() -> str:
    """The current call's request id ("" outside a call)."""
    return _request_id.get()


def request_id_of(ctx: RequestContext[Any, Any]) -> str:
    """The call's request id, as the logging interceptor assigned it."""
    return ctx.response_headers.get(REQUEST_ID_HEADER, "")


def origin_of(ctx: RequestContext[Any, Any]) -> Origin:
    """The caller's IP and a summary of its User-Agent, for the audit log."""
    return Origin(ip=client_ip(), user_agent=summarize(ctx.request_headers.get("user-agent", "")))
