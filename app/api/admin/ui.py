"""The admin dashboard at /admin/ui: one static page whose data all comes from the admin API.

The page, its script and its style sheet hold no data, so they are served without the master
key; the page asks for the key and sends it with every admin API call it makes. They are
served like every page of the gateway's own (`app.api.pages`).
"""

from __future__ import annotations

from litestar.handlers import HTTPRouteHandler

from app.api.pages import static_page

PAGE = "admin.html"
ASSETS = {
    "admin.js": "text/javascript",
    "admin.css": "text/css",
}
"""The files the page loads from /admin/ui/, with their media types."""


def routes() -> list[HTTPRouteHandler]:
    """The dashboard's route handlers; its files (`app/api/admin/static/`) are read once."""
    return static_page(
        "app.api.admin", "static", ["/admin/ui", "/admin/ui/"], PAGE, ASSETS, "dashboard"
    )
