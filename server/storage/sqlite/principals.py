"""The principal cache: sessions and their users by token hash, exactly as fresh as the file.

A cache is valid for one value of the database's principal generation
(migration m004), which triggers move on every change to a user or to a
session other than its last-seen time, whoever writes it. So a revocation takes
effect on the very next request, as without the cache.
"""

from __future__ import annotations

from dataclasses import replace

from server.domain.models import Principal, User

# Beyond this many entries the cache starts over, so memory stays bounded
# (about 1.3 KB per entry whose user no other entry shares; less when they share).
PRINCIPAL_CACHE_MAX = 10_000


class PrincipalCache:
    """Principals by token hash, valid for one principal generation."""

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.by_token: dict[bytes, Principal] = {}
        self.token_of_session: dict[str, bytes] = {}
        # One User per person: each lookup reads the user's row afresh, and a
        # person signed in on several devices would otherwise be held once per session.
        self.users: dict[str, User] = {}

    def add(self, token_hash: bytes, principal: Principal) -> Principal:
        """Remember a principal found by its token hash; returns the one kept."""
        if len(self.by_token) >= PRINCIPAL_CACHE_MAX:
            self.by_token.clear()
            self.token_of_session.clear()
            self.users.clear()
        user = self.users.get(principal.user.id)
        if user == principal.user:
            principal = replace(principal, user=user)
        else:
            self.users[principal.user.id] = principal.user
        self.by_token[token_hash] = principal
        self.token_of_session[principal.session.id] = token_hash
        return principal

    def forget_session(self, session_id: str) -> None:
        """Drop one session (its last-seen time moved)."""
        token_hash = self.token_of_session.pop(session_id, None)
        if token_hash is not None:
            self.by_token.pop(token_hash, None)
