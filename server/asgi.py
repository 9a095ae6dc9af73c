"""The module pyvoy imports in its Envoy process: `server.asgi:app`.

pyvoy needs a module attribute (not a factory or an object), so the app is
built at import from the environment, which `expense-auth serve` has checked.
"""

from __future__ import annotations

from server import logs
from server.app import create_app
from server.config import load_config
from server.receive_fix import ReceiveAfterBodyFix

config = load_config()
logs.configure(production=config.production, level=config.log_level)
app = ReceiveAfterBodyFix(create_app(config).asgi)
