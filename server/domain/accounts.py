"""A user's own account: deletion with re-authentication, export, security history."""

from __future__ import annotations

from server.domain import audit, paging
from server.domain.audit import Audit, Origin
from server.domain.clock import Clock
from server.domain.errors import NotFound, PermissionDenied
from server.domain.lifecycle import ChangeEvents, no_events
from server.domain.models import AuditEvent, Identity, Principal, UserExport
from server.domain.ports import AccountStore
from server.domain.throttle import EXPORT_PER_USER, Throttle

REAUTH_MAX_AGE_MS = 5 * 60_000


class Accounts:
    """Self-service operations on the caller's account."""

    def __init__(
        self,
        store: AccountStore,
        *,
        clock: Clock,
        audit_log: Audit,
        throttle: Throttle,
        events: ChangeEvents = no_events,
    ) -> None:
        self._store = store
        self._events = events
        self._clock = clock
        self._audit = audit_log
        self._throttle = throttle

    async def delete(self, principal: Principal, identity: Identity) -> None:
        """Delete the caller, given a fresh re-authentication for the same account.

        Raises:
            PermissionDenied: The token is for another account, or not fresh.
        """
        user = principal.user
        if (identity.issuer, identity.subject) != (user.issuer, user.subject):
            raise PermissionDenied(
                "the re-authentication is for another Google account; sign in again with "
                "the account you want to delete"
            )
        now = self._clock.now_ms()
        age_s = (now - identity.issued_ms) // 1000
        if age_s > REAUTH_MAX_AGE_MS // 1000:
            raise PermissionDenied(
                f"the re-authentication is {age_s} s old; deleting an account needs a Google "
                f"sign-in from the last {REAUTH_MAX_AGE_MS // 60_000} minutes"
            )
        tombstone = AuditEvent(
            time_ms=now, kind=audit.ACCOUNT_DELETED, subject_hash=identity.subject_hash
        )
        deleted = await self._store.delete_user(
            user, identity=identity, tombstone=tombstone, now_ms=now, events=self._events
        )
        if not deleted:
            raise NotFound("the signed-in user no longer exists")

    async def export(self, principal: Principal, origin: Origin) -> UserExport:
        """Everything stored about the caller (the export itself is recorded first).

        Raises:
            RateLimited: Too many exports for this user lately (recorded on their history).
        """
        user_id = principal.user.id
        await self._audit.guard(
            self._throttle.hit(EXPORT_PER_USER, user_id, what="too many data exports"),
            user_id=user_id,
            origin=origin,
            reason="export",
        )
        await self._audit.record(
            audit.DATA_EXPORTED,
            user_id=principal.user.id,
            origin=origin,
            session_id=principal.session.id,
        )
        exported = await self._store.export_user(principal.user.id)
        if exported is None:
            raise NotFound("the signed-in user no longer exists")
        return exported

    async def events(
        self, principal: Principal, *, page_size: int, before_id: int | None
    ) -> tuple[list[AuditEvent], int | None]:
        """One page of the caller's security events, newest first, and the next cursor."""
        size = paging.page_size(page_size)
        rows = await self._store.list_events(principal.user.id, before_id=before_id, limit=size + 1)
        page, last = paging.split_page(rows, size)
        return page, None if last is None else last.id
