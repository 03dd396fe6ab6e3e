"""ASGI middleware: the edge (request ids, proxies, admin allowlist), accounting (the
exchange of every request) and gateway pinning across reloads."""
