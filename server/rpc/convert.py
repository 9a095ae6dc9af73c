"""Domain records to protobuf messages."""

from __future__ import annotations

from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from gen.expense.auth.v1 import auth_pb
from gen.expense.user.v1 import user_pb
from server.domain import audit, models
from server.domain.sessions import SessionPolicy


def timestamp(ms: int) -> Timestamp:
    """A Timestamp from epoch milliseconds."""
    seconds, rest = divmod(ms, 1000)
    return Timestamp(seconds=seconds, nanos=rest * 1_000_000)


def user(u: models.User) -> user_pb.User:
    """The public view of a user (issuer and subject stay private)."""
    return user_pb.User(
        id=u.id,
        email=u.email,
        email_verified=u.email_verified,
        display_name=u.display_name,
        picture_uri=u.picture_uri,
        currency_code=u.currency_code,
        time_zone=u.time_zone,
        locale=u.locale,
        create_time=timestamp(u.create_ms),
        update_time=timestamp(u.update_ms),
    )


def session(s: models.Session, *, policy: SessionPolicy, current_id: str) -> auth_pb.Session:
    """The public view of a session (never its secret or hash)."""
    return auth_pb.Session(
        id=s.id,
        create_time=timestamp(s.create_ms),
        last_seen_time=timestamp(s.last_seen_ms),
        expire_time=timestamp(policy.expire_ms(s)),
        user_agent=s.user_agent,
        current=s.id == current_id,
    )


_EVENT_KINDS = {
    audit.SIGN_IN: user_pb.SecurityEvent.Kind.SIGN_IN,
    audit.SIGN_IN_FAILED: user_pb.SecurityEvent.Kind.SIGN_IN_FAILED,
    audit.SIGN_OUT: user_pb.SecurityEvent.Kind.SIGN_OUT,
    audit.SESSION_REVOKED: user_pb.SecurityEvent.Kind.SESSION_REVOKED,
    audit.RATE_LIMITED: user_pb.SecurityEvent.Kind.RATE_LIMITED,
    audit.DATA_EXPORTED: user_pb.SecurityEvent.Kind.DATA_EXPORTED,
    audit.ACCOUNT_DISABLED: user_pb.SecurityEvent.Kind.ACCOUNT_DISABLED,
    audit.ACCOUNT_ENABLED: user_pb.SecurityEvent.Kind.ACCOUNT_ENABLED,
}


def security_event(e: models.AuditEvent) -> user_pb.SecurityEvent:
    """An audit event as the user sees it."""
    return user_pb.SecurityEvent(
        kind=_EVENT_KINDS.get(e.kind, user_pb.SecurityEvent.Kind.UNSPECIFIED),
        time=timestamp(e.time_ms),
        reason=e.reason,
        session_id=e.session_id,
        user_agent=e.user_agent,
        ip_address=e.ip,
    )


def session_record(s: models.Session) -> user_pb.SessionRecord:
    """A stored session, live or ended, for an export."""
    return user_pb.SessionRecord(
        id=s.id,
        create_time=timestamp(s.create_ms),
        last_seen_time=timestamp(s.last_seen_ms),
        max_expire_time=timestamp(s.expire_ms),
        revoke_time=None if s.revoke_ms is None else timestamp(s.revoke_ms),
        user_agent=s.user_agent,
    )


def export(e: models.UserExport, *, now_ms: int) -> user_pb.ExportCurrentUserDataResponse:
    """Everything stored about a user."""
    return user_pb.ExportCurrentUserDataResponse(
        export_time=timestamp(now_ms),
        user=user(e.user),
        linked_account=user_pb.LinkedAccount(issuer=e.user.issuer, subject=e.user.subject),
        sessions=[session_record(s) for s in e.sessions],
        security_events=[security_event(ev) for ev in e.events],
    )
