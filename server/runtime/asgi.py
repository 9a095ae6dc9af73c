"""The module pyvoy imports in its Envoy process: `server.runtime.asgi:app` and `:admin_app`.

pyvoy needs module attributes (not a factory or an object), so the apps are
built at import, by the one wiring point, from the environment that
`expense-auth serve` has checked. Both listeners share one process, so they
share the store and the metrics.
"""

from __future__ import annotations

from server.app import app_from_environment

_built = app_from_environment()
app = _built.asgi
admin_app = _built.admin
