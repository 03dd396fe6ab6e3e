"""The admin dashboard at /admin/ui: one static page whose data all comes from the admin API.

The page, its script and its style sheet hold no data, so they are served without the master
key; the page asks for the key and sends it with every admin API call it makes. Their headers
let nothing but this origin's own files load, and no site frame them.
"""

from __future__ import annotations

from importlib.resources import files

from litestar import Response, get
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath

from app.errors import NotFound

SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}
"""On the page and its files: only this origin's own scripts, styles and API; never framed."""

PAGE = "admin.html"
ASSETS = {
    "admin.js": "text/javascript",
    "admin.css": "text/css",
}
"""The files the page loads from /admin/ui/, with their media types."""


def routes() -> list[HTTPRouteHandler]:
    """The dashboard's route handlers; its files (`app/api/admin/static/`) are read once."""
    static = files("app.api.admin") / "static"
    page = (static / PAGE).read_bytes()
    assets = {name: (static / name).read_bytes() for name in ASSETS}

    @get(["/admin/ui", "/admin/ui/"], include_in_schema=False)
    async def admin_ui() -> Response[bytes]:
        """The dashboard page."""
        return _static(page, "text/html")

    @get("/admin/ui/{name:str}", include_in_schema=False)
    async def admin_ui_asset(name: FromPath[str]) -> Response[bytes]:
        """The page's script and style sheet."""
        if name not in assets:
            raise NotFound(f"no dashboard file {name!r}", param="name")
        return _static(assets[name], ASSETS[name])

    return [admin_ui, admin_ui_asset]


def _static(content: bytes, media_type: str) -> Response[bytes]:
    return Response(content=content, media_type=media_type, headers=SECURITY_HEADERS)
