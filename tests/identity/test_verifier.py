"""IdTokenVerifier over HttpCerts against a local Google key server.

The tokens are real RS256 JWTs and the certs come over HTTP, so google-auth's real
verification path runs. Only the clock of the certs cache is fake: google-auth checks
`exp`/`iat` against the wall clock, so the time claims below are relative to it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import google.auth.jwt
import pytest

from server.domain.errors import (
    InvalidArgument,
    InvalidIdToken,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from server.domain.models import Identity
from server.identity.certs import HttpCerts
from server.identity.verifier import IdTokenVerifier
from tests.support.clock import ManualClock
from tests.support.google import CLIENT_ID, FakeGoogle

ISSUERS = ("https://accounts.google.com", "accounts.google.com")
CANONICAL = "https://accounts.google.com"
SKEW_S = 30
MAX_AGE_S = 3600  # FakeGoogle's Cache-Control max-age
REFETCH_GAP_S = 30  # HttpCerts refetches for an unknown key id at most this often


@dataclass
class Harness:
    fake: FakeGoogle
    clock: ManualClock
    verifier: IdTokenVerifier
    fetches_before: int

    def verify(self, token: str) -> Identity:
        return asyncio.run(self.verifier.verify(token))

    @property
    def fetches(self) -> int:
        """Cert fetches that reached the key server since this harness was made."""
        return self.fake.fetches - self.fetches_before


def make_harness(fake: FakeGoogle, *, require_verified_email: bool = True) -> Harness:
    # The tokens' times are real (google-auth checks exp and iat on the real clock).
    clock = ManualClock(time.time_ns() // 1_000_000)
    certs = HttpCerts(fake.certs_url, clock=clock)  # one cache for both spellings, as in prod
    verifier = IdTokenVerifier(
        audiences=[CLIENT_ID],
        issuers=dict.fromkeys(ISSUERS, certs),
        clock_skew_s=SKEW_S,
        require_verified_email=require_verified_email,
        clock=clock,
    )
    return Harness(fake=fake, clock=clock, verifier=verifier, fetches_before=fake.fetches)


@pytest.fixture(scope="module")
def key_server() -> Iterator[FakeGoogle]:
    """A key server of this module's own: these tests rotate keys and cause outages."""
    server = FakeGoogle().start()
    yield server
    server.stop()


@pytest.fixture
def fake(key_server: FakeGoogle) -> Iterator[FakeGoogle]:
    """The module's key server, put back to its first key after each test."""
    first = key_server.current
    yield key_server
    key_server.current = first
    key_server.state.published.clear()
    key_server.state.published[first.kid] = first.cert
    key_server.state.down = False


@pytest.fixture
def h(fake: FakeGoogle) -> Harness:
    return make_harness(fake)


def now_s() -> int:
    return int(time.time())


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_jwt(header: object, claims: object) -> str:
    """A JWT-shaped string with arbitrary JSON parts and a meaningless signature."""
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}.c2ln"


def with_kid(fake: FakeGoogle, kid: object, **claims: object) -> str:
    """A token signed with the current key but naming key id `kid` (None: no `kid` at
    all; google-auth's encoder would put in the signer's own)."""
    header: dict[str, object] = {"alg": "RS256", "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    signed = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(fake.claims(**claims)).encode())}"
    return f"{signed}.{b64(fake.current.signer.sign(signed.encode()))}"


def forged_signature(fake: FakeGoogle) -> str:
    """Signed by an unpublished key, but naming the published key's id."""
    published_kid = fake.current.kid
    fake.rotate(publish=False)
    return with_kid(fake, published_kid)


def signed_by_the_other_published_key(fake: FakeGoogle) -> str:
    """Names a published key but is signed by another key that is published too."""
    named = fake.current.kid
    fake.rotate()
    return with_kid(fake, named)


def unpublished_key_without_kid(fake: FakeGoogle) -> str:
    """Names no key (so every published key is tried) and is signed by none of them."""
    fake.rotate(publish=False)
    return with_kid(fake, None)


def unpublished_key(fake: FakeGoogle) -> str:
    fake.rotate(publish=False)
    return fake.token()


def respell_last_char(token: str) -> str:
    """The same signature bytes, spelled with unused low bits set in the last character.

    A 256-byte signature is 342 characters whose last one carries 4 bits; the
    other 2 bits are free, so 3 other characters decode to the same bytes.
    """
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    head, last = token[:-1], token[-1]
    twin = alphabet[alphabet.index(last) | 0b01]
    assert twin != last and base64.urlsafe_b64decode(
        token.split(".")[2] + "=="
    ) == base64.urlsafe_b64decode((head + twin).split(".")[2] + "==")
    return head + twin


def standard_alphabet(token: str) -> str:
    """`-` and `_` spelled `+` and `/`, which lenient decoders map to the same bytes."""
    signature = token.split(".")[2]
    assert "-" in signature or "_" in signature  # 342 characters: all but certain
    return token.replace("-", "+").replace("_", "/")


def deeply_nested_header(fake: FakeGoogle) -> str:
    depth = 1500  # deeper than the interpreter's recursion limit, within the length limit
    return f"{b64(b'[' * depth + b']' * depth)}.{b64(b'{}')}.c2ln"


# ---------------------------------------------------------------------------
# Accepted tokens


@pytest.mark.parametrize("issuer", ISSUERS)
def test_a_valid_token_gives_the_identity_with_the_canonical_issuer(
    h: Harness, issuer: str
) -> None:
    token = h.fake.token(iss=issuer, nonce="n-123")
    identity = h.verify(token)

    assert identity == Identity(
        issuer=CANONICAL,
        subject="110169484474386276334",
        email="ann@example.com",
        email_verified=True,
        name="Ann Example",
        picture="https://lh3.googleusercontent.com/a/photo",
        locale="en-GB",
        nonce="n-123",
        # Keyed on the decoded signature: one token, whatever its spelling.
        token_hash=hashlib.sha256(
            issuer.encode() + b"\n" + base64.urlsafe_b64decode(token.split(".")[2] + "==")
        ).digest(),
        token_expire_ms=(google.auth.jwt.decode(token, verify=False)["exp"] + SKEW_S) * 1000,
        issued_ms=google.auth.jwt.decode(token, verify=False)["iat"] * 1000,
    )


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param(
            lambda: {"iat": now_s() - 7200, "exp": now_s() - SKEW_S + 10}, id="exp_in_skew"
        ),
        pytest.param(lambda: {"iat": now_s() + SKEW_S - 10}, id="iat_in_skew"),
        pytest.param(lambda: {"email_verified": "true"}, id="email_verified_as_string"),
        pytest.param(lambda: {"locale": "not a locale!"}, id="bad_locale_dropped"),
        pytest.param(lambda: {"nbf": now_s() - 60}, id="nbf_in_the_past"),
        pytest.param(lambda: {"nbf": now_s() + SKEW_S - 10}, id="nbf_in_skew"),
    ],
)
def test_tolerated_variations_are_accepted(
    h: Harness, claims: Callable[[], dict[str, object]]
) -> None:
    identity = h.verify(h.fake.token(**claims()))

    assert identity.subject == "110169484474386276334"
    assert identity.email_verified


def test_a_token_without_a_key_id_is_checked_against_every_published_key(h: Harness) -> None:
    h.fake.rotate()  # two published keys; the token is signed by the second
    token = with_kid(h.fake, None)

    assert "kid" not in google.auth.jwt.decode_header(token)
    assert h.verify(token).subject == "110169484474386276334"


# ---------------------------------------------------------------------------
# Rejected tokens: always InvalidIdToken, never another exception type


REJECTED = [
    pytest.param(
        lambda g: g.token(aud="999-other.apps.googleusercontent.com"),
        "bad_audience",
        "another application",
        id="wrong_audience",
    ),
    pytest.param(
        lambda g: g.token(aud=["999-other.apps.googleusercontent.com", "x"]),
        "bad_audience",
        "another application",
        id="audience_list",
    ),
    pytest.param(
        lambda g: g.token(iss="https://evil.example.com"),
        "bad_issuer",
        "'https://evil.example.com'",
        id="wrong_issuer",
    ),
    pytest.param(
        lambda g: g.token(iss="http://accounts.google.com"),
        "bad_issuer",
        "'http://accounts.google.com'",
        id="issuer_over_http",
    ),
    pytest.param(lambda g: g.token(iss=None), "bad_issuer", "issuer", id="missing_issuer"),
    pytest.param(
        lambda g: g.token(iat=now_s() - 7200, exp=now_s() - SKEW_S - 600),
        "expired",
        "expired",
        id="expired",
    ),
    pytest.param(
        lambda g: g.token(iat=now_s() + SKEW_S + 600, exp=now_s() + 7200),
        "not_yet_valid",
        "not valid yet",
        id="issued_in_the_future",
    ),
    pytest.param(lambda g: g.token(exp=None), "missing_claim", "claim", id="missing_exp"),
    pytest.param(lambda g: g.token(iat=None), "missing_claim", "claim", id="missing_iat"),
    pytest.param(lambda g: g.token(aud=None), "bad_audience", "audience", id="missing_audience"),
    pytest.param(
        lambda g: g.token(exp="soon"), "bad_claim", "exp claim is not a valid time", id="exp_text"
    ),
    pytest.param(
        lambda g: g.token(exp=10**30), "bad_claim", "exp claim is not a valid time", id="exp_huge"
    ),
    pytest.param(
        lambda g: g.token(iat=-(10**30)), "bad_claim", "iat claim", id="iat_hugely_negative"
    ),
    pytest.param(lambda g: g.token(exp=True), "bad_claim", "exp claim", id="exp_boolean"),
    pytest.param(lambda g: g.token(nbf=10**20), "bad_claim", "nbf claim", id="nbf_huge"),
    pytest.param(
        lambda g: g.token(nbf=now_s() + SKEW_S + 600),
        "not_yet_valid",
        "nbf is in the future",
        id="nbf_in_the_future",
    ),
    pytest.param(forged_signature, "bad_signature", "signature", id="bad_signature"),
    pytest.param(unpublished_key, "unknown_key", "unknown key", id="unknown_key_id"),
    pytest.param(
        signed_by_the_other_published_key,
        "bad_signature",
        "signature",
        id="another_published_key",
    ),
    pytest.param(
        unpublished_key_without_kid, "bad_signature", "signature", id="no_kid_no_key_signed"
    ),
    pytest.param(lambda g: with_kid(g, 7), "unknown_key", "unknown key", id="kid_not_a_string"),
    pytest.param(lambda g: g.unsigned_token(), "bad_alg", "'none'", id="alg_none"),
    pytest.param(
        lambda g: g.token_with_header({"alg": "HS256"}), "bad_alg", "'HS256'", id="alg_hs256"
    ),
    pytest.param(lambda g: raw_jwt({"typ": "JWT"}, g.claims()), "bad_alg", "RS256", id="no_alg"),
    pytest.param(
        lambda g: raw_jwt({"alg": ["RS256"], "kid": g.current.kid}, g.claims()),
        "bad_alg",
        "RS256",
        id="alg_is_a_list",
    ),
    pytest.param(lambda g: g.token(sub=None), "bad_subject", "subject", id="missing_sub"),
    pytest.param(lambda g: g.token(sub=""), "bad_subject", "subject", id="empty_sub"),
    pytest.param(lambda g: g.token(sub=12345), "bad_subject", "subject", id="numeric_sub"),
    pytest.param(lambda g: "not-a-jwt", "malformed", "well-formed", id="garbage"),
    pytest.param(lambda g: "a.b.c", "malformed", "well-formed", id="three_garbage_parts"),
    pytest.param(lambda g: "é.é.é", "malformed", "well-formed", id="non_ascii"),
    pytest.param(lambda g: g.token() + ".extra", "malformed", "well-formed", id="four_segments"),
    pytest.param(
        lambda g: raw_jwt({"alg": "RS256"}, [1, 2]), "malformed", "well-formed", id="claims_array"
    ),
    pytest.param(
        lambda g: raw_jwt(["RS256"], g.claims()), "malformed", "well-formed", id="header_array"
    ),
    pytest.param(deeply_nested_header, "malformed", "well-formed", id="deeply_nested_header"),
    pytest.param(lambda g: g.token() + "==", "malformed", "base64url", id="padded_signature"),
    pytest.param(
        lambda g: respell_last_char(g.token()), "malformed", "base64url", id="respelled_signature"
    ),
    pytest.param(
        lambda g: standard_alphabet(g.token()), "malformed", "base64url", id="plus_slash_alphabet"
    ),
]


@pytest.mark.parametrize(("make", "reason", "says"), REJECTED)
def test_bad_tokens_are_invalid_id_tokens(
    h: Harness, make: Callable[[FakeGoogle], str], reason: str, says: str
) -> None:
    token = make(h.fake)

    with pytest.raises(InvalidIdToken) as caught:
        h.verify(token)

    error = caught.value
    assert isinstance(error, Unauthenticated)
    assert error.reason == reason
    assert says in error.message
    # google-auth's own texts ("Token expired, 123 < 456", "Could not verify ...") quote
    # internals; the client gets our sentence instead.
    assert "Token" not in error.message and "Could not" not in error.message


def test_a_valid_signature_is_required_even_for_a_well_formed_token(h: Harness) -> None:
    header, claims, _ = h.fake.token().split(".")
    other_signature = h.fake.token(sub="someone-else").split(".")[2]

    with pytest.raises(InvalidIdToken) as caught:
        h.verify(f"{header}.{claims}.{other_signature}")

    assert caught.value.reason == "bad_signature"


@pytest.mark.parametrize("token", ["", "   ", "\n"])
def test_an_empty_token_is_an_invalid_argument(h: Harness, token: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        h.verify(token)

    assert caught.value.field == "google_id_token"
    assert "required" in caught.value.message
    assert not isinstance(caught.value, Unauthenticated)


def test_an_oversized_token_is_an_invalid_argument_quoting_its_length(h: Harness) -> None:
    with pytest.raises(InvalidArgument) as caught:
        h.verify("a" * 9000)

    assert caught.value.field == "google_id_token"
    assert "9000" in caught.value.message


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param({"email_verified": False}, id="unverified"),
        pytest.param({"email_verified": None}, id="email_verified_missing"),
        pytest.param({"email_verified": "false"}, id="unverified_as_string"),
        pytest.param({"email": None}, id="no_email"),
    ],
)
def test_an_unverified_email_is_permission_denied(h: Harness, claims: dict[str, object]) -> None:
    with pytest.raises(PermissionDenied) as caught:
        h.verify(h.fake.token(**claims))

    assert "not verified" in caught.value.message


def test_an_unverified_email_passes_when_not_required(fake: FakeGoogle) -> None:
    lax = make_harness(fake, require_verified_email=False)

    identity = lax.verify(fake.token(email_verified=False))

    assert identity.email == "ann@example.com"
    assert not identity.email_verified


# ---------------------------------------------------------------------------
# The certs cache


def test_certs_are_fetched_once_for_many_verifications(h: Harness) -> None:
    for i in range(50):
        h.verify(h.fake.token(sub=f"user-{i}", iss=ISSUERS[i % 2]))
        h.clock.advance(1)

    assert h.fetches == 1


def test_certs_are_fetched_again_after_their_max_age(h: Harness) -> None:
    token = h.fake.token()
    h.verify(token)
    h.clock.advance(MAX_AGE_S - 1)
    h.verify(token)
    assert h.fetches == 1

    h.clock.advance(1)
    h.verify(token)
    h.verify(token)

    assert h.fetches == 2


def test_a_wall_clock_step_does_not_age_the_certs(h: Harness) -> None:
    """Cache ages run on the monotonic clock: an NTP step neither expires the keys
    nor keeps them past their max-age."""
    h.verify(h.fake.token(sub="a"))
    h.clock.step_wall(2 * MAX_AGE_S)  # the wall clock jumps forward
    h.verify(h.fake.token(sub="b"))
    assert h.fetches == 1
    h.clock.step_wall(-10 * MAX_AGE_S)  # and far back
    h.clock.advance(MAX_AGE_S)  # while time really passes
    h.verify(h.fake.token(sub="c"))
    assert h.fetches == 2


def test_unknown_key_ids_refetch_once_then_are_rate_limited(h: Harness) -> None:
    h.verify(h.fake.token())
    h.clock.advance(REFETCH_GAP_S + 1)  # still fresh, but a refetch is allowed again

    for _ in range(60):
        with pytest.raises(InvalidIdToken) as caught:
            h.verify(with_kid(h.fake, secrets.token_hex(20)))
        assert caught.value.reason == "unknown_key"
        h.clock.advance(0.4)  # 24 s in all, inside one refetch interval
    assert h.fetches == 2

    h.clock.advance(REFETCH_GAP_S)
    with pytest.raises(InvalidIdToken):
        h.verify(with_kid(h.fake, secrets.token_hex(20)))
    assert h.fetches == 3


def test_unknown_key_ids_do_not_refetch_right_after_a_fetch(h: Harness) -> None:
    h.verify(h.fake.token())

    for _ in range(20):
        with pytest.raises(InvalidIdToken):
            h.verify(with_kid(h.fake, secrets.token_hex(20)))
        h.clock.advance(1)

    assert h.fetches == 1


def test_a_rotated_key_is_picked_up_through_the_unknown_key_refetch(h: Harness) -> None:
    old_token = h.fake.token()
    h.verify(old_token)
    h.fake.rotate(publish=False)
    new_token = h.fake.token(sub="after-rotation")

    with pytest.raises(InvalidIdToken) as caught:
        h.verify(new_token)
    assert caught.value.reason == "unknown_key"

    h.fake.publish_current()
    h.clock.advance(REFETCH_GAP_S + 1)  # well inside max-age: only the unknown kid refetches

    assert h.verify(new_token).subject == "after-rotation"
    assert h.verify(old_token).subject == "110169484474386276334"
    assert h.fetches == 2


def test_certs_down_with_nothing_cached_is_unavailable(h: Harness) -> None:
    token = h.fake.token()

    with h.fake.outage():
        with pytest.raises(Unavailable) as caught:
            h.verify(token)
        for _ in range(20):  # an outage does not queue every sign-in behind a fetch
            with pytest.raises(Unavailable):
                h.verify(token)
        assert h.fetches == 1

    assert not isinstance(caught.value, Unauthenticated)
    assert "try again" in caught.value.message
    h.clock.advance(1.001)  # the retry back-off
    assert h.verify(token).subject == "110169484474386276334"  # and it recovers


def test_certs_down_after_a_fetch_keeps_the_cached_keys_working(h: Harness) -> None:
    token = h.fake.token()
    h.verify(token)

    with h.fake.outage():
        assert h.verify(token).subject == "110169484474386276334"
        h.clock.advance(MAX_AGE_S + 60)
        fetches_before = h.fetches
        assert h.verify(token).subject == "110169484474386276334"
        assert h.fetches == fetches_before + 1  # the refresh was tried, and failed

    h.verify(token)  # the endpoint is back: the stale cache is refreshed...
    fetches_after_recovery = h.fetches
    h.verify(token)  # ...and fresh again
    assert h.fetches == fetches_after_recovery


# ---------------------------------------------------------------------------
# Claims copied into the account follow the profile rules


@pytest.mark.parametrize(
    ("name", "stored"),
    [
        ("Ann Example", "Ann Example"),
        ("abc\u202egnp.exe", "abcgnp.exe"),  # a right-to-left override hides the extension
        ("  Ann\u200b  ", "Ann"),  # zero-width space (a format character) and spaces
        ("line\nbreak", "linebreak"),
        ("\u202e\u200b", ""),  # nothing left: no name
        ("x" * 150, "x" * 100),
        (12345, ""),
    ],
)
def test_the_name_claim_follows_the_display_name_rules(
    h: Harness, name: object, stored: str
) -> None:
    assert h.verify(h.fake.token(name=name)).name == stored


@pytest.mark.parametrize(
    ("picture", "stored"),
    [
        ("https://lh3.googleusercontent.com/a/photo", "https://lh3.googleusercontent.com/a/photo"),
        ("javascript:alert(1)", ""),
        ("http://lh3.googleusercontent.com/a/photo", ""),
        ("data:image/png;base64,AAAA", ""),
        ("https:///no-host", ""),
        ("https://example.com/a b", ""),
        ("https://example.com/\u0000", ""),
        ("https://example.com/" + "a" * 2100, ""),
        (["https://example.com"], ""),
    ],
)
def test_only_https_picture_urls_are_kept(h: Harness, picture: object, stored: str) -> None:
    assert h.verify(h.fake.token(picture=picture)).picture == stored
