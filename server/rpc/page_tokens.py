"""Opaque page tokens (AIP-158): a signed cursor bound to its list and to its caller.

Clients must treat them as opaque; signing makes a forged or edited token fail
with a clear `invalid_argument` instead of paging somewhere unexpected, and the
owner inside it stops one caller from using another's token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from itsdangerous import BadData, URLSafeSerializer

from server.domain.errors import InvalidArgument
from server.domain.models import SessionCursor
from server.domain.tokens import canonical_b64url

MAX_TOKEN = 512


class PageTokens:
    """Encodes and decodes the cursors of one list (`name`, e.g. `ListSessions`)."""

    def __init__(self, keys_oldest_first: Sequence[str], *, name: str) -> None:
        self._name = name
        self._serializer = URLSafeSerializer(list(keys_oldest_first), salt=f"page:{name}")

    def encode(self, owner: str, cursor: list[Any] | None) -> str:
        """The token for the page after `cursor`, or empty at the end."""
        if cursor is None:
            return ""
        return self._serializer.dumps([owner, *cursor])

    def decode(self, owner: str, token: str, *, shape: tuple[type, ...]) -> list[Any] | None:
        """The cursor in `token` (None for the first page); its items must match `shape`."""
        if not token:
            return None
        problem = InvalidArgument(
            "page_token",
            f"page_token is not valid; pass the next_page_token of a previous {self._name} "
            "response, or nothing for the first page",
        )
        if len(token) > MAX_TOKEN or not all(canonical_b64url(p) for p in token.split(".")):
            raise problem
        try:
            loaded = self._serializer.loads(token)
        except (BadData, ValueError, TypeError):
            raise problem from None
        if not isinstance(loaded, list) or len(loaded) != len(shape) + 1 or loaded[0] != owner:
            raise problem
        cursor = loaded[1:]
        if not all(type(item) is kind for item, kind in zip(cursor, shape, strict=True)):
            raise problem
        return cursor


def session_cursor(tokens: PageTokens, owner: str, token: str) -> SessionCursor | None:
    """Decode a ListSessions token."""
    cursor = tokens.decode(owner, token, shape=(int, str))
    return None if cursor is None else SessionCursor(create_ms=cursor[0], session_id=cursor[1])
