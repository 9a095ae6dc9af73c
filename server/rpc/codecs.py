"""The codecs, guarded against deeply nested input and responses that cannot be encoded.

protobuf-py's native JSON parser (protobuf-py-ext 0.7) limits the nesting of
objects but not of arrays: a few thousand `[` overflow the stack and kill the
whole server process. Every JSON message (Connect JSON, Connect GET, gRPC and
gRPC-Web with +json) is decoded by this codec, after decompression and the size
limit, so the depth is checked on exactly the bytes that would be parsed.

connectrpc encodes a Connect unary response after the interceptors have ended, so
the error boundary never sees a response that cannot be encoded (a stored value
out of its field's range: a timestamp past year 9999 has no JSON form). connectrpc
would answer `unknown` quoting Python's exception, and log nothing of it as ours.
`GuardedEncoding` answers `internal` with the generic message instead, after
handing the exception to the boundary (log line with traceback, error tracker).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from connectrpc.code import Code
from connectrpc.codec import Codec, proto_json_codec
from connectrpc.errors import ConnectError

from server.rpc.errors import INTERNAL_MESSAGE

MAX_JSON_DEPTH = 32  # the deepest message of this API nests about 4 levels

T = TypeVar("T")
# A JSON string (skipped whole, escapes included) or one bracket.
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def json_depth_exceeds(data: bytes | bytearray, limit: int) -> bool:
    """Whether the nesting of arrays and objects in `data` goes deeper than `limit`."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return False  # cannot nest deeper than it has brackets: the common, cheap case
    depth = 0
    for match in _TOKENS.finditer(data):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        elif token in (b"]", b"}"):
            depth -= 1
    return False


class DepthLimitedJSONCodec:
    """connectrpc's JSON codec with a nesting limit checked before parsing."""

    def __init__(self, inner: Codec[Any, Any] | None = None, *, max_depth: int = MAX_JSON_DEPTH):
        self._inner = inner or proto_json_codec()
        self._max_depth = max_depth

    def name(self) -> str:
        """The codec name: `json`."""
        return self._inner.name()

    def encode(self, message: Any) -> bytes:
        """Encode as the inner codec does."""
        return self._inner.encode(message)

    def decode(self, data: bytes | bytearray, message_class: type[T]) -> T:
        """Refuse too-deep input, then decode."""
        if json_depth_exceeds(data, self._max_depth):
            raise ConnectError(
                Code.INVALID_ARGUMENT,
                f"the JSON message nests deeper than {self._max_depth} levels",
            )
        result: T = self._inner.decode(data, message_class)
        return result


class GuardedEncoding:
    """A codec whose encoding failures become `internal` with the generic message.

    Args:
        inner: The codec.
        on_error: Told of each failure (it logs and reports it).
    """

    def __init__(self, inner: Codec[Any, Any], *, on_error: Callable[[Exception], None]):
        self._inner = inner
        self._on_error = on_error

    def name(self) -> str:
        """The inner codec's name."""
        return self._inner.name()

    def encode(self, message: Any) -> bytes:
        """Encode as the inner codec does; a failure is `internal`, reported, not quoted."""
        try:
            data: bytes = self._inner.encode(message)
        except Exception as exc:
            self._on_error(exc)
            raise ConnectError(Code.INTERNAL, INTERNAL_MESSAGE) from None
        return data

    def decode(self, data: bytes | bytearray, message_class: type[T]) -> T:
        """Decode as the inner codec does."""
        result: T = self._inner.decode(data, message_class)
        return result
