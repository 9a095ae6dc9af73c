"""The principal cache: sessions and their users by token hash, exactly as fresh as the file.

A cache is valid for one value of the database's principal generation
(migration m004), which triggers move on every change to a user or to a
session other than its last-seen time, whoever writes it. So a revocation takes
effect on the very next request, as without the cache.
"""

from __future__ import annotations

from server.domain.models import Principal

# Beyond this many entries the cache starts over, so memory stays bounded
# (about 1 KB per entry).
PRINCIPAL_CACHE_MAX = 10_000


class PrincipalCache:
    """Principals by token hash, valid for one principal generation."""

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.by_token: dict[bytes, Principal] = {}
        self.token_of_session: dict[str, bytes] = {}

    def add(self, token_hash: bytes, principal: Principal) -> None:
        """Remember a principal found by its token hash."""
        if len(self.by_token) >= PRINCIPAL_CACHE_MAX:
            self.by_token.clear()
            self.token_of_session.clear()
        self.by_token[token_hash] = principal
        self.token_of_session[principal.session.id] = token_hash

    def forget_session(self, session_id: str) -> None:
        """Drop one session (its last-seen time moved)."""
        token_hash = self.token_of_session.pop(session_id, None)
        if token_hash is not None:
            self.by_token.pop(token_hash, None)
