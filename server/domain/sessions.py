"""Sign-in and session rules: creation, validation, expiry, revocation, listing.

This is the only place that decides whether a session is valid. The transport
hands it cookie secrets and verified identities; it hands back principals or
domain errors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TypedDict

from server.domain import paging
from server.domain.clock import Clock
from server.domain.errors import InvalidArgument, NotFound, Unauthenticated
from server.domain.lifecycle import ChangeEvents, no_events
from server.domain.models import (
    AuditEvent,
    Identity,
    Principal,
    Session,
    SessionCursor,
    SingleUse,
    User,
)
from server.domain.ports import SessionStore, UserDefaults
from server.domain.tokens import hash_secret, new_public_id, new_secret

MAX_USER_AGENT = 64
MAX_TOUCH_INTERVAL_MS = 60_000


class LiveWindow(TypedDict):
    """What "live" means now, as the store's queries take it."""

    now_ms: int
    idle_cutoff_ms: int


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """How long sessions live.

    Attributes:
        idle_ms: A session unused for this long ends.
        max_age_ms: A session ends this long after sign-in, however busy.
        touch_interval_ms: `last_seen` is written at most this often per session,
            so that the hot path reads without writing. By default a quarter of
            the idle timeout, at most a minute: a session used at least every
            `idle_ms - touch_interval_ms` never idles out, whatever the timeout.
    """

    idle_ms: int
    max_age_ms: int
    touch_interval_ms: int = 0

    def __post_init__(self) -> None:
        if self.touch_interval_ms <= 0:
            default = min(MAX_TOUCH_INTERVAL_MS, self.idle_ms // 4)
            object.__setattr__(self, "touch_interval_ms", default)

    def expire_ms(self, session: Session) -> int:
        """When the session ends unless used again."""
        return min(session.last_seen_ms + self.idle_ms, session.expire_ms)


@dataclass(frozen=True, slots=True)
class NewSession:
    """The result of a sign-in: the secret goes into the cookie, never into storage."""

    user: User
    session: Session
    secret: str


@dataclass(frozen=True, slots=True)
class DefaultPreferences:
    """What a new user starts with, before they change it."""

    currency_code: str = "USD"
    time_zone: str = "UTC"
    locale: str = "en"


class Sessions:
    """The session service."""

    def __init__(
        self,
        store: SessionStore,
        *,
        clock: Clock,
        policy: SessionPolicy,
        defaults: UserDefaults | None = None,
        events: ChangeEvents = no_events,
    ) -> None:
        self._store = store
        self._clock = clock
        self._policy = policy
        self._defaults = defaults or DefaultPreferences()
        self._events = events

    @property
    def policy(self) -> SessionPolicy:
        """The expiry rules in force."""
        return self._policy

    async def sign_in(
        self,
        identity: Identity,
        *,
        user_agent: str,
        event: AuditEvent | None = None,
        nonce: SingleUse | None = None,
    ) -> NewSession:
        """Create or update the user and start a brand-new session for them.

        `event` is recorded in the same transaction, with the user's and session's
        ids; the token and `nonce` are spent in it (each is accepted once). A new
        user, or a change Google reports, is written to the webhook outbox in it too.
        """
        now = self._clock.now_ms()
        secret = new_secret()
        draft = Session(
            id=new_public_id("ses"),
            user_id="",
            token_hash=hash_secret(secret),
            create_ms=now,
            last_seen_ms=now,
            expire_ms=now + self._policy.max_age_ms,
            revoke_ms=None,
            user_agent=user_agent[:MAX_USER_AGENT],
        )
        user, session = await self._store.sign_in(
            identity,
            new_user_id=new_public_id("usr"),
            defaults=self._defaults,
            session=draft,
            now_ms=now,
            event=event,
            nonce=nonce,
            events=self._events,
        )
        return NewSession(user=user, session=session, secret=secret)

    async def user_for(self, identity: Identity) -> User | None:
        """The existing user for a verified identity, if any."""
        return await self._store.find_user_by_subject(identity.issuer, identity.subject)

    async def authenticate(self, secret: str) -> Principal:
        """The principal for a (verified) cookie secret, refreshing its last-seen time.

        Raises:
            Unauthenticated: The session is unknown, revoked, idle too long or too old.
        """
        token_hash = hash_secret(secret)
        principal = await self._store.find_principal(token_hash)
        if principal is None:
            raise Unauthenticated("the session is not valid; sign in again", reason="unknown")
        now = self._clock.now_ms()
        if now >= principal.session.last_seen_ms + self._policy.idle_ms:
            # Another process may have seen the session more recently than a cache
            # here knows: look again before calling it idle.
            principal = await self._store.find_principal(token_hash, fresh=True) or principal
        session = principal.session
        if session.revoke_ms is not None:
            raise Unauthenticated("the session was signed out; sign in again", reason="revoked")
        if principal.user.disabled_ms is not None:
            raise Unauthenticated("this account has been disabled", reason="disabled")
        if now >= session.expire_ms:
            raise Unauthenticated("the session has expired; sign in again", reason="max_age")
        if now >= session.last_seen_ms + self._policy.idle_ms:
            raise Unauthenticated(
                "the session expired after inactivity; sign in again", reason="idle"
            )
        if now - session.last_seen_ms >= self._policy.touch_interval_ms:
            await self._store.touch_session(session.id, last_seen_ms=now)
            session = replace(session, last_seen_ms=now)
            principal = Principal(session=session, user=principal.user)
        return principal

    async def sign_out(self, principal: Principal) -> None:
        """Revoke the caller's own session."""
        await self._store.revoke_session(
            principal.user.id, principal.session.id, **self._live_window()
        )

    async def revoke(self, principal: Principal, session_id: str) -> None:
        """Revoke one of the caller's sessions.

        Raises:
            NotFound: Unknown, already ended, or another user's: all look the same.
        """
        if not session_id:
            raise InvalidArgument("session_id", "session_id is required")
        revoked = await self._store.revoke_session(
            principal.user.id, session_id, caller_id=principal.session.id, **self._live_window()
        )
        if not revoked:
            raise NotFound(f"no live session {session_id[:64]!r} among your sessions")

    async def revoke_others(self, principal: Principal) -> int:
        """Revoke every session of the caller but the current one."""
        return await self._store.revoke_other_sessions(
            principal.user.id, principal.session.id, **self._live_window()
        )

    def _live_window(self) -> LiveWindow:
        """What "live" means now, for the store: `now_ms` and `idle_cutoff_ms`."""
        now = self._clock.now_ms()
        return LiveWindow(now_ms=now, idle_cutoff_ms=now - self._policy.idle_ms)

    async def list_live(
        self, principal: Principal, *, page_size: int, after: SessionCursor | None
    ) -> tuple[list[Session], SessionCursor | None]:
        """One page of the caller's live sessions, newest first, and the next cursor."""
        size = paging.page_size(page_size)
        rows = await self._store.list_live_sessions(
            principal.user.id, after=after, limit=size + 1, **self._live_window()
        )
        page, last = paging.split_page(rows, size)
        if last is None:
            return page, None
        return page, SessionCursor(create_ms=last.create_ms, session_id=last.id)
