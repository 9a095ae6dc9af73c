"""Public certificates that verify ID tokens, as a PEM dict keyed by key id.

`HttpCerts` caches Google's certs for as long as their `Cache-Control: max-age`
allows, refetches once when a token names a key id it has not seen (Google
rotates keys), rate-limits such refetches so that tokens with made-up key ids
cannot make us hammer Google, and keeps using stale keys when a refresh fails.
Fetches run in a worker thread, one at a time, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import urllib3

from server.domain.clock import Clock
from server.domain.errors import Unavailable

log = logging.getLogger(__name__)

# The whole fetch, and each network read within it.
FETCH_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 2.0
# How long a readiness check waits for keys that are not cached yet.
AVAILABLE_WAIT_S = 1.0
# Google's certs document is a few kilobytes.
MAX_CERTS_BYTES = 256 * 1024
DEFAULT_MAX_AGE_S = 300
MIN_REFETCH_INTERVAL_MS = 30_000
# After a failed fetch: keep using stale keys this long before trying again, and
# with no keys at all, answer `unavailable` at once for this long, so that an
# outage does not queue every sign-in behind a fetch that times out.
STALE_GRACE_MS = 60_000
RETRY_BACKOFF_MS = 1_000
_MAX_AGE = re.compile(r"max-age\s*=\s*(\d+)", re.IGNORECASE)


class CertsSource(Protocol):
    """Where the certificates of one issuer come from."""

    async def certs(self, key_id: str | None) -> Mapping[str, str]:
        """The known certs; makes an effort to include `key_id` when given."""
        ...

    async def available(self) -> bool:
        """Whether any key is at hand (fetching once if needed)."""
        ...


class StaticCerts:
    """Certificates known up front (the development issuer's own key)."""

    def __init__(self, certs: Mapping[str, str]) -> None:
        self._certs = dict(certs)

    async def certs(self, key_id: str | None) -> Mapping[str, str]:
        """The fixed certificates."""
        return self._certs

    async def available(self) -> bool:
        """Always: the keys are local."""
        return bool(self._certs)


@dataclass(frozen=True, slots=True)
class _Fetched:
    certs: dict[str, str]
    max_age_s: int


class HttpCerts:
    """A certs URL in Google's v1 format (`{"kid": "-----BEGIN CERTIFICATE-----..."}`)."""

    def __init__(self, url: str, *, clock: Clock) -> None:
        self._url = url
        self._clock = clock
        self._certs: dict[str, str] | None = None
        self._fresh_until_ms = 0
        self._last_fetch_ms: int | None = None
        self._failed_until_ms = 0
        self._lock = asyncio.Lock()
        # urllib3 itself (google-auth's urllib3 transport is a thin layer over it):
        # the requests stack would cost memory for one GET every few hours
        # (docs/benchmarks.md), and the body is read here under a size cap and a
        # total deadline.
        self._pool = urllib3.PoolManager(retries=False)
        self._warming: asyncio.Task[None] | None = None
        self.fetch_count = 0

    async def certs(self, key_id: str | None) -> Mapping[str, str]:
        """Cached certs, refreshed when stale or when `key_id` is unknown.

        Raises:
            Unavailable: Nothing is cached and the certs URL cannot be read.
        """
        if self._usable(key_id):
            assert self._certs is not None
            return self._certs
        async with self._lock:
            if self._usable(key_id):
                assert self._certs is not None
                return self._certs
            if not self._may_fetch(key_id):
                assert self._certs is not None
                return self._certs
            if self._certs is None and self._clock.monotonic_ms() < self._failed_until_ms:
                raise _unavailable()
            self._last_fetch_ms = self._clock.monotonic_ms()
            try:
                fetched = await asyncio.to_thread(self._fetch)
            except (ValueError, OSError) as exc:
                now = self._clock.monotonic_ms()
                if self._certs is not None:
                    log.warning(
                        "certs refresh failed; using cached keys",
                        extra={"url": self._url, "error": type(exc).__name__},
                    )
                    self._fresh_until_ms = now + STALE_GRACE_MS
                    return self._certs
                log.error(
                    "certs fetch failed and nothing is cached",
                    extra={"url": self._url, "error": str(exc)[:200]},
                )
                self._failed_until_ms = now + RETRY_BACKOFF_MS
                raise _unavailable() from None
            self._certs = fetched.certs
            self._fresh_until_ms = self._clock.monotonic_ms() + fetched.max_age_s * 1000
            return self._certs

    async def available(self) -> bool:
        """Whether keys are cached, fetching them if none are (for readiness).

        Waits at most AVAILABLE_WAIT_S for the fetch: a slow certs URL must not make
        readiness slow; the fetch goes on, and a later check sees its result.
        """
        if self._certs is not None:
            return True
        if self._warming is None or self._warming.done():
            self._warming = asyncio.get_running_loop().create_task(self._warm())
        done, _ = await asyncio.wait({self._warming}, timeout=AVAILABLE_WAIT_S)
        return bool(done) and self._certs is not None

    async def _warm(self) -> None:
        with contextlib.suppress(Unavailable):
            await self.certs(None)

    def _usable(self, key_id: str | None) -> bool:
        if self._certs is None or self._clock.monotonic_ms() >= self._fresh_until_ms:
            return False
        return key_id is None or key_id in self._certs

    def _may_fetch(self, key_id: str | None) -> bool:
        """Stale or empty: always. Fresh but the key id is unknown: at most every 30 s."""
        if self._certs is None or self._clock.monotonic_ms() >= self._fresh_until_ms:
            return True
        if self._last_fetch_ms is None:
            return True
        return self._clock.monotonic_ms() - self._last_fetch_ms >= MIN_REFETCH_INTERVAL_MS

    def _fetch(self) -> _Fetched:
        """GET the certs, within FETCH_TIMEOUT_S in all and MAX_CERTS_BYTES of body.

        A certs URL that is slow, drips its answer or sends a huge one costs at most
        the deadline and the cap: every read is bounded, so this thread always ends.
        """
        self.fetch_count += 1
        deadline = time.monotonic() + FETCH_TIMEOUT_S

        def remaining() -> float:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the certs URL took more than {FETCH_TIMEOUT_S:g} s")
            return min(left, READ_TIMEOUT_S)

        try:
            response = self._pool.request(
                "GET",
                self._url,
                preload_content=False,
                redirect=False,
                timeout=urllib3.Timeout(connect=remaining(), read=remaining()),
            )
        except urllib3.exceptions.HTTPError as exc:
            raise OSError(f"cannot fetch the certs: {exc}") from None
        try:
            if response.status != 200:
                raise OSError(f"certs URL answered HTTP {response.status}")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > MAX_CERTS_BYTES:
                raise ValueError(f"certs document of {declared} bytes is over the cap")
            body = bytearray()
            while True:
                remaining()
                try:
                    chunk = response.read1(16 * 1024)
                except urllib3.exceptions.HTTPError as exc:
                    raise OSError(f"cannot read the certs: {exc}") from None
                if not chunk:
                    break
                body += chunk
                if len(body) > MAX_CERTS_BYTES:
                    raise ValueError(f"certs document is over {MAX_CERTS_BYTES} bytes")
        finally:
            response.close()  # never returned to the pool half-read
        data = json.loads(body)
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()
        ):
            raise ValueError("certs document is not a JSON object of PEM strings")
        cache_control = response.headers.get("cache-control", "")
        match = _MAX_AGE.search(cache_control)
        max_age = int(match.group(1)) if match else DEFAULT_MAX_AGE_S
        return _Fetched(certs=data, max_age_s=min(max_age, 24 * 3600))


def _unavailable() -> Unavailable:
    return Unavailable("cannot reach Google to verify the sign-in; try again shortly")
