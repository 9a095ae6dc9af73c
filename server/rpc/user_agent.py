"""A short, privacy-friendly summary of a User-Agent header ("Chrome on macOS").

Parsing uses ua-parser (the maintained uap-core rules) on its Rust regex
engine; only the summary is stored, never the full header. The parser is built
with the browser and OS rules only: the 633 device rules, which a summary never
reads, would double its memory (~26 MB instead of ~12 MB).
"""

from __future__ import annotations

import functools
import re

import ua_parser
import ua_parser.regex

MAX_HEADER = 512
_PRODUCT = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,40}")
_OS_NAMES = {"Mac OS X": "macOS"}


def summarize(header: str) -> str:
    """`Browser on OS`, or the client's product name, or `unknown client`."""
    header = header[:MAX_HEADER].strip()
    if not header:
        return "unknown client"
    parser = _parser()
    agent = parser.parse_user_agent(header)
    platform = parser.parse_os(header)
    browser = agent.family if agent else ""
    system = platform.family if platform else ""
    system = _OS_NAMES.get(system, system)
    if browser and browser != "Other":
        return f"{browser} on {system}" if system and system != "Other" else browser
    product = _PRODUCT.match(header)
    name = product.group(0) if product else "unknown client"
    return f"{name} on {system}" if system and system != "Other" else name


@functools.cache
def _parser() -> ua_parser.Parser:
    agents, systems, _devices = ua_parser.load_builtins()
    return ua_parser.Parser(ua_parser.regex.Resolver((agents, systems, [])))


def warm_up() -> None:
    """Load the parser's rules now (~0.25 s) rather than during the first sign-in."""
    summarize("Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0")
