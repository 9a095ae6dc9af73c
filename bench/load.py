"""Driving load: h2load (nghttp2) for fixed requests, bench.loadgen for SignIn.

Both run pinned to the load core. Latency percentiles come from h2load's
per-request log (`--log-file`), pooled over the rounds of a cell.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import procs

CONCURRENCY = 16
H1 = "connect-json-h1"
GRPC = "grpc-h2c"
PROTOCOLS = (H1, GRPC)
_FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed"
)
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
_TRAFFIC = re.compile(r"traffic: .*?\((\d+)\) total, .*?\((\d+)\) headers .*?\((\d+)\) data")


@dataclass
class Run:
    """One measured run of one cell."""

    rps: float
    requests: int
    seconds: float
    status: dict[str, int]
    data_bytes_per_request: float
    latencies_us: list[int] = field(default_factory=list)
    errors: int = 0
    client_cpu: float | None = None


@dataclass(frozen=True)
class Request:
    """What one cell sends: path, headers and a body file (None: a GET), per protocol."""

    path: str
    headers: tuple[tuple[str, str], ...]
    body: Path | None


def grpc_frame(message: bytes) -> bytes:
    """The gRPC length-prefixed message (uncompressed)."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def request_for(
    protocol: str,
    path: str,
    *,
    json_body: str,
    proto_body: bytes,
    extra: Sequence[tuple[str, str]],
    body_dir: Path,
) -> Request:
    """The request of a cell: Connect JSON over HTTP/1.1 or gRPC over h2c."""
    body_dir.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"\W", "_", f"{protocol}{path}")
    body = body_dir / f"{name}.body"
    if protocol == H1:
        body.write_text(json_body)
        headers = [("content-type", "application/json"), ("connect-protocol-version", "1")]
    else:
        body.write_bytes(grpc_frame(proto_body))
        headers = [("content-type", "application/grpc"), ("te", "trailers")]
    return Request(path=path, headers=(*headers, *extra), body=body)


def h2load(
    port: int, protocol: str, request: Request, *, seconds: float, log_file: Path | None
) -> Run:
    """Run h2load for `seconds` against 127.0.0.1:`port`, pinned to the load core."""
    args = [
        *procs.pinned(procs.LOAD_CPU),
        "h2load",
        "-t",
        "1",
        "-c",
        str(CONCURRENCY),
        "-m",
        "1",
        "-D",
        f"{int(seconds * 1000)}ms",
    ]
    if request.body is not None:
        args += ["-d", str(request.body)]
    if protocol == H1:
        args.append("--h1")
    for name, value in request.headers:
        args += ["-H", f"{name}: {value}"]
    if log_file is not None:
        args.append(f"--log-file={log_file}")
    args.append(f"http://127.0.0.1:{port}{request.path}")
    result = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60, check=False)
    out = result.stdout
    finished = _FINISHED.search(out)
    requests = _REQUESTS.search(out)
    status = _STATUS.search(out)
    traffic = _TRAFFIC.search(out)
    if result.returncode != 0 or not (finished and requests and status and traffic):
        raise RuntimeError(f"h2load failed ({result.returncode}):\n{out}\n{result.stderr}")
    done = int(requests.group(2))
    elapsed = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    codes = dict(zip(("2xx", "3xx", "4xx", "5xx"), (int(g) for g in status.groups()), strict=True))
    latencies: list[int] = []
    if log_file is not None and log_file.exists():
        for line in log_file.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) == 3:
                latencies.append(int(parts[2]))
        log_file.unlink()
    return Run(
        rps=float(finished.group(3)),
        requests=done,
        seconds=elapsed,
        status=codes,
        data_bytes_per_request=int(traffic.group(3)) / done if done else 0.0,
        latencies_us=latencies,
        errors=int(requests.group(4)),
    )


def loadgen(
    port: int,
    protocol: str,
    path: str,
    *,
    bodies_file: Path | None = None,
    repeat: str | None = None,
    get: bool = False,
    cookies_file: Path | None = None,
    paired: bool = False,
    count: int | None = None,
    save: Path | None = None,
    headers: Mapping[str, str],
    seconds: float,
) -> Run:
    """Run bench.loadgen (distinct bodies and/or cookies per request), pinned to the load
    core; see bench/loadgen.py for the options."""
    args = [
        *procs.pinned(procs.LOAD_CPU),
        sys.executable,
        "-m",
        "bench.loadgen",
        "--port",
        str(port),
        "--protocol",
        protocol,
        "--path",
        path,
        "--seconds",
        f"{seconds:g}",
        "--concurrency",
        str(CONCURRENCY),
        "--headers",
        json.dumps(dict(headers)),
    ]
    if get:
        args.append("--get")
    elif repeat is not None:
        args += ["--repeat", repeat]
    else:
        args += ["--bodies", str(bodies_file)]
    if cookies_file is not None:
        args += ["--cookies", str(cookies_file)] + (["--paired"] if paired else [])
    if count is not None:
        args += ["--count", str(count)]
    if save is not None:
        args += ["--save", str(save)]
    result = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    if result.returncode != 0:
        raise RuntimeError(f"loadgen failed:\n{result.stdout}\n{result.stderr}")
    out = json.loads(result.stdout)
    return Run(
        rps=out["rps"],
        requests=out["requests"],
        seconds=out["seconds"],
        status=out["status"],
        data_bytes_per_request=0.0,
        latencies_us=out["latencies_us"],
        errors=out["errors"],
        client_cpu=out["client_cpu"],
    )
