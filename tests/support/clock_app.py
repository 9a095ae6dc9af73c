"""The real service with a file-controlled clock, for expiry tests (imported by pyvoy)."""

from __future__ import annotations

import os
from pathlib import Path

from server.app import app_from_environment
from tests.support.clock import FileClock

clock = FileClock(Path(os.environ["TEST_CLOCK_FILE"]))
_built = app_from_environment(clock=clock)
app = _built.asgi
admin_app = _built.admin
forward_auth_app = _built.forward_auth
