"""Sends one outbox event over HTTP, signed per the Standard Webhooks specification.

Each attempt is signed anew (`webhook-timestamp` is the attempt's time, so a
receiver's replay window applies to it), with every configured secret: during a
rotation the receiver verifies with whichever it has. The signing itself is the
`standardwebhooks` package's, the one receivers verify with.

Why aiohttp (not urllib3, which google-auth's transport already brings): the
attempt must be bounded as a whole and must not hold a thread. urllib3 blocks,
so it would run in a thread, and its timeouts apply to each socket operation:
an endpoint that trickles its answer holds the thread for as long as it likes.
aiohttp runs on the event loop, and cancelling the attempt at its deadline
really ends it (the connection is closed). It is maintained, with releases every
few weeks, and reuses connections to an endpoint between deliveries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from standardwebhooks import Webhook

from server.domain.clock import Clock
from server.domain.models import OutboxEvent
from server.domain.webhooks import DeliveryFailed

if TYPE_CHECKING:
    import aiohttp

USER_AGENT = "expense-auth-webhooks/1"
# An acknowledgement's body is not used; read at most this much of it.
MAX_ANSWER_BYTES = 4096


class HttpSender:
    """POSTs events to their endpoint (implements domain.ports.WebhookSender)."""

    def __init__(self, secrets: Sequence[str], *, timeout_s: float, clock: Clock) -> None:
        self._signers = [Webhook(secret) for secret in secrets]
        self._timeout_s = timeout_s
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None

    def headers(self, event: OutboxEvent) -> dict[str, str]:
        """The Standard Webhooks headers of one attempt, signed now."""
        at = datetime.fromtimestamp(self._clock.now_ms() // 1000, tz=UTC)
        return {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": event.id,
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": " ".join(
                signer.sign(event.id, at, event.payload) for signer in self._signers
            ),
        }

    async def send(self, event: OutboxEvent) -> None:
        """See `WebhookSender.send`: one POST, bounded by the timeout as a whole."""
        # Imported on the first delivery: aiohttp is ~8 MiB of a serving process,
        # which a service without webhooks should not carry.
        import aiohttp

        if self._session is None:
            # Made on first use: on the event loop that runs the deliveries.
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None), raise_for_status=False
            )
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._session.post(
                    event.endpoint,
                    data=event.payload.encode(),
                    headers=self.headers(event),
                    allow_redirects=False,
                ) as answer:
                    await answer.content.read(MAX_ANSWER_BYTES)
                    status = answer.status
        except TimeoutError:
            raise DeliveryFailed(f"no answer within {self._timeout_s:g} s") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:  # ValueError: a bad answer
            raise DeliveryFailed(f"{type(exc).__name__}: {exc}") from None
        if not 200 <= status < 300:
            raise DeliveryFailed(f"HTTP {status}")

    async def aclose(self) -> None:
        """Close the connections (at shutdown)."""
        if self._session is not None:
            await self._session.close()
            self._session = None
