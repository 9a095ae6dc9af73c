"""Validation and normalisation of the user's editable fields."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from server.domain.errors import InvalidArgument
from server.domain.preferences import (
    clean_changes,
    clean_currency_code,
    clean_display_name,
    clean_locale,
    clean_time_zone,
)

Cleaner = Callable[..., str]

# RFC 5646 language tags as this service stores them: language[-Script][-REGION][-variant]*.
BCP47 = re.compile(
    r"^[a-z]{2,8}(-[A-Z][a-z]{3})?(-([A-Z]{2}|\d{3}))?(-([a-zA-Z\d]{5,8}|\d[a-zA-Z\d]{3}))*$"
)

GOOD = [
    (clean_display_name, "Ann", "Ann"),
    (clean_display_name, "  Ann Example \t", "Ann Example"),
    (clean_display_name, "Zoë Ñúñez 李", "Zoë Ñúñez 李"),
    (clean_display_name, "x" * 100, "x" * 100),
    (clean_currency_code, "EUR", "EUR"),
    (clean_currency_code, "eur", "EUR"),
    (clean_currency_code, " usd ", "USD"),
    (clean_currency_code, "jPy", "JPY"),
    (clean_time_zone, "Europe/Paris", "Europe/Paris"),
    (clean_time_zone, " America/Argentina/Buenos_Aires ", "America/Argentina/Buenos_Aires"),
    (clean_time_zone, "UTC", "UTC"),
    (clean_locale, "en-GB", "en-GB"),
    (clean_locale, "en_gb", "en-GB"),
    (clean_locale, "EN", "en"),
    (clean_locale, " fr ", "fr"),
    (clean_locale, "pt_BR", "pt-BR"),
    (clean_locale, "zh-hant-tw", "zh-Hant-TW"),
    (clean_locale, "es-419", "es-419"),
]


@pytest.mark.parametrize(
    ("clean", "value", "expected"),
    [pytest.param(c, v, e, id=f"{c.__name__}:{v!r}") for c, v, e in GOOD],
)
def test_good_values_are_normalised(clean: Cleaner, value: str, expected: str) -> None:
    assert clean(value) == expected


BAD = [
    # cleaner, field, bad value, what the message must quote
    (clean_display_name, "display_name", "", "must not be empty"),
    (clean_display_name, "display_name", "   ", "must not be empty"),
    (clean_display_name, "display_name", "x" * 101, "got 101"),
    (clean_display_name, "display_name", " " + "x" * 150 + " ", "got 150"),
    (clean_display_name, "display_name", "Ann\x00Example", "found U+0000"),
    (clean_display_name, "display_name", "Ann\u202eelpmaxE", "found U+202E"),
    (clean_currency_code, "currency_code", "EURO", "'EURO'"),
    (clean_currency_code, "currency_code", "", "''"),
    (clean_currency_code, "currency_code", "€", "'€'"),
    (clean_currency_code, "currency_code", "E U R", "'E U R'"),
    (clean_currency_code, "currency_code", "zzz", "'zzz'"),
    (clean_time_zone, "time_zone", "Mars/Olympus_Mons", "'Mars/Olympus_Mons'"),
    (clean_time_zone, "time_zone", "europe/paris", "'europe/paris'"),
    (clean_time_zone, "time_zone", "", "''"),
    (clean_time_zone, "time_zone", "../../etc/passwd", "'../../etc/passwd'"),
    (clean_time_zone, "time_zone", "+02:00", "'+02:00'"),
    # `localtime` is the host's own zone (a symlink in /usr/share/zoneinfo), not an IANA
    # name: stored, it would mean whatever the server machine is set to.
    (clean_time_zone, "time_zone", "localtime", "'localtime'"),
    (clean_locale, "locale", "english", "'english'"),
    (clean_locale, "locale", "xx", "'xx'"),
    (clean_locale, "locale", "", "''"),
    (clean_locale, "locale", "en--GB", "'en--GB'"),
    (clean_locale, "locale", "12", "'12'"),
    (clean_locale, "locale", "en-" + "a" * 40, "'en-aaaa"),
]


@pytest.mark.parametrize(
    ("clean", "field", "value", "quoted"),
    [pytest.param(c, f, v, q, id=f"{f}:{v[:20]!r}") for c, f, v, q in BAD],
)
def test_bad_values_name_the_field_and_quote_the_value(
    clean: Cleaner, field: str, value: str, quoted: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        clean(value)

    assert caught.value.field == field
    assert caught.value.message.startswith(field + " ")
    assert quoted in caught.value.message


def test_quoted_values_are_truncated() -> None:
    with pytest.raises(InvalidArgument) as caught:
        clean_currency_code("X" * 10_000)

    assert len(caught.value.message) < 200


@pytest.mark.parametrize(
    "value", ["de-DE@euro", "en_GB.UTF-8", "sr_RS@latin", "und", "root", "en-Latn-GB"]
)
def test_locales_come_out_as_bcp47_tags_or_not_at_all(value: str) -> None:
    try:
        cleaned: str | None = clean_locale(value)
    except InvalidArgument:
        cleaned = None  # refusing it is fine too
    assert cleaned is None or BCP47.match(cleaned), cleaned


def test_a_posix_script_modifier_is_not_turned_into_another_script() -> None:
    try:
        cleaned: str | None = clean_locale("sr_RS@latin")  # Serbian, Latin script, POSIX style
    except InvalidArgument:
        cleaned = None  # refusing it is fine too
    assert cleaned in (None, "sr-Latn-RS")


def test_the_error_field_can_be_a_field_path() -> None:
    with pytest.raises(InvalidArgument) as caught:
        clean_time_zone("Nowhere", field="user.time_zone")

    assert caught.value.field == "user.time_zone"
    assert caught.value.message.startswith("user.time_zone must be")


def test_changes_are_cleaned_together() -> None:
    cleaned = clean_changes(
        {
            "display_name": "  Ann ",
            "currency_code": "eur",
            "time_zone": "Europe/Paris",
            "locale": "en_gb",
        }
    )

    assert cleaned == {
        "display_name": "Ann",
        "currency_code": "EUR",
        "time_zone": "Europe/Paris",
        "locale": "en-GB",
    }


def test_no_changes_is_no_changes() -> None:
    assert clean_changes({}) == {}


@pytest.mark.parametrize(
    ("changes", "field", "quoted"),
    [
        ({"currency_code": "euro"}, "user.currency_code", "'euro'"),
        ({"display_name": "Ann", "time_zone": "Mars/Base"}, "user.time_zone", "'Mars/Base'"),
        ({"locale": "klingon"}, "user.locale", "'klingon'"),
        ({"display_name": ""}, "user.display_name", "must not be empty"),
        ({"email": "ann@example.com"}, "update_mask", "'email'"),
        ({"id": "usr_x", "locale": "en"}, "update_mask", "'id'"),
    ],
)
def test_bad_changes_name_the_field_path(changes: dict[str, str], field: str, quoted: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        clean_changes(changes)

    assert caught.value.field == field
    assert quoted in caught.value.message


def test_an_unknown_field_lists_the_fields_that_can_change() -> None:
    with pytest.raises(InvalidArgument) as caught:
        clean_changes({"email": "ann@example.com"})

    for name in ("display_name", "currency_code", "time_zone", "locale"):
        assert name in caught.value.message


def test_the_prefix_of_change_fields_can_be_chosen() -> None:
    with pytest.raises(InvalidArgument) as caught:
        clean_changes({"currency_code": "euro"}, prefix="")

    assert caught.value.field == "currency_code"
