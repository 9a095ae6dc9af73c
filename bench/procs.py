"""The servers under test: start, pin, wait until ready, measure CPU and memory, stop."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVER_CPU = "0"
LOAD_CPU = "1"
# The nice value of everything the bench starts (`--nice`); 0 leaves it alone. A
# negative one makes other work on a shared machine yield the two cores to the
# bench while it runs (root only).
NICE = 0


def raise_priority(pid: int | str = "self") -> None:
    """Apply NICE to the process's scheduling autogroup too.

    With autogroups on (Linux's default for desktops and many VMs), CFS first
    shares a core between sessions, and a process's nice value only counts
    inside its own session: the group's nice must be set as well.
    """
    if NICE:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/autogroup", "w") as f:
            f.write(str(NICE))


def adopt(pid: int) -> None:
    """Give a process the bench didn't start (a PostgreSQL backend serving a server under
    test) the server core and the bench's nice value, as if the server had spawned it."""
    with contextlib.suppress(OSError):
        os.sched_setaffinity(pid, {int(SERVER_CPU)})
        if NICE:
            os.setpriority(os.PRIO_PROCESS, pid, NICE)


class PostgresPriority:
    """The bench's nice value for PostgreSQL's scheduling autogroup while it runs.

    With autogroups, a backend's own nice value counts only inside PostgreSQL's
    session; against the servers (whose sessions run at NICE) the group's counts.
    Left at 0, a backend pinned next to a server at -10 gets a tenth of the core
    and the server waits on it. `restore` puts the group back as it was.
    """

    def __init__(self) -> None:
        self._path: Path | None = None
        self._was = ""

    def raise_(self) -> None:
        if not NICE:
            return
        try:
            postmaster = subprocess.run(
                ["pgrep", "-o", "-x", "postgres"], capture_output=True, text=True, check=False
            ).stdout.split()
            if not postmaster:
                return
            path = Path(f"/proc/{postmaster[0]}/autogroup")
            self._was = path.read_text().split()[-1]
            path.write_text(str(NICE))
            self._path = path
        except OSError:
            self._path = None

    def restore(self) -> None:
        if self._path is not None:
            with contextlib.suppress(OSError):
                self._path.write_text(self._was)
            self._path = None


def pinned(cpu: str) -> list[str]:
    """The command prefix that pins a process (and its children) to `cpu`."""
    prefix = ["nice", "-n", str(NICE)] if NICE else []
    return [*prefix, "taskset", "-c", cpu]


@functools.cache
def serve_options(expense_auth: str) -> frozenset[str]:
    """The options `expense-auth serve` accepts (they change as the service grows)."""
    result = subprocess.run(
        [expense_auth, "serve", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    return frozenset(re.findall(r"--[a-z][a-z-]+", result.stdout))


def serve_args(expense_auth: str, port: int, app: str | None = None) -> list[str]:
    """`expense-auth serve` on `port`; a bench app (`app`) gets no admin listener.

    The service's own admin listener (when it has one) stays on, on a free port
    (ADMIN_PORT=0 in the environment), as in production.
    """
    args = [expense_auth, "serve", "--port", str(port)]
    if app is not None:
        args += ["--app", app]
        if "--no-admin" in serve_options(expense_auth):
            args.append("--no-admin")
    return args


def free_port() -> int:
    """A port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of these processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def core_busy_seconds(cpu: str) -> float:
    """Busy time of one core since boot (all processes), from /proc/stat."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                values = [int(v) for v in line.split()[1:]]
                idle = values[3] + values[4]  # idle + iowait
                return (sum(values[:8]) - idle) / CLK_TCK
    raise RuntimeError(f"no cpu{cpu} in /proc/stat")


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak_rss(pids: Sequence[int]) -> None:
    """Reset VmHWM to the current RSS (Linux clear_refs 5)."""
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def rss_mb(pids: Sequence[int]) -> float:
    """The largest VmRSS among the processes, in MiB."""
    return max((_status_kb(pid, "VmRSS") for pid in pids), default=0) / 1024


def peak_rss_mb(pids: Sequence[int]) -> float:
    """The largest VmHWM among the processes, in MiB."""
    return max((_status_kb(pid, "VmHWM") for pid in pids), default=0) / 1024


@dataclass
class Server:
    """One server process tree pinned to the server core."""

    name: str
    process: subprocess.Popen[bytes]
    ports: dict[str, int]
    log_path: Path
    pids: list[int] = field(default_factory=list)

    def refresh_pids(self) -> list[int]:
        """The process tree now (pyvoy's Envoy child, tsx's node child)."""
        self.pids = descendants(self.process.pid)
        return self.pids

    @property
    def python_pid(self) -> int:
        """The deepest process: Envoy (which runs the Python app) for pyvoy servers."""
        return self.pids[-1] if self.pids else self.process.pid

    def stop(self) -> None:
        """SIGTERM to the whole process group (tsx does not pass it on), then SIGKILL."""
        with contextlib.suppress(OSError):
            os.killpg(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=20)
        with contextlib.suppress(OSError):
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever is left of the group
        self.process.wait()


def spawn(
    name: str,
    args: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    log_dir: Path,
    ports: dict[str, int],
) -> Server:
    """Start `args` pinned to the server core; children (Envoy, node) inherit the pin."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*pinned(SERVER_CPU), *args],
            cwd=cwd,
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    raise_priority(process.pid)
    return Server(name=name, process=process, ports=ports, log_path=log_path)


def wait_listening(server: Server, *, timeout_s: float = 90, pattern: str | None = None) -> None:
    """Until every port accepts connections (and the log matches `pattern`, if given)."""
    deadline = time.monotonic() + timeout_s
    regex = re.compile(pattern) if pattern else None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            break
        if regex is not None:
            match = regex.search(server.log_path.read_text(errors="replace"))
            if match is None:
                time.sleep(0.1)
                continue
            server.ports.update({k: int(v) for k, v in match.groupdict().items()})
        if all(_accepts(port) for port in server.ports.values()):
            server.refresh_pids()
            return
        time.sleep(0.1)
    raise RuntimeError(
        f"{server.name} did not start:\n{server.log_path.read_text(errors='replace')[-4000:]}"
    )


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
