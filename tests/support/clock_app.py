"""The real service with a file-controlled clock, for expiry tests (imported by pyvoy)."""

from __future__ import annotations

import os
from pathlib import Path

from server.app import create_app
from server.config import load_config
from server.ops import logs
from server.ops.readiness import SHUTDOWN_MARKER_ENV
from server.runtime.receive_fix import ReceiveAfterBodyFix
from tests.support.clock import FileClock

config = load_config()
logs.configure(production=config.production, level=config.log_level)
clock = FileClock(Path(os.environ["TEST_CLOCK_FILE"]))
_marker = os.environ.get(SHUTDOWN_MARKER_ENV)
_built = create_app(config, clock=clock, shutdown_marker=Path(_marker) if _marker else None)
app = ReceiveAfterBodyFix(_built.asgi)
admin_app = ReceiveAfterBodyFix(_built.admin)
