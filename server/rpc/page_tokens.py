"""Opaque page tokens (AIP-158): a signed cursor bound to the user who asked.

Clients must treat them as opaque; signing makes a forged or edited token fail
with a clear `invalid_argument` instead of paging somewhere unexpected.
"""

from __future__ import annotations

from collections.abc import Sequence

from itsdangerous import BadData, URLSafeSerializer

from server.domain.errors import InvalidArgument
from server.domain.models import SessionCursor

MAX_TOKEN = 512


class PageTokens:
    """Encodes and decodes session list cursors."""

    def __init__(self, keys_oldest_first: Sequence[str]) -> None:
        self._serializer = URLSafeSerializer(list(keys_oldest_first), salt="list-sessions-page")

    def encode(self, user_id: str, cursor: SessionCursor | None) -> str:
        """The token for the page after `cursor`, or empty at the end."""
        if cursor is None:
            return ""
        return self._serializer.dumps([user_id, cursor.create_ms, cursor.session_id])

    def decode(self, user_id: str, token: str) -> SessionCursor | None:
        """The cursor in `token` (None for the first page)."""
        if not token:
            return None
        problem = InvalidArgument(
            "page_token",
            "page_token is not valid; pass the next_page_token of a previous "
            "ListSessions response, or nothing for the first page",
        )
        if len(token) > MAX_TOKEN:
            raise problem
        try:
            owner, create_ms, session_id = self._serializer.loads(token)
        except (BadData, ValueError, TypeError):
            raise problem from None
        if owner != user_id or not isinstance(create_ms, int) or not isinstance(session_id, str):
            raise problem
        return SessionCursor(create_ms=create_ms, session_id=session_id)
