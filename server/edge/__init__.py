"""The HTTP edge: security headers, CORS, and routing requests to the Connect applications."""
