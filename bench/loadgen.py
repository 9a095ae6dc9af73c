"""A small closed-loop load generator for requests that must differ (SignIn tokens).

h2load sends one body file over and over; an ID token is accepted once, so
SignIn needs a fresh body per request. Connect JSON goes over raw HTTP/1.1
keep-alive sockets (asyncio); gRPC over grpc.aio, one channel (one HTTP/2
connection) per concurrent caller, like h2load's `-c`.

Usage: python -m bench.loadgen --port P --protocol connect-json-h1|grpc-h2c
       --path /pkg.Service/Method (--bodies FILE | --repeat BODY) --seconds S [--concurrency C]
       [--headers JSON]
FILE holds one body per line: JSON for Connect, hex protobuf for gRPC. It stops
when the time is up or the bodies run out, and prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

H1 = "connect-json-h1"


class Stats:
    def __init__(self) -> None:
        self.latencies_us: list[int] = []
        self.status: dict[str, int] = {}
        self.errors = 0

    def record(self, started: float, status: str, ok: bool) -> None:
        self.latencies_us.append(int((time.perf_counter() - started) * 1e6))
        self.status[status] = self.status.get(status, 0) + 1
        if not ok:
            self.errors += 1


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def _h1_worker(
    port: int,
    path: str,
    headers: dict[str, str],
    bodies: Iterator[bytes],
    stop: float,
    stats: Stats,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()
    )
    try:
        for body in bodies:
            if time.perf_counter() >= stop:
                return
            started = time.perf_counter()
            writer.write(f"{head}content-length: {len(body)}\r\n\r\n".encode() + body)
            status = await _read_response(reader)
            stats.record(started, f"{status // 100}xx", 200 <= status < 300)
    finally:
        writer.close()


async def _grpc_worker(
    port: int,
    path: str,
    headers: dict[str, str],
    bodies: Iterator[bytes],
    stop: float,
    stats: Stats,
) -> None:
    import grpc

    options = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        call = channel.unary_unary(path)
        metadata = tuple(headers.items())
        for body in bodies:
            if time.perf_counter() >= stop:
                return
            started = time.perf_counter()
            try:
                await call(body, metadata=metadata, timeout=30)
                stats.record(started, "OK", True)
            except grpc.aio.AioRpcError as exc:
                stats.record(started, exc.code().name, False)


async def run(args: argparse.Namespace, bodies: Iterator[bytes]) -> dict[str, Any]:
    headers = json.loads(args.headers)
    if args.protocol == H1:
        headers = {"content-type": "application/json", "connect-protocol-version": "1", **headers}
        worker = _h1_worker
    else:
        worker = _grpc_worker
    stats = Stats()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    stop = started + args.seconds
    await asyncio.gather(
        *(
            worker(args.port, args.path, headers, bodies, stop, stats)
            for _ in range(args.concurrency)
        )
    )
    elapsed = time.perf_counter() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    done = len(stats.latencies_us)
    return {
        "rps": done / elapsed if elapsed else 0.0,
        "requests": done,
        "seconds": elapsed,
        "status": stats.status,
        "errors": stats.errors,
        "latencies_us": stats.latencies_us,
        "client_cpu": cpu / elapsed if elapsed else 0.0,
        "bodies_left": 0 if args.repeat is not None else sum(1 for _ in bodies),
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
    args = parser.parse_args()

    def decode(line: str) -> bytes:
        return line.encode() if args.protocol == H1 else bytes.fromhex(line)

    bodies: Iterator[bytes]
    if args.repeat is not None:
        bodies = itertools.repeat(decode(args.repeat))
    else:
        lines = [line for line in Path(args.bodies).read_text().splitlines() if line.strip()]
        bodies = iter([decode(line) for line in lines])  # shared: each body is sent once
    print(json.dumps(asyncio.run(run(args, bodies))))


if __name__ == "__main__":
    main()
