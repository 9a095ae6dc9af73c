"""What the server exports, and what PromQL expressions expect it to export.

`selectors` is not a PromQL parser: it strips strings, ranges and grouping clauses,
then reads `name{label="value", ...}` selectors. The rules and the dashboard are
checked with promtool for syntax; this only finds the metrics and labels they use.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from tests.support.http import request

# Labels Prometheus adds to every scraped sample, and series it makes itself.
TARGET_LABELS = frozenset({"job", "instance"})
SYNTHETIC = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})

_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"bool", "offset", "inf", "nan"}
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", re.IGNORECASE
)
_SELECTOR = re.compile(r"(?<![\w:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])\s*(\{[^}]*\})?(?!\s*\()")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*")')
_NUMBER = re.compile(r"^\d")


@dataclass(frozen=True)
class Selector:
    """One `metric{...}` in an expression."""

    metric: str
    matchers: tuple[tuple[str, str, str], ...] = field(default=())


def selectors(expr: str) -> list[Selector]:
    """Every metric selector in `expr`, with its label matchers (label, operator, value)."""
    # Keep the strings inside selectors: blank out each one, then put them back per matcher.
    strings: list[str] = []

    def hide(match: re.Match[str]) -> str:
        strings.append(match.group(0))
        return f'"{len(strings) - 1}"'

    text = _STRING.sub(hide, expr)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    found: list[Selector] = []
    for match in _SELECTOR.finditer(text):
        name, braces = match.group(1), match.group(2) or ""
        if name.lower() in _KEYWORDS or _NUMBER.match(name):
            continue
        matchers = tuple(
            (label, op, _unquote(strings[int(index.strip('"'))]))
            for label, op, index in _MATCHER.findall(braces)
        )
        found.append(Selector(name, matchers))
    return found


def _unquote(quoted: str) -> str:
    return quoted[1:-1].replace('\\"', '"').replace("\\\\", "\\")


Exported = dict[str, list[dict[str, str]]]


def scrape(admin_url: str) -> Exported:
    """Every sample name on `/metrics` with the label sets it has (one scrape)."""
    response = request(admin_url, "GET", "/metrics")
    assert response.status == 200, response.body
    exported: Exported = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            exported.setdefault(sample.name, []).append(dict(sample.labels))
    return exported


def value(admin_url: str, name: str, **labels: str) -> float | None:
    """One sample's value now, or None when it is not exported."""
    response = request(admin_url, "GET", "/metrics")
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            if sample.name == name and dict(sample.labels) == labels:
                return float(sample.value)
    return None


def unknown(expr: str, exported: Exported, *, recorded: Iterable[str] = ()) -> list[str]:
    """What `expr` uses that the server does not export: metric names, labels, values."""
    known = set(recorded) | SYNTHETIC
    problems: list[str] = []
    for selector in selectors(expr):
        if selector.metric in known:
            continue
        label_sets = exported.get(selector.metric)
        if label_sets is None:
            problems.append(f"{selector.metric} is not exported")
            continue
        for label, op, wanted in selector.matchers:
            if label in TARGET_LABELS:
                continue
            values = {labels[label] for labels in label_sets if label in labels}
            if not values:
                problems.append(f"{selector.metric} has no label {label!r}")
            elif op == "=" and wanted not in values:
                problems.append(f"{selector.metric}{{{label}={wanted!r}}} is never exported")
    return problems
