"""Running the service: pyvoy (Envoy) serving the ASGI app, and the module it imports."""
