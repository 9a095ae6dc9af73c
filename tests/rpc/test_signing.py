"""Session secrets, their signed cookie form and their stored hash."""

from __future__ import annotations

import hashlib
import hmac
import re
import string

import pytest
from itsdangerous import Signer

from server.domain.tokens import hash_secret, new_public_id, new_secret
from server.rpc.signing import MAX_COOKIE_VALUE, SESSION_SALT, CookieSigner

KEY_A = "key-a-0123456789abcdef0123456789abcdef"
KEY_B = "key-b-fedcba9876543210fedcba9876543210"
URLSAFE = re.compile(r"^[A-Za-z0-9_-]+$")


def replace_at(value: str, index: int) -> str:
    """`value` with one character changed to a different one of the same alphabet."""
    old = value[index]
    new = "A" if old != "A" else "B"
    return value[:index] + new + value[index + 1 :]


def test_sign_then_unsign_gives_the_secret_back() -> None:
    signer = CookieSigner([KEY_A])
    secret = new_secret()

    value = signer.sign(secret)

    assert value.startswith(secret + ".")
    assert signer.unsign(value) == secret


def test_signing_is_deterministic_and_keyed() -> None:
    secret = new_secret()

    assert CookieSigner([KEY_A]).sign(secret) == CookieSigner([KEY_A]).sign(secret)
    assert CookieSigner([KEY_A]).sign(secret) != CookieSigner([KEY_B]).sign(secret)


def _tampered() -> list[tuple[str, str]]:
    signer = CookieSigner([KEY_A])
    secret = new_secret()
    value = signer.sign(secret)
    signature = value.split(".", 1)[1]
    other = signer.sign(new_secret())
    return [
        ("secret_first_char", replace_at(value, 0)),
        ("secret_middle_char", replace_at(value, len(secret) // 2)),
        ("secret_last_char", replace_at(value, len(secret) - 1)),
        ("signature_first_char", replace_at(value, len(secret) + 1)),
        ("signature_middle_char", replace_at(value, len(secret) + 1 + len(signature) // 2)),
        ("signature_dropped", secret),
        ("signature_empty", secret + "."),
        ("secret_empty", "." + signature),
        ("other_cookies_signature", secret + "." + other.split(".", 1)[1]),
        ("secret_extended", secret + "x." + signature),
        ("extra_segment", value + ".x"),
        ("upper_cased", value.upper()),
        ("non_ascii", value[:-1] + "é"),
        (
            "salt_of_another_purpose",
            Signer(KEY_A, salt="other", digest_method=hashlib.sha256).sign(secret).decode(),
        ),
        ("sha1_signature", Signer(KEY_A, salt=SESSION_SALT).sign(secret).decode()),
    ]


TAMPERED = _tampered()


@pytest.mark.parametrize(("case", "value"), TAMPERED, ids=[case for case, _ in TAMPERED])
def test_a_tampered_value_is_rejected(case: str, value: str) -> None:
    assert CookieSigner([KEY_A]).unsign(value) is None


def test_a_value_signed_with_the_old_key_verifies_after_a_new_key_is_added() -> None:
    secret = new_secret()
    old_cookie = CookieSigner([KEY_A]).sign(secret)

    assert CookieSigner([KEY_A, KEY_B]).unsign(old_cookie) == secret


def test_the_newest_key_signs() -> None:
    secret = new_secret()

    signed = CookieSigner([KEY_A, KEY_B]).sign(secret)

    assert signed == CookieSigner([KEY_B]).sign(secret)
    assert CookieSigner([KEY_A]).unsign(signed) is None
    assert CookieSigner([KEY_B]).unsign(signed) == secret


def test_a_retired_key_no_longer_verifies() -> None:
    old_cookie = CookieSigner([KEY_A]).sign(new_secret())

    assert CookieSigner([KEY_B]).unsign(old_cookie) is None


def test_at_least_one_key_is_required() -> None:
    with pytest.raises(ValueError, match="at least one"):
        CookieSigner([])


@pytest.mark.parametrize("value", ["", "x" * (MAX_COOKIE_VALUE + 1), "." * 10_000])
def test_empty_and_oversized_values_are_rejected(value: str) -> None:
    assert CookieSigner([KEY_A]).unsign(value) is None


def test_an_oversized_value_is_rejected_even_when_validly_signed() -> None:
    signer = CookieSigner([KEY_A])
    at_limit = signer.sign("x" * (MAX_COOKIE_VALUE - 44))
    over_limit = signer.sign("x" * (MAX_COOKIE_VALUE - 43))

    assert len(at_limit) == MAX_COOKIE_VALUE
    assert signer.unsign(at_limit) == "x" * (MAX_COOKIE_VALUE - 44)
    assert signer.unsign(over_limit) is None


def test_a_fresh_secret_signs_well_under_the_limit() -> None:
    assert len(CookieSigner([KEY_A]).sign(new_secret())) < MAX_COOKIE_VALUE // 2


def test_hash_secret_is_sha256_of_the_secret() -> None:
    secret = new_secret()

    digest = hash_secret(secret)

    assert digest == hashlib.sha256(secret.encode()).digest()
    assert len(digest) == 32
    assert hmac.compare_digest(digest, hash_secret(secret))
    assert hash_secret(new_secret()) != digest


def test_the_secret_never_appears_in_its_hash() -> None:
    secret = new_secret()

    digest = hash_secret(secret)

    assert secret.encode() not in digest
    assert secret not in digest.hex()
    assert secret[:8].encode() not in digest


def test_secrets_are_256_bit_urlsafe_and_unique() -> None:
    secrets_made = {new_secret() for _ in range(200)}

    assert len(secrets_made) == 200
    for secret in secrets_made:
        assert len(secret) == 43  # 32 bytes, base64url without padding
        assert URLSAFE.match(secret)


def test_public_ids_carry_their_prefix_and_128_random_bits() -> None:
    ids = {new_public_id("ses") for _ in range(200)}

    assert len(ids) == 200
    for public_id in ids:
        prefix, _, rest = public_id.partition("_")
        assert prefix == "ses"
        assert len(rest) == 22  # 16 bytes, base64url without padding
        assert set(rest) <= set(string.ascii_letters + string.digits + "-_")
