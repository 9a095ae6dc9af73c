"""Where the hot path's time goes: py-spy on the server under h2load, summed by concern.

Usage: python -m bench.profile [--seconds 20] [--protocol connect-json-h1|grpc-h2c]
                               [--app server.runtime.asgi:app]

Starts one server like the bench does (1k users, LOG_LEVEL=WARNING), drives
GetSession with a valid cookie for `--seconds` and, meanwhile, samples the
Envoy process (which runs the Python app) with `py-spy record --nonblocking`.
Each sample is charged to the innermost frame that belongs to a known concern
(cookie unsign, SQLite lookup, rate limiting, logging, middleware, ...), so a
SHA-256 inside itsdangerous counts as "cookie unsign". It also splits the
process's CPU by thread (the Python thread vs Envoy's C++ workers) from
/proc/PID/task. Writes bench/results/profile-<protocol>.txt and the raw stacks.
"""

from __future__ import annotations

import argparse
import collections
import linecache
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from bench import data, load, procs
from bench.run import (
    BIN,
    COOKIE_NAME,
    GET_SESSION,
    HEALTH_CHECK,
    REPO,
    RESULTS,
    TMP,
    prepare_scale,
    server_env,
)

# (concern, path fragments). An owner is code that does a job of its own; the
# framework tier only gets a sample no owner frame is on the stack of.
OWNERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "cookie unsign (itsdangerous HMAC-SHA256)",
        ("itsdangerous/", "server/domain/tokens.py", "server/rpc/cookies.py"),
    ),
    ("SQLite session+user lookup (find_principal)", ("server/storage/sqlite.py",)),
    (
        "rate limiting (throttle: MemoryWindows, or limits for Redis)",
        ("limits/", "server/domain/throttle.py", "interceptors/rate_limit.py"),
    ),
    ("request logging interceptor", ("interceptors/logging.py", "logging/__init__.py")),
    ("client IP interceptor", ("interceptors/client_ip.py", "ipaddress.py")),
    ("browser guard interceptor", ("interceptors/browser_guard.py",)),
    ("deadline interceptor (asyncio.timeout)", ("interceptors/deadline.py",)),
    ("error boundary interceptor", ("interceptors/errors.py",)),
    ("metrics interceptor", ("interceptors/metrics.py", "server/ops/metrics.py")),
    ("codec: protobuf / JSON encode+decode", ("connectrpc/_codec.py", "protobuf/", "json/")),
    ("handler + domain->proto conversion", ("server/rpc/",)),
    (
        "session rules (Sessions.authenticate, SessionInterceptor)",
        ("server/domain/sessions.py", "interceptors/session.py"),
    ),
)
FRAMEWORK: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "thread-pool worker (asyncio.to_thread)",
        ("concurrent/futures/thread.py",),
    ),
    ("asyncio (tasks, locks, timeouts, to_thread)", ("asyncio/",)),
    ("connectrpc framework (interceptor chain, request/response plumbing)", ("connectrpc/",)),
    ("edge middleware (header check, security headers)", ("server/edge/middleware.py",)),
    ("CORS middleware (starlette)", ("starlette/",)),
    ("router", ("server/edge/router.py",)),
    ("receive_fix", ("server/runtime/receive_fix.py",)),
)
NATIVE_IO = "ASGI receive()/send() into pyvoy (native)"


def _source(frame: str) -> str:
    """The source line of a py-spy frame `func (path:line)`."""
    try:
        location = frame.rsplit("(", 1)[1].rstrip(")")
        path, line = location.rsplit(":", 1)
    except (IndexError, ValueError):
        return ""
    for root in (
        REPO,
        Path(sysconfig.get_paths()["purelib"]),
        Path(sysconfig.get_paths()["stdlib"]),
    ):
        candidate = root / path
        if candidate.exists():
            return linecache.getline(str(candidate), int(line)).strip()
    return ""


def concern_of(stack: list[str]) -> str:
    """The concern a sample belongs to (innermost known frame wins)."""
    if not stack or stack == [""]:
        return "no Python frame (pyvoy/Envoy native code holding the thread)"
    leaf = _source(stack[-1])
    if "await send(" in leaf or "receive()" in leaf or "await self._send(" in leaf:
        return NATIVE_IO
    for tier in (OWNERS, FRAMEWORK):
        for frame in reversed(stack):
            for concern, fragments in tier:
                if any(
                    f"({fragment}" in frame or f"/{fragment}" in frame for fragment in fragments
                ):
                    return concern
    return "other: " + stack[-1][:80]


def summarize(raw: Path) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    """Samples, samples per concern, and self samples per leaf line (top list)."""
    total = 0
    concerns: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack_text, _, count = line.rpartition(" ")
        n = int(count)
        stack = stack_text.split(";")
        total += n
        concerns[concern_of(stack)] += n
        leaves[stack[-1]] += n
    return total, concerns, leaves


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name of a process."""
    out: dict[str, float] = collections.defaultdict(float)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[f"{name}[{task.name}]"] += (int(fields[11]) + int(fields[12])) / procs.CLK_TCK
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--protocol", default=load.H1, choices=load.PROTOCOLS)
    parser.add_argument("--app", default="server.runtime.asgi:app")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    args = parser.parse_args()
    pyspy = shutil.which("py-spy") or str(BIN / "py-spy")
    procs.NICE = -10 if os.geteuid() == 0 else 0  # as in bench.run: other work yields
    procs.raise_priority()
    os.sched_setaffinity(0, {int(procs.LOAD_CPU)})
    run_dir = TMP / f"profile-{time.strftime('%Y%m%d-%H%M%S')}"
    session_key = data.new_session_key()
    env = server_env(session_key)
    secret = prepare_scale(1_000, run_dir / "data", env)
    cookie = data.cookie(session_key, secret)
    echo = args.app != "server.runtime.asgi:app"
    path = HEALTH_CHECK if echo else GET_SESSION
    port = procs.free_port()
    server = procs.spawn(
        "profiled",
        procs.serve_args(
            str(BIN / "expense-auth"),
            port,
            None if args.app == "server.runtime.asgi:app" else args.app,
        ),
        env={**env, "DATA_DIR": str(run_dir / "data")},
        cwd=REPO,
        log_dir=run_dir,
        ports={"h1": port},
    )
    try:
        procs.wait_listening(server)
        extra = [] if echo else [("cookie", f"{COOKIE_NAME}={cookie}")]
        request = load.request_for(
            args.protocol, path, json_body="{}", proto_body=b"", extra=extra, body_dir=run_dir
        )
        load.h2load(port, args.protocol, request, seconds=3, log_file=None)  # warm-up
        envoy = server.refresh_pids()[-1]
        raw = run_dir / "stacks.txt"
        before = thread_cpu(envoy)
        spy = subprocess.Popen(
            [
                *procs.pinned(procs.LOAD_CPU),
                pyspy,
                "record",
                "-p",
                str(envoy),
                "--nonblocking",
                "-r",
                str(args.rate),
                "-d",
                f"{int(args.seconds)}",
                "-f",
                "raw",
                "-o",
                str(raw),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        run = load.h2load(port, args.protocol, request, seconds=args.seconds - 1, log_file=None)
        after = thread_cpu(envoy)
        spy.wait(timeout=60)
    finally:
        server.stop()
    total, concerns, leaves = summarize(raw)
    cpu = {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0) > 0.005}
    all_cpu = sum(cpu.values())
    lines = [
        f"profile of {args.app} {path} over {args.protocol}, c={load.CONCURRENCY}, "
        f"{run.rps:.0f} RPS while sampled; {total} samples of the Python thread",
        "",
        f"server CPU per call: {1000 * all_cpu / max(run.requests, 1):.3f} ms; by thread:",
        *(
            f"  {v / all_cpu * 100:5.1f} %  {k}"
            for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])
        ),
        "",
        "Python-thread samples by concern (innermost known frame):",
        *(f"  {n / total * 100:5.1f} %  {name}" for name, n in concerns.most_common()),
        "",
        "top self lines:",
        *(f"  {n / total * 100:5.1f} %  {name}" for name, n in leaves.most_common(25)),
    ]
    text = "\n".join(lines) + "\n"
    stem = "profile-echo" if echo else "profile"
    out = RESULTS / f"{stem}-{args.protocol}.txt"
    out.write_text(text)
    shutil.copyfile(raw, RESULTS / "tmp" / f"{stem}-{args.protocol}.stacks.txt")
    shutil.rmtree(run_dir, ignore_errors=True)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
