"""A small closed-loop load generator for requests that must differ.

h2load sends one request over and over. Two things need more: SignIn (an ID token
and its nonce cookie are accepted once, so every request carries its own body and
cookie), and every signed-in call, which must name a different session each time
(one cookie would be answered from the server's session cache after its first
call; production sees lookups, cache misses and last-seen writes). Connect goes
over raw HTTP/1.1 keep-alive sockets (asyncio); gRPC over grpc.aio, one channel
(one HTTP/2 connection) per concurrent caller, like h2load's `-c`.

Usage: python -m bench.loadgen --port P --protocol connect-json-h1|grpc-h2c
       --path /pkg.Service/Method (--bodies FILE | --repeat BODY | --get) --seconds S
       [--concurrency C] [--headers JSON] [--cookies FILE [--paired]] [--count N]
       [--save FILE]
FILE (--bodies) holds one body per line: JSON for Connect, hex protobuf for gRPC;
each is sent once. --cookies holds one `name=value` per line: each request picks
one at random, or with --paired the i-th body goes with the i-th cookie. --get
sends GETs without a body (HTTP/1.1 only). --save (HTTP/1.1) writes each
response's Set-Cookie values and body as a JSON line. It stops when the time is
up, after --count requests, or when the bodies run out, and prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

H1 = "connect-json-h1"


class Stats:
    def __init__(self, *, get: bool = False, save: bool = False) -> None:
        self.latencies_us: list[int] = []
        self.status: dict[str, int] = {}
        self.errors = 0
        self.get = get
        self.saved: list[dict[str, Any]] | None = [] if save else None

    def record(self, started: float, status: str, ok: bool) -> None:
        self.latencies_us.append(int((time.perf_counter() - started) * 1e6))
        self.status[status] = self.status.get(status, 0) + 1
        if not ok:
            self.errors += 1


class Requests:
    """What to send next: bodies (each once, or one repeated) and cookies."""

    def __init__(
        self,
        bodies: Iterator[bytes | None],
        cookies: list[str],
        *,
        paired: bool,
        count: int | None,
    ) -> None:
        self._bodies = bodies
        self._cookies = cookies
        self._paired = paired
        # Seeded from the OS: each run draws its own sequence of sessions.
        self._random = random.Random()
        self._left = count
        self._sent = 0

    def next(self) -> tuple[bytes | None, str | None] | None:
        """The next (body, cookie), or None when there is nothing more to send."""
        if self._left is not None:
            if self._left <= 0:
                return None
            self._left -= 1
        try:
            body = next(self._bodies)
        except StopIteration:
            return None
        cookie = None
        if self._cookies:
            if self._paired:
                cookie = self._cookies[self._sent]
            else:
                cookie = self._cookies[self._random.randrange(len(self._cookies))]
        self._sent += 1
        return body, cookie


async def _read_response(
    reader: asyncio.StreamReader, *, keep: bool
) -> tuple[int, list[str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    cookies = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        headers[name] = value.strip()
        if keep and name == "set-cookie":
            cookies.append(value.strip())
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunks.append((await reader.readexactly(size + 2))[:-2])
            if size == 0:
                break
        body = b"".join(chunks)
    return status, cookies, body


async def _h1_worker(
    port: int,
    path: str,
    headers: dict[str, str],
    requests: Requests,
    stop: float,
    stats: Stats,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    method = "GET" if stats.get else "POST"
    head = (
        f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    ).encode()
    keep = stats.saved is not None
    try:
        while time.perf_counter() < stop and (item := requests.next()) is not None:
            body, cookie = item
            request = head + (f"cookie: {cookie}\r\n".encode() if cookie else b"")
            if body is None:
                request += b"\r\n"
            else:
                request += f"content-length: {len(body)}\r\n\r\n".encode() + body
            started = time.perf_counter()
            writer.write(request)
            status, cookies, answer = await _read_response(reader, keep=keep)
            stats.record(started, f"{status // 100}xx", 200 <= status < 300)
            if stats.saved is not None:
                stats.saved.append({"set_cookie": cookies, "body": answer.decode()})
    finally:
        writer.close()


async def _grpc_worker(
    port: int,
    path: str,
    headers: dict[str, str],
    requests: Requests,
    stop: float,
    stats: Stats,
) -> None:
    import grpc

    options = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        call = channel.unary_unary(path)
        fixed = tuple(headers.items())
        while time.perf_counter() < stop and (item := requests.next()) is not None:
            body, cookie = item
            metadata = (*fixed, ("cookie", cookie)) if cookie else fixed
            started = time.perf_counter()
            try:
                await call(body or b"", metadata=metadata, timeout=30)
                stats.record(started, "OK", True)
            except grpc.aio.AioRpcError as exc:
                stats.record(started, exc.code().name, False)


async def run(args: argparse.Namespace, requests: Requests) -> dict[str, Any]:
    headers = json.loads(args.headers)
    if args.protocol == H1:
        if not args.get:
            headers = {
                "content-type": "application/json",
                "connect-protocol-version": "1",
                **headers,
            }
        worker = _h1_worker
    else:
        worker = _grpc_worker
    stats = Stats(get=args.get, save=args.save is not None)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    stop = started + args.seconds
    await asyncio.gather(
        *(
            worker(args.port, args.path, headers, requests, stop, stats)
            for _ in range(args.concurrency)
        )
    )
    elapsed = time.perf_counter() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    done = len(stats.latencies_us)
    return {
        "saved": stats.saved,
        "rps": done / elapsed if elapsed else 0.0,
        "requests": done,
        "seconds": elapsed,
        "status": stats.status,
        "errors": stats.errors,
        "latencies_us": stats.latencies_us,
        "client_cpu": cpu / elapsed if elapsed else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--protocol", required=True, choices=(H1, "grpc-h2c"))
    parser.add_argument("--path", required=True)
    parser.add_argument("--bodies", help="one body per line")
    parser.add_argument("--repeat", help="send this one body (a line of --bodies) every time")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--headers", default="{}")
    parser.add_argument("--get", action="store_true", help="GET without a body (HTTP/1.1)")
    parser.add_argument("--cookies", help="one cookie (name=value) per line")
    parser.add_argument("--paired", action="store_true", help="the i-th cookie with body i")
    parser.add_argument("--count", type=int, help="stop after this many requests")
    parser.add_argument("--save", help="write Set-Cookie values and bodies here (HTTP/1.1)")
    args = parser.parse_args()

    def decode(line: str) -> bytes:
        return line.encode() if args.protocol == H1 else bytes.fromhex(line)

    bodies: Iterator[bytes | None]
    if args.get:
        bodies = itertools.repeat(None)
    elif args.repeat is not None:
        bodies = itertools.repeat(decode(args.repeat))
    else:
        lines = [line for line in Path(args.bodies).read_text().splitlines() if line.strip()]
        bodies = iter([decode(line) for line in lines])  # shared: each body is sent once
    cookies = []
    if args.cookies:
        cookies = [line for line in Path(args.cookies).read_text().splitlines() if line.strip()]
    requests = Requests(bodies, cookies, paired=args.paired, count=args.count)
    result = asyncio.run(run(args, requests))
    saved = result.pop("saved")
    if args.save is not None:
        Path(args.save).write_text("".join(json.dumps(item) + "\n" for item in saved or []))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
