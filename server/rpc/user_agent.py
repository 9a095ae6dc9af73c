"""A short, privacy-friendly summary of a User-Agent header ("Chrome on macOS").

Parsing uses ua-parser (the maintained uap-core rules); only the summary is
stored, never the full header. The parser has the browser and OS rules only (a
summary never reads the 633 device rules) on Python's `re`, behind the
library's own S3-FIFO cache of 2,000 strings, which is how ua-parser itself
builds its default parser. That trades a slower parse of a string not seen
before for far less memory than the Rust engine (`ua-parser[regex]`) holds;
browsers send few distinct strings (Chrome and Edge reduce theirs to the major
version), so nearly every sign-in hits the cache. The figures are in
docs/benchmarks.md ("What changed, and what each change bought").
"""

from __future__ import annotations

import functools
import re

import ua_parser

MAX_HEADER = 512
CACHE_SIZE = 2000
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
    resolver = ua_parser.BasicResolver((agents, systems, []))
    return ua_parser.Parser(ua_parser.CachingResolver(resolver, ua_parser.Cache(CACHE_SIZE)))


def warm_up() -> None:
    """Compile the parser's rules now (~0.15 s) rather than during the first sign-in."""
    summarize("Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0")
