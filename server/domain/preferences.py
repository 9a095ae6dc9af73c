"""Validation of a user's editable fields: display name, currency, time zone, locale.

Currencies and locales come from Babel (CLDR data), time zones from the IANA
database shipped by `tzdata`, so that the lists stay current without our code.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
import unicodedata
from collections.abc import Callable

import babel
import babel.numbers

from server.domain.errors import InvalidArgument

MAX_DISPLAY_NAME = 100
# language[-script][-region][-variant]...; POSIX forms such as `de_DE@euro` are not tags.
_BCP47_SHAPE = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8}){0,4}")


@functools.cache
def _currencies() -> frozenset[str]:
    return frozenset(babel.numbers.list_currencies())


@functools.cache
def _time_zones() -> frozenset[str]:
    # The tzdata package's own list: the same on every host, unlike the OS zone
    # directory, which also holds names such as `localtime` that are no IANA zone.
    names = importlib.resources.files("tzdata").joinpath("zones").read_text().split()
    return frozenset(names) - {"Factory"}


def clean_display_name(value: str, *, field: str = "display_name") -> str:
    """A trimmed display name of 1 to 100 characters without control characters."""
    name = value.strip()
    if not name:
        raise InvalidArgument(field, f"{field} must not be empty")
    if len(name) > MAX_DISPLAY_NAME:
        raise InvalidArgument(
            field, f"{field} must be at most {MAX_DISPLAY_NAME} characters, got {len(name)}"
        )
    for ch in name:
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            raise InvalidArgument(
                field, f"{field} must not contain control characters, found U+{ord(ch):04X}"
            )
    return name


def clean_currency_code(value: str, *, field: str = "currency_code") -> str:
    """An ISO 4217 currency code, upper-cased."""
    code = value.strip().upper()
    if code not in _currencies():
        raise InvalidArgument(
            field, f"{field} must be an ISO 4217 currency code such as EUR, got {value[:40]!r}"
        )
    return code


def clean_time_zone(value: str, *, field: str = "time_zone") -> str:
    """An IANA time zone name, as given (names are case-sensitive)."""
    zone = value.strip()
    if zone not in _time_zones():
        raise InvalidArgument(
            field,
            f"{field} must be an IANA time zone name such as Europe/Paris, got {value[:60]!r}",
        )
    return zone


def clean_locale(value: str, *, field: str = "locale") -> str:
    """A BCP 47 locale tag known to CLDR, in canonical form (`en-GB`)."""
    tag = value.strip()
    try:
        if not _BCP47_SHAPE.fullmatch(tag):
            raise ValueError(tag)
        parsed = babel.Locale.parse(tag.replace("_", "-"), sep="-")
    except (ValueError, TypeError, babel.UnknownLocaleError):
        raise InvalidArgument(
            field, f"{field} must be a BCP 47 language tag such as en-GB, got {value[:40]!r}"
        ) from None
    return str(parsed).replace("_", "-")


# The editable profile fields and their rules: the one list every layer derives from.
CLEANERS: dict[str, Callable[..., str]] = {
    "display_name": clean_display_name,
    "currency_code": clean_currency_code,
    "time_zone": clean_time_zone,
    "locale": clean_locale,
}
EDITABLE_FIELDS = tuple(CLEANERS)


def not_editable(name: str) -> InvalidArgument:
    """The error for an update mask naming a field that cannot change."""
    return InvalidArgument(
        "update_mask",
        f"update_mask names {name[:60]!r}, which cannot be changed; "
        f"allowed: {', '.join(EDITABLE_FIELDS)}",
    )


def nothing_to_update() -> InvalidArgument:
    """The error for an update mask naming no field."""
    *first, last = EDITABLE_FIELDS
    return InvalidArgument(
        "update_mask", f"update_mask must name at least one field: {', '.join(first)} or {last}"
    )


def clean_changes(changes: dict[str, str], *, prefix: str = "user.") -> dict[str, str]:
    """Validate a set of field changes; error fields are named with `prefix`."""
    cleaned: dict[str, str] = {}
    for name, value in changes.items():
        cleaner = CLEANERS.get(name)
        if cleaner is None:
            raise not_editable(name)
        cleaned[name] = cleaner(value, field=prefix + name)
    return cleaned
