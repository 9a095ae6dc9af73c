"""GetCurrentUser and UpdateCurrentUser on the real server."""

from __future__ import annotations

import secrets

import pytest
from connectrpc.errors import ConnectError
from protobuf.wkt.google.protobuf.field_mask_pb import FieldMask

from gen.expense.user.v1.user_pb import GetCurrentUserRequest, UpdateCurrentUserRequest, User
from tests.support.client import Session, code_of
from tests.support.google import FakeGoogle
from tests.support.server import RunningServer


@pytest.fixture
def me(server: RunningServer, google: FakeGoogle) -> Session:
    client = Session(server.url)
    client.sign_in(google.token(sub=secrets.token_hex(8), locale="fr"))
    return client


def update(me: Session, paths: list[str], **fields: str) -> User:
    user = User()
    for name, value in fields.items():
        setattr(user, name, value)
    request = UpdateCurrentUserRequest(user=user, update_mask=FieldMask(paths=paths))
    response = me.call(me.users.update_current_user, request)
    assert response.user is not None
    return response.user


def test_update_changes_only_masked_fields(me: Session) -> None:
    before = me.call(me.users.get_current_user, GetCurrentUserRequest()).user
    assert before is not None
    assert (before.currency_code, before.time_zone, before.locale) == ("USD", "UTC", "fr")

    after = update(
        me,
        ["currency_code", "time_zone", "display_name"],
        currency_code="eur",
        time_zone="Europe/Paris",
        display_name="  Ann B.  ",
        locale="ignored-because-not-masked",
    )
    assert (after.currency_code, after.time_zone, after.display_name) == (
        "EUR",
        "Europe/Paris",
        "Ann B.",
    )
    assert after.locale == "fr"
    assert after.update_time is not None and before.update_time is not None
    assert after.update_time.to_datetime() >= before.update_time.to_datetime()
    again = me.call(me.users.get_current_user, GetCurrentUserRequest()).user
    assert again == after


@pytest.mark.parametrize(
    ("paths", "fields", "message"),
    [
        ([], {}, "update_mask must name at least one field"),
        (["email"], {"email": "x@example.com"}, "update_mask names 'email', which cannot"),
        (["id"], {"id": "usr_x"}, "update_mask names 'id'"),
        (["currency_code"], {"currency_code": "EURO"}, "user.currency_code must be an ISO 4217"),
        (["time_zone"], {"time_zone": "Mars/Olympus"}, "got 'Mars/Olympus'"),
        (["locale"], {"locale": "klingon-!!"}, "user.locale must be a BCP 47 language tag"),
        (["display_name"], {"display_name": "   "}, "user.display_name must not be empty"),
        (["display_name"], {"display_name": "x" * 101}, "at most 100 characters, got 101"),
        (["display_name"], {"display_name": "a\nb"}, "must not contain control characters"),
    ],
)
def test_update_rejects_bad_input_with_a_helpful_message(
    me: Session, paths: list[str], fields: dict[str, str], message: str
) -> None:
    with pytest.raises(ConnectError) as err:
        update(me, paths, **fields)
    assert code_of(err.value) == "invalid_argument"
    assert message in err.value.message
