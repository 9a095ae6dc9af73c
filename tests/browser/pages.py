"""A static file server for the test page, on loopback, for any host name.

The browser reaches it as several origins (`app.expense.localhost`,
`evil.localhost`, ...): Chromium resolves every `*.localhost` name to loopback,
and the server ignores the Host header, so one port serves every page origin.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class _Handler(SimpleHTTPRequestHandler):
    disable_nagle_algorithm = True
    extensions_map = {  # noqa: RUF012 (the base class declares it as a plain dict)
        ".html": "text/html; charset=utf-8",
        ".js": "text/javascript; charset=utf-8",
        "": "application/octet-stream",
    }

    def end_headers(self) -> None:
        # Every run bundles anew; a cached app.js would test yesterday's page.
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: pytest shows the driver's record of the traffic instead."""


@contextmanager
def serve_directory(root: Path) -> Iterator[int]:
    """Serve `root` on 127.0.0.1 at a free port, yielded, until the block ends."""
    handler = functools.partial(_Handler, directory=str(root))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, name="test-pages", daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
