"""Scrubbing of what leaves for an error tracker: no cookie, token, secret or email.

Applied to every event, breadcrumb and transaction just before it is sent
(server/ops/error_tracking.py), as the last line of defence: the tracker is set up
to collect no request data, cookies, headers or local variables in the first place,
but an exception's message or a library's breadcrumb may still quote anything.

Three rules, over every string of the event, however deeply nested:

- A value under a sensitive key (`cookie`, `authorization`, `token`, `secret`,
  `password`, `session`, `email`, an IP address...) is replaced whole.
- Text that looks like a credential is replaced where it appears: JWTs (Google
  ID tokens), signed or random tokens (session cookies, page tokens), `Bearer` and
  `Basic` credentials, passwords in URLs, `name=value` pairs whose name says
  secret, and email addresses.
- The service's own secrets (the cookie keys, the admin token, the database's and
  Redis's passwords) are replaced wherever they appear, in whatever context.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

FILTERED = "[Filtered]"
# Secrets shorter than this are not searched for (they would match ordinary text);
# the configuration requires far longer ones anyway.
MIN_SECRET_CHARS = 8

_SENSITIVE_KEY = re.compile(
    r"cookie|authori[sz]ation|token|secret|passw|pwd|session|e-?mail|credential|api[-_]?key"
    r"|dsn|ip_address|remote_addr|forwarded|x-real-ip|^user$|^env$",
    re.IGNORECASE,
)
# Text patterns, each with its replacement; applied in this order.
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # A JWT (JWS: three parts; JWE: five), e.g. a Google ID token.
    (re.compile(r"eyJ[A-Za-z0-9_-]{4,}(?:\.[A-Za-z0-9_-]*){2,4}"), "[Filtered:jwt]"),
    # Credentials of an Authorization header quoted in text.
    (re.compile(r"(?i)\b(bearer|basic)\s+[^\s\"',;]+"), r"\1 [Filtered]"),
    # user:password@ in a URL (DATABASE_URL, RATE_LIMIT_STORAGE_URL).
    (re.compile(r"(://[^/\s:@]*):[^/\s@]+@"), r"\1:[Filtered]@"),
    # name=value where the name says what the value is (cookies, query strings).
    (
        re.compile(r"(?i)\b([\w-]*(?:session|token|secret|passw|key|auth)[\w-]*=)[^;&\s\"',]+"),
        r"\1[Filtered]",
    ),
    # A signed value such as the session cookie (itsdangerous: value.timestamp.signature).
    (
        re.compile(r"[A-Za-z0-9_-]{20,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{16,}"),
        "[Filtered:token]",
    ),
    # An email address (a domain ending in letters: `expense-auth@0.1.0` is a release).
    (
        re.compile(r"[\w.!#$%&'*+/=?^`{|}~-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b"),
        "[Filtered:email]",
    ),
)
# A long run of base64url characters mixing upper case, lower case and digits is a
# random token (a session id, a key); identifiers in code rarely mix all three.
_OPAQUE = re.compile(r"[A-Za-z0-9_-]{32,}")


def _opaque(match: re.Match[str]) -> str:
    text = match.group(0)
    kinds = (str.isupper, str.islower, str.isdigit)
    if all(any(kind(c) for c in text) for kind in kinds):
        return "[Filtered:token]"
    return text


class Scrubber:
    """Replaces credentials and personal data in tracker payloads (plain JSON-like data)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so that a secret containing another is replaced whole.
        self._secrets = sorted(
            {s for s in secrets if len(s) >= MIN_SECRET_CHARS}, key=len, reverse=True
        )

    def text(self, value: str) -> str:
        """`value` with every credential-looking part replaced."""
        for secret in self._secrets:
            value = value.replace(secret, "[Filtered:secret]")
        for pattern, replacement in _PATTERNS:
            value = pattern.sub(replacement, value)
        return _OPAQUE.sub(_opaque, value)

    def value(self, value: Any) -> Any:
        """A scrubbed copy of `value`: dicts, lists and tuples are walked; strings cleaned."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {key: self._item(key, item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            # [name, value] pairs (headers as lists) are judged by their name.
            if len(value) == 2 and isinstance(value[0], str) and _sensitive(value[0]):
                return [self.text(value[0]), FILTERED]
            return [self.value(item) for item in value]
        return value

    def _item(self, key: Any, item: Any) -> Any:
        if isinstance(key, str) and _sensitive(key) and item not in (None, "", [], {}):
            return FILTERED
        return self.value(item)

    def event(self, event: Any, hint: Any = None) -> Any:
        """A `before_send` / `before_send_transaction` hook: the event, scrubbed."""
        return self.value(event)

    def breadcrumb(self, crumb: Any, hint: Any = None) -> Any:
        """A `before_breadcrumb` hook: the breadcrumb, scrubbed."""
        return self.value(crumb)


def _sensitive(key: str) -> bool:
    return _SENSITIVE_KEY.search(key) is not None
