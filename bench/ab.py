"""A/B: the hot path on experimental builds (bench/variants.py) against the unchanged app.

Usage: python -m bench.ab [--variants no_limits,no_edge] [--rounds 4] [--seconds 4]

Every variant and the bare echo run side by side (server core 0, h2load core 1);
each round visits them in a shuffled order; the table gives median RPS, the
ratio to the echo and to the unchanged app (per round, then the median), and the
server's CPU per call.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import time

from bench import data, load, procs
from bench.run import (
    BIN,
    COOKIE_NAME,
    GET_SESSION,
    HEALTH_CHECK,
    RATE_LIMITS,
    REPO,
    TMP,
    prepare_scale,
    server_env,
)
from bench.variants import PATCHES


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab")
    parser.add_argument(
        "--variants",
        default="no_limits,cheap_request_id,no_edge",
        help=f"comma-separated, from: {', '.join(n for n in PATCHES if n != 'baseline')}",
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--rate-limit",
        help="every RATE_LIMIT_* set to this (e.g. 1000000/second); default as bench.run",
    )
    parser.add_argument("--seconds", type=float, default=4)
    args = parser.parse_args()
    unknown = [name for name in args.variants.split(",") if name not in PATCHES]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(PATCHES)}")
    procs.NICE = -10 if os.geteuid() == 0 else 0  # as in bench.run: other work yields
    procs.raise_priority()
    os.sched_setaffinity(0, {int(procs.LOAD_CPU)})
    run_dir = TMP / f"ab-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True)
    session_key = data.new_session_key()
    limits = {} if args.rate_limit is None else dict.fromkeys(RATE_LIMITS, args.rate_limit)
    env = server_env(session_key, **limits)
    names = ["echo", "baseline", *args.variants.split(",")]
    servers: dict[str, procs.Server] = {}
    cookies: dict[str, str] = {}
    try:
        for name in names:
            data_dir = run_dir / name
            if name != "echo":
                cookies[name] = data.cookie(session_key, prepare_scale(1_000, data_dir, env))
            app = "bench.echo_app:app" if name == "echo" else f"bench.variants:{name}"
            port = procs.free_port()
            servers[name] = procs.spawn(
                name,
                procs.serve_args(str(BIN / "expense-auth"), port, app),
                env={**env, "DATA_DIR": str(data_dir)},
                cwd=REPO,
                log_dir=run_dir,
                ports={"p": port},
            )
        for server in servers.values():
            procs.wait_listening(server)
        rows: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for round_index in range(args.rounds + 1):  # round 0 is the warm-up
            cells = [(n, p) for n in names for p in load.PROTOCOLS]
            random.Random(round_index).shuffle(cells)
            for name, protocol in cells:
                server = servers[name]
                extra = [] if name == "echo" else [("cookie", f"{COOKIE_NAME}={cookies[name]}")]
                request = load.request_for(
                    protocol,
                    HEALTH_CHECK if name == "echo" else GET_SESSION,
                    json_body="{}",
                    proto_body=b"",
                    extra=extra,
                    body_dir=run_dir / "bodies",
                )
                pids = server.refresh_pids()
                cpu0 = procs.cpu_seconds(pids)
                run = load.h2load(
                    server.ports["p"], protocol, request, seconds=args.seconds, log_file=None
                )
                cpu = procs.cpu_seconds(pids) - cpu0
                if round_index:
                    rows.setdefault((name, protocol), []).append((run.rps, cpu / run.requests))
            print(f"ab: round {round_index}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    print("| build | protocol | RPS | x echo | x unchanged app | server CPU ms/call |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for protocol in load.PROTOCOLS:
        for name in names:
            runs = rows[(name, protocol)]
            echo = rows[("echo", protocol)]
            base = rows[("baseline", protocol)]
            rps = statistics.median(r for r, _ in runs)
            to_echo = statistics.median(a[0] / b[0] for a, b in zip(runs, echo, strict=True))
            to_base = statistics.median(a[0] / b[0] for a, b in zip(runs, base, strict=True))
            cpu_ms = statistics.median(c for _, c in runs) * 1000
            ratios = f"{to_echo:.2f} | {to_base:.2f}"
            print(f"| {name} | {protocol} | {rps:.0f} | {ratios} | {cpu_ms:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
