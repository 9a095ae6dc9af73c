"""Draw deploy/grafana/expense-auth.json's panels from a real Prometheus: `make dashboard-preview`.

No Grafana can be installed on the project's machines (none of the package
registries they reach has a runnable one), so this is the closest evidence that the
dashboard shows what it should: it starts the real server, loads it for a few
minutes with sign-ins (good and bad), session calls, rate-limited exports and
sign-outs, has Debian's Prometheus scrape its admin listener every two seconds with
deploy/prometheus's rules loaded, then evaluates every panel's queries exactly as
written (Grafana's `$__rate_interval` and `$job` substituted) over the load and
draws them in the dashboard's own grid with matplotlib. It is labelled as such.

    .venv/bin/python deploy/grafana/preview.py docs/dashboard-preview.png [--seconds 240]
"""

from __future__ import annotations

import argparse
import json
import math
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from connectrpc.errors import ConnectError  # noqa: E402

from gen.expense.auth.v1.auth_pb import GetSessionRequest, SignOutRequest  # noqa: E402
from gen.expense.user.v1.user_pb import (  # noqa: E402
    ExportCurrentUserDataRequest,
    GetCurrentUserRequest,
)
from tests.conftest import server_env  # noqa: E402
from tests.support.client import Session  # noqa: E402
from tests.support.google import FakeGoogle  # noqa: E402
from tests.support.http import connect_post  # noqa: E402
from tests.support.server import start_server  # noqa: E402

DASHBOARD = REPO / "deploy" / "grafana" / "expense-auth.json"
RULES = REPO / "deploy" / "prometheus" / "expense-auth.rules.yml"
SCRAPE_INTERVAL_S = 2
RATE_INTERVAL = "30s"  # what Grafana picks for a 2 s scrape over a few minutes
SIGN_IN = "/expense.auth.v1.AuthService/SignIn"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def start_prometheus(tmp: Path, admin_url: str) -> tuple[subprocess.Popen[bytes], str]:
    target = urllib.parse.urlsplit(admin_url).netloc
    config = tmp / "prometheus.yml"
    config.write_text(
        f"global:\n  scrape_interval: {SCRAPE_INTERVAL_S}s\n  evaluation_interval: 5s\n"
        f"rule_files:\n  - {RULES}\n"
        "scrape_configs:\n  - job_name: expense-auth\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    port = free_port()
    binary = shutil.which("prometheus")
    if binary is None:
        raise SystemExit("prometheus is not installed (Debian package prometheus): make setup")
    process = subprocess.Popen(  # noqa: S603 (Debian's prometheus, fixed arguments)
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "prometheus.log").open("wb"),
    )
    return process, f"http://127.0.0.1:{port}"


def prometheus_api(base: str, path: str, **params: str) -> Any:
    url = f"{base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 (loopback)
        body = json.load(response)
    if body["status"] != "success":
        raise RuntimeError(f"{path} {params}: {body}")
    return body["data"]


def load(url: str, google: FakeGoogle, deadline: float, stats: dict[str, int]) -> None:
    """Users signing in, reading their session, exporting (soon refused), signing out."""
    while time.monotonic() < deadline:
        device = Session(url)
        sub = secrets.token_hex(6)
        try:
            device.sign_in(google.token(sub=sub, email=f"{sub}@example.com"))
            for _ in range(20):
                device.call(device.auth.get_session, GetSessionRequest())
                device.call(device.users.get_current_user, GetCurrentUserRequest())
                stats["calls"] += 2
            for _ in range(3):  # the third export of the hour is refused
                try:
                    device.call(
                        device.users.export_current_user_data, ExportCurrentUserDataRequest()
                    )
                except ConnectError:
                    stats["refused"] += 1
            if secrets.randbelow(2):  # half of them stay signed in
                device.call(device.auth.sign_out, SignOutRequest())
        finally:
            device.close()


def bad_sign_ins(url: str, google: FakeGoogle, deadline: float, burst: tuple[float, float]) -> None:
    """Expired tokens: a trickle, and a burst in the middle of the run."""
    while time.monotonic() < deadline:
        now = time.monotonic()
        expired = google.token(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600)
        connect_post(url, SIGN_IN, {"googleIdToken": expired})
        time.sleep(0.02 if burst[0] <= now < burst[1] else 1.0)


def panel_data(base: str, panel: dict[str, Any], start: float, end: float) -> list[Any]:
    series = []
    for target in panel["targets"]:
        expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL)
        expr = expr.replace("$job", "expense-auth")
        data = prometheus_api(
            base, "query_range", query=expr, start=str(start), end=str(end), step="2"
        )
        for result in data["result"]:
            legend = target.get("legendFormat") or expr
            for name, label in result["metric"].items():
                legend = legend.replace("{{" + name + "}}", label)
            points = [(float(t), float(v)) for t, v in result["values"]]
            series.append((target["refId"], legend.replace("/expense.", "").strip(), points))
    return series


def human(number: float, unit: str | None) -> str:
    if math.isnan(number):
        return "no data"
    if unit == "s":
        if number >= 3600:
            return f"{number / 3600:.1f} h"
        return f"{number:.0f} s" if number >= 1 else f"{number * 1000:.1f} ms"
    if unit == "percentunit":
        return f"{number * 100:.1f} %"
    return f"{number:.3g}" if abs(number) < 1000 else f"{number:,.0f}"


def draw(dashboard: dict[str, Any], data: dict[int, list[Any]], out: Path, note: str) -> None:
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    fig = plt.figure(figsize=(24, rows * 0.62 + 1.6), dpi=80)
    top = 1 - 1.3 / (rows * 0.62 + 1.6)
    fig.suptitle(
        f"{dashboard['title']}: deploy/grafana/expense-auth.json, every panel's queries "
        "evaluated by a real Prometheus 2.42 that scraped a loaded server on this machine. "
        "Drawn with matplotlib in the dashboard's grid: NOT a Grafana screenshot.",
        fontsize=13,
        y=0.995,
    )
    fig.text(0.5, top + 0.004, note, ha="center", fontsize=10, color="#444")
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        left, width = grid["x"] / 24 + 0.03, grid["w"] / 24 - 0.045
        height = grid["h"] / rows * top - 0.045
        bottom = top - (grid["y"] + grid["h"]) / rows * top + 0.012
        ax = fig.add_axes((left, bottom, width, height))
        ax.set_title(panel["title"], fontsize=11, loc="left")
        unit = panel["fieldConfig"]["defaults"].get("unit")
        series = data[panel["id"]]
        if panel["type"] == "stat":
            ax.set_axis_off()
            last = [points[-1][1] for _, _, points in series if points]
            number = sum(last) if last else float("nan")
            mappings = panel["fieldConfig"]["defaults"].get("mappings", [])
            text = human(number, unit)
            for mapping in mappings:
                text = mapping["options"].get(f"{number:g}", {}).get("text", text)
            ax.text(0.5, 0.45, text, ha="center", va="center", fontsize=26, weight="bold")
            continue
        start = min((points[0][0] for _, _, points in series if points), default=0)
        # A second query with its own unit (memory and CPU) gets the right-hand axis.
        right = None
        for override in panel["fieldConfig"].get("overrides", []):
            if override["matcher"]["id"] == "byFrameRefID":
                right = (override["matcher"]["options"], ax.twinx())
                units = [p["value"] for p in override["properties"] if p["id"] == "unit"]
                right[1].set_ylabel(units[0] if units else "", fontsize=8)
                right[1].tick_params(labelsize=8)
        for number, (ref, legend, points) in enumerate(series):
            xs = [(t - start) / 60 for t, _ in points]
            ys = [v for _, v in points]
            target = right[1] if right and ref == right[0] else ax
            target.plot(xs, ys, linewidth=1.4, label=legend[:48], color=f"C{number}")
        if right:
            lines = ax.get_lines() + right[1].get_lines()
            ax.legend(
                lines, [str(line.get_label()) for line in lines], fontsize=7, loc="center left"
            )
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.set_xlabel("minutes into the run", fontsize=8)
        if unit:
            ax.set_ylabel(unit, fontsize=8)
        if not series:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        elif not right:
            ax.legend(fontsize=7, loc="upper left", ncol=2 if len(series) > 6 else 1)
    fig.savefig(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seconds", type=float, default=240, help="length of the load")
    args = parser.parse_args()
    dashboard = json.loads(DASHBOARD.read_text())
    google = FakeGoogle().start()
    with tempfile.TemporaryDirectory(prefix="dashboard-preview-") as name:
        tmp = Path(name)
        server = start_server(
            tmp,
            server_env(
                google,
                RATE_LIMIT_EXPORT_PER_USER="2/hour",
                BACKUP_DIR=str(tmp / "backups"),
                BACKUP_INTERVAL_SECONDS="60",
            ),
        )
        prometheus, base = start_prometheus(tmp, server.admin_url)
        try:
            time.sleep(3 * SCRAPE_INTERVAL_S)
            started = time.time()
            deadline = time.monotonic() + args.seconds
            third = args.seconds / 3
            burst = (time.monotonic() + third, time.monotonic() + 2 * third)
            stats = {"calls": 0, "refused": 0}
            workers = [
                threading.Thread(target=load, args=(server.url, google, deadline, stats))
                for _ in range(3)
            ]
            workers.append(
                threading.Thread(target=bad_sign_ins, args=(server.url, google, deadline, burst))
            )
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            time.sleep(3 * SCRAPE_INTERVAL_S)
            ended = time.time()
            data = {p["id"]: panel_data(base, p, started, ended) for p in dashboard["panels"]}
            alerts = prometheus_api(base, "alerts")["alerts"]
            firing = sorted(f"{a['labels']['alertname']} ({a['state']})" for a in alerts)
        finally:
            prometheus.terminate()
            prometheus.wait(timeout=30)
            server.stop()
            google.stop()
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    note = (
        f"{when}: {args.seconds:.0f} s of load (3 users in a loop, expired-token sign-ins with "
        f"a burst in the middle third), scraped every {SCRAPE_INTERVAL_S} s, "
        f"$__rate_interval={RATE_INTERVAL}. Alerts at the end: {', '.join(firing) or 'none'}."
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    draw(dashboard, data, args.out, note)
    print(f"{args.out}: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
