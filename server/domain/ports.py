"""The domain's ports: what each domain service needs from the world, owned by that service.

Storage engines implement these (the SQLite store implements all of them); the
domain never imports an engine. Each protocol is small and named for its caller
(Go's "interfaces belong to the consumer"). Methods are async so that an engine
with network I/O fits the same contract. Times are epoch milliseconds; "live"
means not revoked, not past `expire_ms`, and last seen after `idle_cutoff_ms`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from server.domain.lifecycle import ChangeEvents, no_events
from server.domain.models import (
    AuditEvent,
    Identity,
    OutboxEvent,
    Principal,
    Session,
    SessionCursor,
    SingleUse,
    User,
    UserExport,
    WebhookDelivery,
)


class UserDefaults(Protocol):
    """Preferences given to a user on their first sign-in."""

    @property
    def currency_code(self) -> str:
        """ISO 4217 code."""
        ...

    @property
    def time_zone(self) -> str:
        """IANA time zone name."""
        ...

    @property
    def locale(self) -> str:
        """BCP 47 tag, used when the identity carries none."""
        ...


class IdentityVerifier(Protocol):
    """Turns an ID token into a verified identity."""

    async def verify(self, token: str) -> Identity:
        """The identity in the token, or a domain error."""
        ...


class SessionStore(Protocol):
    """What the session service (`Sessions`) needs."""

    async def sign_in(
        self,
        identity: Identity,
        *,
        new_user_id: str,
        defaults: UserDefaults,
        session: Session,
        now_ms: int,
        event: AuditEvent | None = None,
        nonce: SingleUse | None = None,
        events: ChangeEvents = no_events,
    ) -> tuple[User, Session]:
        """Create or update the user for `identity` and insert `session` for them, atomically.

        `session.user_id` is ignored and replaced by the user's id; `new_user_id`
        is used only when the user is new. `event`, if given, is appended to the
        audit log in the same transaction, with the user's and session's ids. The
        identity's token and the `nonce`, if given, are spent in it too: each
        only once. What `events(before, after)` returns for the user is written to
        the outbox in it too (here and in every method that takes `events`).
        """
        ...

    async def find_user_by_subject(self, issuer: str, subject: str) -> User | None:
        """The user signing in as (issuer, subject)."""
        ...

    async def find_principal(self, token_hash: bytes, *, fresh: bool = False) -> Principal | None:
        """The session with this token hash and its user, whatever the session's state.

        An engine may answer from a cache that is exactly as fresh as the data, except
        for last-seen times written by other processes; `fresh` reads past any cache.
        """
        ...

    async def touch_session(self, session_id: str, *, last_seen_ms: int) -> None:
        """Record that the session was used (never moves last-seen back).

        Never fails the caller: a write that cannot be made now is retried later.
        """
        ...

    async def revoke_session(
        self,
        user_id: str,
        session_id: str,
        *,
        now_ms: int,
        idle_cutoff_ms: int,
        caller_id: str | None = None,
    ) -> bool:
        """Revoke one live session of the user; False when there is no such live session.

        Raises:
            Unauthenticated: `caller_id` was revoked or ended meanwhile.
        """
        ...

    async def revoke_other_sessions(
        self, user_id: str, keep_id: str, *, now_ms: int, idle_cutoff_ms: int
    ) -> int:
        """Revoke all of the user's live sessions but `keep_id`; returns how many."""
        ...

    async def list_live_sessions(
        self,
        user_id: str,
        *,
        now_ms: int,
        idle_cutoff_ms: int,
        after: SessionCursor | None,
        limit: int,
    ) -> list[Session]:
        """The user's live sessions, newest first, starting after `after`."""
        ...


class ProfileStore(Protocol):
    """What the profile service (`Users`) needs."""

    async def update_user(
        self,
        user_id: str,
        changes: Mapping[str, str],
        *,
        now_ms: int,
        events: ChangeEvents = no_events,
    ) -> User | None:
        """Set the given profile columns; None when the user does not exist."""
        ...


class AuditStore(Protocol):
    """What the audit log (`Audit`) needs."""

    async def record_event(self, event: AuditEvent) -> None:
        """Append one audit event."""
        ...


class AccountStore(Protocol):
    """What self-service account operations (`Accounts`) need."""

    async def list_events(
        self, user_id: str, *, before_id: int | None, limit: int
    ) -> list[AuditEvent]:
        """The user's events, newest first, starting below `before_id`."""
        ...

    async def export_user(self, user_id: str) -> UserExport | None:
        """Everything stored about the user, read consistently."""
        ...

    async def delete_user(
        self,
        user: User,
        *,
        identity: Identity,
        tombstone: AuditEvent,
        now_ms: int,
        events: ChangeEvents = no_events,
    ) -> bool:
        """Delete the user with sessions and events, claiming the re-authentication token,
        and record the tombstone and the deletion, atomically."""
        ...


class AdminStore(Protocol):
    """What operator actions (`Admin`) need."""

    async def get_user(self, user_id: str) -> User | None:
        """The user with this id, or None."""
        ...

    async def list_users(
        self, *, email_contains: str, after_id: str | None, limit: int
    ) -> list[User]:
        """Users by id, filtered by an email substring."""
        ...

    async def set_disabled(
        self,
        user_id: str,
        *,
        disabled: bool,
        now_ms: int,
        idle_cutoff_ms: int,
        events: ChangeEvents = no_events,
    ) -> User | None:
        """Disable (and revoke every live session) or enable the user."""
        ...

    async def revoke_all_sessions(self, user_id: str, *, now_ms: int, idle_cutoff_ms: int) -> int:
        """Revoke every live session of the user; returns how many."""
        ...


class RetentionStore(Protocol):
    """What the retention job (`Retention`) needs."""

    async def purge(
        self,
        *,
        now_ms: int,
        session_grace_ms: int,
        idle_ms: int,
        events_before_ms: int,
        ips_before_ms: int,
    ) -> dict[str, int]:
        """Apply the retention windows; returns counts per kind of row."""
        ...


class OutboxStore(Protocol):
    """What the webhook delivery worker and its operators (`Deliveries`) need."""

    async def outbox_due(self, *, now_ms: int, endpoints: Sequence[str]) -> bool:
        """Whether a pending event for one of `endpoints` is due and not leased."""
        ...

    async def claim_outbox(
        self,
        *,
        now_ms: int,
        lease_until_ms: int,
        owner: str,
        endpoints: Sequence[str],
        limit: int,
    ) -> list[WebhookDelivery]:
        """Lease up to `limit` due events to `owner`, in outbox order: only the oldest
        pending event of each (user, endpoint), and none that another lease holds."""
        ...

    async def outbox_delivered(self, seq: int, *, owner: str) -> None:
        """Remove a delivered event, if `owner` still holds its lease."""
        ...

    async def outbox_failed(
        self, seq: int, *, owner: str, error: str, next_attempt_ms: int, park: bool
    ) -> None:
        """Count a failed attempt (if `owner` still holds the lease) and release the
        event: to be tried at `next_attempt_ms`, or parked."""
        ...

    async def list_outbox(
        self, *, states: Sequence[str], after_seq: int | None, limit: int
    ) -> list[WebhookDelivery]:
        """Events in these states, in outbox order, after `after_seq`."""
        ...

    async def redeliver_outbox(
        self, event_id: str, *, now_ms: int
    ) -> tuple[list[WebhookDelivery], bool]:
        """Put the event's parked entries back in line from `now_ms`; returns them, and
        whether it still has pending ones."""
        ...

    async def count_outbox(self) -> dict[str, int]:
        """How many entries are in each state."""
        ...


class WebhookSender(Protocol):
    """Sends one event to its endpoint, signed."""

    async def send(self, event: OutboxEvent) -> None:
        """Deliver `event`; returns once the endpoint acknowledged it with a 2xx.

        Raises:
            DeliveryFailed: Any other answer, no answer in time, or no connection
                (server/domain/webhooks.py).
        """
        ...
