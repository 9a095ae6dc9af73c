"""The app's own cost per call, without a server: a quick, repeatable A/B loop.

Usage: python -m bench.inproc [--variants baseline,NAME] [--calls 20000] [--profile FILE]

Builds the service exactly as server/runtime/asgi.py does (with the patches of the named
bench/variants.py variants applied in a fresh interpreter each) and the bare
echo, and drives each with `--calls` Connect JSON `GetSession` calls straight
through ASGI (16 in flight), recording process CPU time per call. Envoy and
pyvoy's own work (about 0.3 ms per call, the same for every app) is not in these
figures; bench.run measures the whole server. `--profile` writes a cProfile of
the first variant for `python -m pstats`.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.run import COOKIE_NAME, GET_SESSION, SIGN_IN, server_env
from server.identity.dev_issuer import DevIssuer

IN_FLIGHT = 16


async def _drive(
    app: Any, path: str, headers: list[tuple[bytes, bytes]], calls: int, bodies: list[bytes]
) -> None:
    async def one() -> None:
        body = bodies.pop() if bodies else b"{}"
        done = asyncio.Event()
        sent = False
        status = 0

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 8080),
        }
        await app(scope, receive, send)
        done.set()
        if status != 200:
            raise SystemExit(f"{path} answered HTTP {status}")

    async def worker(n: int) -> None:
        for _ in range(n):
            await one()

    share = calls // IN_FLIGHT
    await asyncio.gather(*(worker(share) for _ in range(IN_FLIGHT)))


def child(variant: str, calls: int, profile: str | None) -> None:
    """Run in a fresh interpreter: build `variant` (or the echo) and time it."""
    cookie = os.environ["BENCH_COOKIE"]
    bodies: list[bytes] = []
    if variant == "echo":
        from bench.echo_app import app

        path = "/grpc.health.v1.Health/Check"
    else:
        import bench.variants

        app = getattr(bench.variants, variant)
        path = GET_SESSION
        if tokens := os.environ.get("BENCH_TOKENS"):
            path = SIGN_IN
            bodies = [
                json.dumps({"googleIdToken": t}).encode() for t in Path(tokens).read_text().split()
            ]
    headers = [
        (b"host", b"127.0.0.1:8080"),
        (b"content-type", b"application/json"),
        (b"connect-protocol-version", b"1"),
        (b"user-agent", b"bench-inproc"),
        (b"cookie", f"{COOKIE_NAME}={cookie}".encode()),
    ]

    async def main() -> float:
        await _drive(app, path, headers, int(os.environ.get("BENCH_WARMUP", "500")), bodies)
        # A full collection walks the whole start-up heap (compiled rules, descriptors):
        # where one falls would decide the figures, so the heap is set aside first.
        gc.collect()
        gc.freeze()
        start = time.process_time()
        if profile:
            prof = cProfile.Profile()
            prof.enable()
        await _drive(app, path, headers, calls, bodies)
        if profile:
            prof.disable()
            prof.dump_stats(profile)
        return (time.process_time() - start) / calls * 1e6

    print(json.dumps({"variant": variant, "us_per_call": asyncio.run(main())}))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inproc")
    parser.add_argument("--variants", default="baseline")
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile")
    parser.add_argument(
        "--sign-in",
        action="store_true",
        help="drive SignIn with fresh development tokens instead of GetSession",
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions per call under valgrind's callgrind instead of CPU time",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.calls, args.profile)
        return 0

    from bench import data

    tmp = Path(tempfile.mkdtemp(prefix="inproc-"))
    key = data.new_session_key()
    env = {**os.environ, **server_env(key, DATA_DIR=str(tmp))}
    data.migrate(tmp, env, Path(sys.executable).parent / "expense-auth")
    seeded = data.seed(tmp, 1000)
    env["BENCH_COOKIE"] = data.cookie(key, seeded.hot_secret)
    # The development issuer's RSA key, made now: generating it in the first child
    # would put a random prime search into that child's figures.
    DevIssuer.load_or_create(tmp)
    if args.sign_in:
        tokens = data.mint_tokens(tmp, 3 * args.calls + 500)
        (tmp / "tokens.txt").write_text("\n".join(tokens))
        env["BENCH_TOKENS"] = str(tmp / "tokens.txt")
    names = ["echo", *args.variants.split(",")]
    results: dict[str, list[float]] = {name: [] for name in names}
    if args.instructions:
        return _instructions(names, env, args.calls)
    for round_ in range(args.rounds):
        for name in names:
            cmd = [sys.executable, "-m", "bench.inproc", "--child", name]
            cmd += ["--calls", str(args.calls)]
            if args.profile and round_ == 0 and name == names[1]:
                cmd += ["--profile", args.profile]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1])["us_per_call"])
    # The machine's noise only ever adds CPU time: the best round is the estimate.
    base = min(results["echo"])
    print(f"{'variant':<28} {'us/call':>9} {'minus echo':>11}  rounds")
    for name in names:
        best = min(results[name])
        rounds = " ".join(f"{x:.0f}" for x in results[name])
        print(f"{name:<28} {best:>9.1f} {best - base:>11.1f}  {rounds}")
    return 0


def _instructions(names: list[str], env: dict[str, str], calls: int) -> int:
    """Instructions per call: runs of `calls` and 3x`calls` calls, differenced.

    callgrind counts instructions, not time, so the figure does not move with
    the machine's load; the difference removes start-up and warm-up.
    """
    env = {**env, "BENCH_WARMUP": "200"}
    counts: dict[str, float] = {}

    def count(name: str) -> None:
        totals = []
        for n in (calls, 3 * calls):
            with tempfile.TemporaryDirectory() as out:
                cmd = [
                    "valgrind",
                    "--tool=callgrind",
                    f"--callgrind-out-file={out}/cg",
                    sys.executable,
                    "-m",
                    "bench.inproc",
                    "--child",
                    name,
                    "--calls",
                    str(n),
                ]
                run = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            refs = [line for line in run.stderr.splitlines() if "Collected :" in line]
            totals.append(int(refs[-1].rsplit(":", 1)[1].strip().replace(",", "")))
        counts[name] = (totals[1] - totals[0]) / (2 * calls)
        print(f"{name}: {counts[name] / 1000:.1f} k instructions per call", file=sys.stderr)

    # Counts do not depend on load, so both cores can work.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(count, names))
    base = counts["echo"]
    print(f"{'variant':<28} {'k instr/call':>13} {'minus echo':>11}")
    for name in names:
        print(f"{name:<28} {counts[name] / 1000:>13.1f} {(counts[name] - base) / 1000:>11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
