"""The sign-in policy: verify, check the nonce, limit, start the session, keep the record.

Failed attempts are limited per client network and, once the token names an
account, per account. Only failures count and only failures are refused: a
valid sign-in passes whatever strangers behind the same address did, so nobody
can lock an office out by sending bad tokens from it (docs/security.md). Every
refusal is audited: against the account it was for when the token names one,
as an operator's event otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

from server.domain.audit import SIGN_IN, SIGN_IN_FAILED, Audit, Origin
from server.domain.errors import (
    DomainError,
    EmailNotVerified,
    RateLimited,
    Unauthenticated,
    Unavailable,
)
from server.domain.models import Identity, SingleUse
from server.domain.ports import IdentityVerifier
from server.domain.sessions import NewSession, Sessions
from server.domain.throttle import (
    FAILED_SIGNIN_PER_IP,
    FAILED_SIGNIN_PER_SUBJECT,
    SIGNIN_PER_SUBJECT,
    Throttle,
)

# Checks the identity's nonce against what the caller was given; returns what the
# sign-in must spend, or raises Unauthenticated.
NonceCheck = Callable[[Identity], SingleUse | None]


class SignIns:
    """Turns an ID token into a new session, or a refusal that is counted and recorded."""

    def __init__(
        self,
        *,
        verifier: IdentityVerifier,
        sessions: Sessions,
        throttle: Throttle,
        audit_log: Audit,
    ) -> None:
        self._verifier = verifier
        self._sessions = sessions
        self._throttle = throttle
        self._audit = audit_log

    async def sign_in(
        self, token: str, *, origin: Origin, network: str, check_nonce: NonceCheck
    ) -> NewSession:
        """Verify `token` and start a brand-new session for its account.

        Args:
            token: The ID token, as the client sent it.
            origin: Where the call came from, for the record.
            network: The client as per-network limits key it.
            check_nonce: Matches the token's nonce to the caller's (see NonceCheck).

        Raises:
            DomainError: Why not: a bad or spent token, a nonce mismatch, a limit
                (`RateLimited`), an unverified email, a disabled account.
        """
        try:
            identity = await self._verifier.verify(token)
        except Unauthenticated as exc:
            # No account is known yet: an event for operators, shown to no user.
            await self._audit.record(SIGN_IN_FAILED, user_id=None, origin=origin, reason=exc.reason)
            await self._failed(network, None)
            raise
        except EmailNotVerified as exc:
            # The token is genuine, so the refusal belongs to that account's history.
            await self._refused(exc.identity, origin, exc)
            await self._failed(network, exc.identity)
            raise
        try:
            nonce = check_nonce(identity)
            await self._throttle.hit(
                SIGNIN_PER_SUBJECT, identity.subject_hash, what="too many sign-ins for this account"
            )
            return await self._sessions.sign_in(
                identity,
                user_agent=origin.user_agent,
                event=self._audit.event(SIGN_IN, user_id=None, origin=origin),
                nonce=nonce,
            )
        except Unavailable:
            raise  # the store failed, not the sign-in: nothing to record (it could not be)
        except DomainError as exc:
            await self._refused(identity, origin, exc)
            if not isinstance(exc, RateLimited):
                await self._failed(network, identity)
            raise

    async def _failed(self, network: str, identity: Identity | None) -> None:
        """Count a failed sign-in; past a budget, refuse it as `resource_exhausted`.

        Raises:
            RateLimited: The network (or the account) has failed too often lately.
        """
        await self._throttle.hit(
            FAILED_SIGNIN_PER_IP, network, what="too many failed sign-ins from your network"
        )
        if identity is not None:
            await self._throttle.hit(
                FAILED_SIGNIN_PER_SUBJECT,
                identity.subject_hash,
                what="too many failed sign-ins for this account",
            )

    async def _refused(self, identity: Identity, origin: Origin, exc: DomainError) -> None:
        """Record a refused sign-in in the history of the account it was for, if any."""
        user = await self._sessions.user_for(identity)
        if isinstance(exc, RateLimited):
            if user is not None:
                await self._audit.rate_limited(user_id=user.id, origin=origin, reason="sign_in")
            return
        await self._audit.record(
            SIGN_IN_FAILED,
            user_id=None if user is None else user.id,
            origin=origin,
            reason=exc.reason,
        )
