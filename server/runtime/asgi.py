"""The module pyvoy imports in its Envoy process: `server.runtime.asgi:app`, `:admin_app`
and `:forward_auth_app`.

pyvoy needs module attributes (not a factory or an object), so the apps are
built at import, by the one wiring point, from the environment that
`expense-auth serve` has checked. The listeners share one process, so they
share the store, the rate-limit counters and the metrics.
"""

from __future__ import annotations

from server.app import app_from_environment

_built = app_from_environment()
app = _built.asgi
admin_app = _built.admin
forward_auth_app = _built.forward_auth
