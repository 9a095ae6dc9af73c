"""Domain records to protobuf messages."""

from __future__ import annotations

from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from gen.expense.auth.v1 import auth_pb
from gen.expense.user.v1 import user_pb
from server.domain import models
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
