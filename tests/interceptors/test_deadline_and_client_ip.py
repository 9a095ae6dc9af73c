"""The deadline interceptor and client-IP resolution, in process (pure logic, real objects)."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.method import IdempotencyLevel, MethodInfo, StreamType
from connectrpc.request import Headers, RequestContext

from gen.expense.auth.v1.auth_pb import GetSessionRequest, GetSessionResponse
from interceptors.client_ip import resolve
from interceptors.deadline import Deadline

METHOD = MethodInfo(
    name="GetSession",
    service_name="expense.auth.v1.AuthService",
    input=GetSessionRequest,
    output=GetSessionResponse,
    idempotency_level=IdempotencyLevel.NO_SIDE_EFFECTS,
    stream_type=StreamType.UNARY,
)


def context() -> RequestContext[Any, Any]:
    return RequestContext(method=METHOD, http_method="POST", request_headers=Headers())


def test_a_call_over_the_ceiling_is_deadline_exceeded() -> None:
    async def slow(request: GetSessionRequest, ctx: RequestContext[Any, Any]) -> str:
        await asyncio.sleep(5)
        return "too late"

    with pytest.raises(ConnectError) as err:
        asyncio.run(Deadline(0.05).intercept_unary(slow, GetSessionRequest(), context()))
    assert err.value.code is Code.DEADLINE_EXCEEDED
    assert "0.05 s" in err.value.message


def test_a_call_within_the_ceiling_returns() -> None:
    async def quick(request: GetSessionRequest, ctx: RequestContext[Any, Any]) -> str:
        return "done"

    assert asyncio.run(Deadline(1).intercept_unary(quick, GetSessionRequest(), context())) == "done"


PROXIES = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("203.0.113.9:5000", ["6.6.6.6"], "203.0.113.9"),  # untrusted peer: header ignored
        ("10.0.0.2:5000", [], "10.0.0.2"),
        ("10.0.0.2:5000", ["198.51.100.7"], "198.51.100.7"),
        ("10.0.0.2:5000", ["6.6.6.6, 198.51.100.7"], "198.51.100.7"),  # right-most untrusted
        ("10.0.0.2:5000", ["6.6.6.6", "198.51.100.7, 10.1.1.1"], "198.51.100.7"),
        ("10.0.0.2:5000", ["10.9.9.9, 10.1.1.1"], "10.9.9.9"),  # all trusted: left-most
        ("10.0.0.2:5000", ["garbage, 10.1.1.1"], "10.1.1.1"),  # stop at garbage
        ("fd00::2:443", ["2001:db8::5"], "2001:db8::5"),
        ("[fd00::2]:443", ["2001:db8::5"], "2001:db8::5"),
        ("not-an-address", ["1.2.3.4"], ""),
        (None, [], ""),
    ],
)
def test_client_ip(peer: str | None, forwarded: list[str], client: str) -> None:
    assert resolve(peer, forwarded, PROXIES) == client
