"""The module pyvoy imports in its Envoy process: `server.runtime.asgi:app` and `:admin_app`.

pyvoy needs module attributes (not a factory or an object), so the apps are
built at import from the environment, which `expense-auth serve` has checked.
Both listeners share one process, so they share the store and the metrics.
"""

from __future__ import annotations

import os
from pathlib import Path

from server.app import create_app
from server.config import load_config
from server.ops import logs
from server.ops.readiness import SHUTDOWN_MARKER_ENV
from server.runtime.receive_fix import ReceiveAfterBodyFix

config = load_config()
logs.configure(production=config.production, level=config.log_level)
_marker = os.environ.get(SHUTDOWN_MARKER_ENV)
_built = create_app(config, shutdown_marker=Path(_marker) if _marker else None)
app = ReceiveAfterBodyFix(_built.asgi)
admin_app = ReceiveAfterBodyFix(_built.admin)
