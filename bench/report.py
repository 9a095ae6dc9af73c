"""Results: latest.json (the issue's shape plus detail), a chart and a Markdown table."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.load import GRPC, H1

if TYPE_CHECKING:
    from bench.run import Cell, Mode

DOCS_BEGIN = "<!-- bench:results:begin (written by `make bench`) -->"
DOCS_END = "<!-- bench:results:end -->"
OURS = ("GetSession", "GetCurrentUser", "SignIn", "Unauthenticated")


def _percentile(sorted_values: Sequence[int], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index] / 1000


def _cpu_ratio(cell: Cell, base: Cell | None) -> float | None:
    """Median over rounds of the baseline's CPU per call over this cell's: the capacity
    ratio on a core of its own, little moved by other work sharing the core."""
    if base is None or not base.runs:
        return None
    pairs = zip(cell.cpu_ms_per_request, base.cpu_ms_per_request, strict=True)
    ratios = [b / a for a, b in pairs if a]
    return round(statistics.median(ratios), 3) if ratios else None


def _ratio(cell: Cell, base: Cell | None) -> float | None:
    """Median over rounds of this cell's RPS over the baseline's in the same round."""
    if base is None or not base.runs:
        return None
    ratios = [a.rps / b.rps for a, b in zip(cell.runs, base.runs, strict=True) if b.rps]
    return round(statistics.median(ratios), 3) if ratios else None


def _total_cpu(cell: Cell) -> list[float]:
    """CPU per call of the server and of its storage processes, per round."""
    return [
        a + b for a, b in zip(cell.cpu_ms_per_request, cell.storage_cpu_ms_per_request, strict=True)
    ]


# (what, cell, baseline): same-round ratios the issues ask for. Cells are
# (name, protocol-independent); a missing cell (quick mode) leaves the row out.
COMPARISONS = (
    (
        "now / as measured before (GetSession: production, 10,000 sessions, bench.loadgen)",
        "GetSession",
        "GetSession, as measured before",
    ),
    ("one session (cached) / 10,000 sessions", "GetSession, one session (cached)", "GetSession"),
    (
        "PostgreSQL / SQLite, GetSession @ 1k users",
        "GetSession @ 1k users, PostgreSQL",
        "GetSession @ 1k users",
    ),
    (
        "PostgreSQL / SQLite, GetSession @ 1M users",
        "GetSession @ 1M users, PostgreSQL",
        "GetSession @ 1M users",
    ),
    ("PostgreSQL / SQLite, SignIn @ 1k users", "SignIn @ 1k users, PostgreSQL", "SignIn"),
    (
        "PostgreSQL / SQLite, SignIn @ 1M users",
        "SignIn @ 1M users, PostgreSQL",
        "SignIn @ 1M users",
    ),
    (
        "Redis limits / in-memory limits (GetSession)",
        "GetSession, Redis limits",
        "GetSession @ 1k users",
    ),
    (
        "2 workers / 1 worker, both with Redis limits, one core (GetSession)",
        "GetSession, 2 workers + Redis limits",
        "GetSession, Redis limits",
    ),
    (
        "LOG_LEVEL=WARNING / INFO (GetSession)",
        "GetSession, LOG_LEVEL=WARNING",
        "GetSession @ 1k users",
    ),
)


def comparisons(cells: list[Cell]) -> list[dict[str, Any]]:
    """Same-round ratios of RPS and of CPU per call (server + storage), per protocol."""
    by_key = {cell.key: cell for cell in cells}
    out = []
    for what, name, base_name in COMPARISONS:
        for protocol in (H1, GRPC):
            cell, base = by_key.get((name, protocol)), by_key.get((base_name, protocol))
            if cell is None or base is None or not cell.runs:
                continue
            cpu = [a / b for a, b in zip(_total_cpu(cell), _total_cpu(base), strict=True) if b]
            out.append(
                {
                    "comparison": what,
                    "protocol": protocol,
                    "rps_ratio": _ratio(cell, base),
                    "cpu_per_call_ratio": round(statistics.median(cpu), 3) if cpu else None,
                }
            )
    return out


def build(
    cells: list[Cell],
    *,
    mode: Mode,
    machine: dict[str, Any],
    versions: dict[str, str],
    command: str,
    google_cert_fetches: int,
    serving_processes: int,
    elapsed_s: float,
    server_peaks: dict[str, float],
    idle_rss: dict[str, float],
) -> dict[str, Any]:
    """The results document."""
    by_key = {cell.key: cell for cell in cells}
    scenarios = []
    for cell in cells:
        latencies = sorted(v for run in cell.runs for v in run.latencies_us)
        rps = [run.rps for run in cell.runs]
        echo = by_key.get(("echo", cell.protocol))
        loadgen_echo = by_key.get(("echo, bench.loadgen client", cell.protocol))
        scenarios.append(
            {
                "name": cell.name,
                "protocol": cell.protocol,
                "server": cell.server,
                "rps": round(statistics.median(rps), 1),
                "p50_ms": _percentile(latencies, 0.50),
                "p99_ms": _percentile(latencies, 0.99),
                "p999_ms": _percentile(latencies, 0.999),
                "ratio_to_echo": _ratio(cell, echo),
                "cpu_ratio_to_echo": _cpu_ratio(cell, echo),
                "ratio_to_loadgen_echo": _ratio(cell, loadgen_echo)
                if cell.request is None and cell.name != "echo, bench.loadgen client"
                else None,
                "distinct_sessions": cell.sessions,
                # Calls that wrote a session's last-seen time (at most once a minute each).
                "last_seen_writes_per_call": round(statistics.median(cell.writes_per_call), 3)
                if cell.writes_per_call
                else None,
                "vs_connect_node": _ratio(cell, by_key.get(("connect-node echo", cell.protocol))),
                "vs_grpc_aio": _ratio(cell, by_key.get(("grpc.aio echo", cell.protocol))),
                "rps_min": round(min(rps), 1),
                "rps_max": round(max(rps), 1),
                "rounds": len(rps),
                "requests": sum(run.requests for run in cell.runs),
                "server_cpu_util": round(statistics.median(cell.cpu_util), 3),
                "server_cpu_ms_per_request": round(statistics.median(cell.cpu_ms_per_request), 3),
                "storage_cpu_ms_per_request": round(
                    statistics.median(cell.storage_cpu_ms_per_request), 3
                ),
                "core0_other_util": round(statistics.median(cell.core0_other), 3),
                "peak_rss_mb": round(cell.peak_rss_mb, 1),
                "client": "bench.loadgen" if cell.request is None else "h2load",
                "client_cpu_util": (
                    round(statistics.median(r.client_cpu or 0 for r in cell.runs), 3)
                    if cell.request is None
                    else None
                ),
            }
        )
    results: dict[str, Any] = {
        # Every signed-in cell but the one-session one names one of this many sessions,
        # chosen at random per request.
        "distinct_sessions": mode.pool,
        "scenarios": scenarios,
        "comparisons": comparisons(cells),
        "machine": machine,
        "versions": versions,
        "command": command,
        "mode": {
            "quick": mode.quick,
            "rounds": mode.rounds,
            "seconds_per_cell": mode.seconds,
            "warmup_seconds_per_cell": mode.warmup_seconds,
            "scales": list(mode.scales),
        },
        "elapsed_s": round(elapsed_s, 1),
        "google_cert_fetches": google_cert_fetches,
        "serving_processes": serving_processes,
        "server_peak_rss_mb": server_peaks,
        "server_idle_rss_mb": idle_rss,
    }
    results["targets"] = targets(results, mode)
    return results


def _row(results: dict[str, Any], name: str, protocol: str) -> dict[str, Any]:
    for row in results["scenarios"]:
        if row["name"] == name and row["protocol"] == protocol:
            return row  # type: ignore[no-any-return]
    raise KeyError((name, protocol))


def targets(results: dict[str, Any], mode: Mode) -> list[dict[str, Any]]:
    """The issue's targets against this run (reported, never asserted)."""
    out: list[dict[str, Any]] = []

    def add(what: str, value: float | None, goal: str, ok: bool) -> None:
        out.append({"target": what, "value": value, "goal": goal, "met": ok})

    # The hot-path issue's targets: GetSession with distinct sessions against the
    # echoes, SignIn in production settings (with its nonce) against the echo.
    for protocol in (H1, GRPC):
        row = _row(results, "GetSession", protocol)
        add(
            f"GetSession / echo ({protocol})",
            row["ratio_to_echo"],
            ">= 0.60",
            (row["ratio_to_echo"] or 0) >= 0.60,
        )
    row = _row(results, "GetSession", H1)
    add(
        "GetSession / connect-node echo (connect-json-h1)",
        row["vs_connect_node"],
        ">= 1.0",
        (row["vs_connect_node"] or 0) >= 1.0,
    )
    row = _row(results, "GetSession", GRPC)
    add(
        "GetSession / grpc.aio echo (grpc-h2c)",
        row["vs_grpc_aio"],
        ">= 0.9",
        (row["vs_grpc_aio"] or 0) >= 0.9,
    )
    for protocol in (H1, GRPC):
        row = _row(results, "SignIn", protocol)
        add(
            f"SignIn / echo ({protocol})",
            row["ratio_to_echo"],
            ">= 0.25",
            (row["ratio_to_echo"] or 0) >= 0.25,
        )
    forward_auth = _row(results, "ForwardAuth (GET check)", H1)
    get_session = _row(results, "GetSession", H1)
    ratio = forward_auth["rps"] / get_session["rps"] if get_session["rps"] else None
    add(
        "ForwardAuth check / GetSession (connect-json-h1)",
        ratio and round(ratio, 2),
        ">= 1.0",
        (ratio or 0) >= 1.0,
    )
    processes = results["serving_processes"]
    add(
        "Google cert fetches during the run (cached: one per serving process at most)",
        results["google_cert_fetches"],
        f"<= {processes}",
        results["google_cert_fetches"] <= processes,
    )
    for protocol in (H1, GRPC):
        row = _row(results, "GetSession", protocol)
        spread = row["p99_ms"] / row["p50_ms"] if row["p50_ms"] else None
        add(
            f"GetSession p99 / p50 at c=16 ({protocol})",
            spread and round(spread, 2),
            "<= 4",
            spread is not None and spread <= 4,
        )
    largest = max(mode.scales)
    for protocol in (H1, GRPC):
        small = _row(results, "GetSession @ 1k users", protocol)
        big = _row(results, f"GetSession @ {_label(largest)} users", protocol)
        drop = 1 - big["rps"] / small["rps"] if small["rps"] else None
        add(
            f"GetSession RPS drop, 1k -> {_label(largest)} users ({protocol})",
            drop and round(drop, 3),
            "<= 0.15",
            drop is not None and drop <= 0.15,
        )
    ours = [
        row
        for row in results["scenarios"]
        if row["server"] not in ("echo", "grpc-aio", "connect-node", "workers-2", "legacy")
    ]
    peak = max(row["peak_rss_mb"] for row in ours)
    add("peak RSS of our server under load (MiB, one worker)", peak, "<= 150", peak <= 150)
    return out


def _label(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1_000}k"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _plain(value: Any) -> str:
    if isinstance(value, list | tuple):
        return " / ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def markdown_table(results: dict[str, Any]) -> str:
    """The results as Markdown: scenarios, targets, machine, versions, command."""
    lines = [
        "| scenario | protocol | client | sessions | last-seen writes per call "
        "| RPS (median) | min-max | x echo "
        "| x echo, same client | x echo by CPU/call | x connect-node echo "
        "| x grpc.aio echo | p50 ms | p99 ms | p99.9 ms | server CPU ms/call "
        "| storage CPU ms/call | core 0 busy outside the server | peak RSS MiB |",
        "| --- | --- | --- |" + " ---: |" * 16,
    ]
    for row in results["scenarios"]:
        sessions = row.get("distinct_sessions")
        lines.append(
            f"| {row['name']} | {row['protocol']} | {row['client']} | "
            f"{'—' if sessions is None else f'{sessions:,}'} | "
            f"{_fmt(row.get('last_seen_writes_per_call'))} | {row['rps']:.0f} | "
            f"{row['rps_min']:.0f}-{row['rps_max']:.0f} | {_fmt(row['ratio_to_echo'])} | "
            f"{_fmt(row.get('ratio_to_loadgen_echo'))} | "
            f"{_fmt(row['cpu_ratio_to_echo'])} | "
            f"{_fmt(row['vs_connect_node'])} | {_fmt(row['vs_grpc_aio'])} | "
            f"{_fmt(row['p50_ms'])} | {_fmt(row['p99_ms'])} | {_fmt(row['p999_ms'])} | "
            f"{_fmt(row['server_cpu_ms_per_request'], 3)} | "
            f"{_fmt(row.get('storage_cpu_ms_per_request') or None, 3)} | "
            f"{row['core0_other_util'] * 100:.0f} % | {row['peak_rss_mb']:.0f} |"
        )
    lines += [
        "",
        "| same-round ratio | protocol | RPS | CPU per call (server + storage) |",
        "| --- | --- | ---: | ---: |",
    ]
    for row in results.get("comparisons", []):
        lines.append(
            f"| {row['comparison']} | {row['protocol']} | {_fmt(row['rps_ratio'])} | "
            f"{_fmt(row['cpu_per_call_ratio'])} |"
        )
    lines += ["", "| target | value | goal | met |", "| --- | ---: | --- | --- |"]
    for target in results["targets"]:
        lines.append(
            f"| {target['target']} | {target['value']} | {target['goal']} | "
            f"{'yes' if target['met'] else '**no**'} |"
        )
    mode = results["mode"]
    lines += [
        "",
        f"Distinct sessions per signed-in cell: {results['distinct_sessions']:,} "
        "(one chosen at random per request), but for the one-session cell.",
        f"Google cert fetches during the run: {results['google_cert_fetches']} "
        f"({results['serving_processes']} serving processes of ours).",
        "Idle RSS after start-up, largest process (MiB): "
        + ", ".join(f"{k} {v}" for k, v in results["server_idle_rss_mb"].items())
        + ".",
        "",
        "| machine | |",
        "| --- | --- |",
        *(f"| {k} | {_plain(v)} |" for k, v in results["machine"].items()),
        "",
        "| versions | |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in results["versions"].items()),
        "",
        f"Command: `{results['command']}` ({mode['rounds']} rounds x "
        f"{mode['seconds_per_cell']:g} s per cell after a warm-up, "
        f"c={results['machine']['concurrency']}; the run took {results['elapsed_s']:.0f} s).",
    ]
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], path: Path) -> None:
    """Median RPS per scenario (min-max whiskers), one panel per protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(15, 10), sharex=False)
    for ax, protocol in zip(axes, (H1, GRPC), strict=True):
        rows = [row for row in results["scenarios"] if row["protocol"] == protocol][::-1]
        names = [row["name"] for row in rows]
        rps = [row["rps"] for row in rows]
        err = [[r["rps"] - r["rps_min"] for r in rows], [r["rps_max"] - r["rps"] for r in rows]]
        colors = [
            "#999999"
            if row["server"] in ("echo", "grpc-aio", "connect-node", "legacy")
            else "#3b6ea8"
            for row in rows
        ]
        ax.barh(names, rps, xerr=err, color=colors, capsize=2)
        for y, row in enumerate(rows):
            ratio = row["ratio_to_echo"]
            ax.text(
                row["rps_max"], y, f"  {ratio:.2f}x echo" if ratio else "", va="center", fontsize=8
            )
        ax.set_title(f"{protocol}, c=16, server pinned to one core")
        ax.set_xlabel("requests/s (median of rounds; whiskers min-max)")
        ax.margins(x=0.25)
    fig.suptitle(
        f"expense-auth — {results['command']} — grey: bare echo baselines and the old measurement"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict[str, Any], json_path: Path, png_path: Path, md_path: Path) -> None:
    """Write the three outputs."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path.write_text(markdown_table(results))
    chart(results, png_path)


def update_docs(docs: Path, md_path: Path) -> None:
    """Replace the generated section of docs/benchmarks.md with this run's tables."""
    text = docs.read_text() if docs.exists() else ""
    generated = f"{DOCS_BEGIN}\n\n{md_path.read_text()}\n{DOCS_END}"
    if DOCS_BEGIN in text and DOCS_END in text:
        head, _, rest = text.partition(DOCS_BEGIN)
        _, _, tail = rest.partition(DOCS_END)
        docs.write_text(head + generated + tail)
    else:
        docs.write_text(text + ("\n" if text else "") + generated + "\n")
