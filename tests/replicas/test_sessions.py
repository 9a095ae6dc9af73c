"""A session ended on one replica is refused by the other at its very next request.

Each way a session ends (revoked from another device, signed out, its account
disabled by an administrator, its account deleted) is acknowledged by replica B;
the next request with that session's cookie goes to replica A, which has just
answered it a few times (so a cache of principals there would be warm), and must
be refused as `unauthenticated` at once: no waiting, no retry.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from connectrpc.errors import ConnectError

from gen.expense.admin.v1.admin_connect import AdminServiceClientSync
from gen.expense.admin.v1.admin_pb import DisableUserRequest
from gen.expense.auth.v1.auth_pb import GetSessionRequest, RevokeSessionRequest, SignOutRequest
from gen.expense.user.v1.user_pb import DeleteCurrentUserRequest, GetCurrentUserRequest
from tests.replicas.cluster import ADMIN_HEADERS
from tests.replicas.conftest import Pair
from tests.support.client import Session, code_of
from tests.support.google import FakeGoogle

ROUNDS = 5
WARM_CALLS = 3


@dataclass
class Account:
    """A new Google account: the session under test, used on both replicas, and a
    second device signed in on B."""

    sub: str
    user_id: str
    session_id: str
    on_a: Session  # the browser's cookie, as sent to replica A
    on_b: Session  # the same cookie, as sent to replica B
    other_on_b: Session  # another device of the account, on B
    opened: list[Session] = field(default_factory=list)

    def token(self, google: FakeGoogle) -> str:
        """A fresh ID token for the account (a re-authentication)."""
        return google.token(sub=self.sub, email=f"{self.sub}@example.com")

    def close(self) -> None:
        """Close every client."""
        for client in self.opened:
            client.close()


def new_account(pair: Pair, google: FakeGoogle) -> Account:
    """Signed in on A; the same cookie copied to a client of B; a second device on B."""
    sub = secrets.token_hex(8)
    on_a, on_b, other = Session(pair.a.url), Session(pair.b.url), Session(pair.b.url)
    signed = on_a.sign_in(google.token(sub=sub, email=f"{sub}@example.com"))
    other.sign_in(google.token(sub=sub, email=f"{sub}@example.com"))
    on_b.cookie = on_a.cookie
    assert signed.user is not None and signed.session is not None
    return Account(sub, signed.user.id, signed.session.id, on_a, on_b, other, [on_a, on_b, other])


def revoke_from_another_device(account: Account, google: FakeGoogle, admin_b: object) -> None:
    """The second device revokes the session on B (RevokeSession of another session)."""
    other = account.other_on_b
    other.call(other.auth.revoke_session, RevokeSessionRequest(session_id=account.session_id))


def sign_out(account: Account, google: FakeGoogle, admin_b: object) -> None:
    """The browser signs out, through B."""
    account.on_b.call(account.on_b.auth.sign_out, SignOutRequest())


def disable_by_admin(account: Account, google: FakeGoogle, admin_b: AdminServiceClientSync) -> None:
    """An administrator disables the account on B's admin listener."""
    admin_b.disable_user(DisableUserRequest(user_id=account.user_id), headers=ADMIN_HEADERS)


def delete_account(account: Account, google: FakeGoogle, admin_b: object) -> None:
    """The user deletes the account through B, after re-authenticating with Google."""
    on_b = account.on_b
    on_b.call(
        on_b.users.delete_current_user,
        DeleteCurrentUserRequest(google_id_token=account.token(google)),
    )


ENDINGS: list[Callable[[Account, FakeGoogle, AdminServiceClientSync], None]] = [
    revoke_from_another_device,
    sign_out,
    disable_by_admin,
    delete_account,
]


@pytest.fixture(scope="module")
def admin_b(pair: Pair) -> Iterator[AdminServiceClientSync]:
    """The generated admin client, on replica B's admin listener."""
    client = AdminServiceClientSync(pair.b.admin_url)
    yield client
    client.close()


@pytest.mark.parametrize("end", ENDINGS, ids=lambda f: f.__name__)
def test_a_session_ended_on_b_is_refused_by_a_at_the_next_request(
    pair: Pair,
    google: FakeGoogle,
    admin_b: AdminServiceClientSync,
    end: Callable[[Account, FakeGoogle, AdminServiceClientSync], None],
) -> None:
    for _ in range(ROUNDS):
        account = new_account(pair, google)
        try:
            for _ in range(WARM_CALLS):
                session = account.on_a.call(account.on_a.auth.get_session, GetSessionRequest())
                assert session.session is not None
                assert session.session.id == account.session_id
            user = account.on_a.call(account.on_a.users.get_current_user, GetCurrentUserRequest())
            assert user.user is not None and user.user.id == account.user_id
            # B's answer is the acknowledgement: it returned without an error.
            end(account, google, admin_b)

            with pytest.raises(ConnectError) as refused:
                account.on_a.call(account.on_a.auth.get_session, GetSessionRequest())
            assert code_of(refused.value) == "unauthenticated", refused.value.message
            with pytest.raises(ConnectError) as refused_again:
                account.on_a.call(account.on_a.users.get_current_user, GetCurrentUserRequest())
            assert code_of(refused_again.value) == "unauthenticated"
        finally:
            account.close()
