"""A PostgreSQL server of the test's own, for tests that stop and start it.

The machine's shared server (tests/support/postgres.py) must never be stopped;
this one is: `initdb` into a fresh directory, `postgres` on a free port of
127.0.0.1 (no Unix socket), stopped and started with `pg_ctl`. PostgreSQL refuses
to run as root, so when the tests run as root its commands run as the `postgres`
OS user (`runuser`), in a directory that user owns. The binaries come from
TEST_POSTGRES_BIN (default: Debian's PostgreSQL 15). A missing binary fails the
test: nothing is skipped.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support.ports import free_port

BIN = Path(os.environ.get("TEST_POSTGRES_BIN", "/usr/lib/postgresql/15/bin"))
OS_USER = "postgres"
TIMEOUT_S = 120


class PostgresServer:
    """One throwaway cluster: `init`, `start`, `stop(mode)`, `start` again, `destroy`."""

    def __init__(self) -> None:
        for tool in ("initdb", "pg_ctl", "postgres"):
            if not (BIN / tool).is_file():
                raise RuntimeError(
                    f"{BIN / tool} is missing: install PostgreSQL 15 (Debian postgresql-15) "
                    "or point TEST_POSTGRES_BIN at its bin directory"
                )
        # Not under pytest's tmp_path: its top directory is private to our user, and
        # the postgres user could not reach a data directory inside it.
        self.root = Path(tempfile.mkdtemp(prefix="expense-auth-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = free_port()
        self._as_root = os.geteuid() == 0
        if self._as_root:
            owner = pwd.getpwnam(OS_USER)
            os.chown(self.root, owner.pw_uid, owner.pw_gid)

    @property
    def url(self) -> str:
        """DATABASE_URL of its `postgres` database (trust authentication)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = [*(["runuser", "-u", OS_USER, "--"] if self._as_root else []), *args]
        done = subprocess.run(command, capture_output=True, timeout=TIMEOUT_S, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed ({done.returncode}):\n"
                f"{done.stdout.decode(errors='replace')}{done.stderr.decode(errors='replace')}\n"
                f"{self.logs()[-3000:]}"
            )

    def init(self) -> PostgresServer:
        """Create the cluster: superuser `postgres`, trust authentication, TCP only."""
        self._run(
            str(BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
            "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions",
        )  # fmt: skip
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"\nport = {self.port}\n"
                "listen_addresses = '127.0.0.1'\n"
                "unix_socket_directories = ''\n"
                "max_connections = 60\n"
                "shared_buffers = 16MB\n"
            )
        return self

    def enable_tls(self, cert: Path, key: Path) -> None:
        """Serve TLS with this certificate and key (PEM), from the next start on."""
        for source, name in ((cert, "server.crt"), (key, "server.key")):
            target = self.data / name
            shutil.copyfile(source, target)
            os.chmod(target, 0o600)
            if self._as_root:
                owner = pwd.getpwnam(OS_USER)
                os.chown(target, owner.pw_uid, owner.pw_gid)
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")

    def start(self) -> None:
        """Start it and wait until it accepts connections."""
        self._run(
            str(BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
            "-w", "-t", str(TIMEOUT_S), "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """`pg_ctl stop -m fast` (disconnect everyone, checkpoint) or `immediate`
        (quit at once, as a crash: the next start recovers from the WAL)."""
        self._run(
            str(BIN / "pg_ctl"), "-D", str(self.data), "-m", mode,
            "-w", "-t", str(TIMEOUT_S), "stop",
        )  # fmt: skip

    def running(self) -> bool:
        """Whether its postmaster is up."""
        return (self.data / "postmaster.pid").exists()

    def logs(self) -> str:
        """The server's log so far."""
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def destroy(self) -> None:
        """Stop it if running and remove its files."""
        if self.running():
            # Already gone, maybe: the files go anyway.
            with contextlib.suppress(RuntimeError):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
