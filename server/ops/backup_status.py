"""When the last verified backup was taken, for the backup-age alert.

The scheduled backup job and `expense-auth backup` (a separate process, often
run from cron) both record a successful backup in one small file in DATA_DIR;
the metrics read it when scraped. A file rather than a value in memory, so that
a restart does not forget a backup taken the night before, and a backup taken
by the command counts as much as one taken by the server.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from server.storage.files import private_dir

STATUS_FILE = "last-backup"


def record_success(data_dir: Path, *, now_s: float) -> None:
    """Remember that a verified backup was completed at `now_s` (Unix seconds)."""
    private_dir(data_dir)
    path = data_dir / STATUS_FILE
    partial = path.with_name(f".{STATUS_FILE}.{os.getpid()}")
    partial.write_text(f"{now_s:.3f}\n")
    partial.replace(path)  # atomic: a scrape never reads half a number


def last_success(data_dir: Path) -> float:
    """Unix time of the last recorded successful backup; 0 when there has been none."""
    with contextlib.suppress(OSError, ValueError):
        return float((data_dir / STATUS_FILE).read_text().strip())
    return 0.0
