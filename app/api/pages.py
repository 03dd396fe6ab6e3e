"""Static pages the gateway serves itself (the admin dashboard, the API docs): each a page and
the files it loads, read from the package once, answered with headers that let the page load
nothing but this origin's own files and keep any site from framing it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
"""On every page and its files: only this origin's own scripts, styles and API; never framed."""


def static_page(
    package: str,
    folder: str,
    paths: Sequence[str],
    page: str,
    assets: Mapping[str, str],
    what: str,
) -> list[HTTPRouteHandler]:
    """Route handlers serving `page` at `paths` and its `assets` (name -> media type) below
    `paths[0]`, all read from `package`'s `folder` now; `what` names the page in a 404."""
    source = files(package) / folder
    content = (source / page).read_bytes()
    loaded = {name: (source / name).read_bytes() for name in assets}

    @get(list(paths), include_in_schema=False)
    async def serve_page() -> Response[bytes]:
        return _static(content, "text/html")

    @get(f"{paths[0]}/{{name:str}}", include_in_schema=False)
    async def serve_asset(name: FromPath[str]) -> Response[bytes]:
        if name not in loaded:
            raise NotFound(f"no {what} file {name!r}", param="name")
        return _static(loaded[name], assets[name])

    return [serve_page, serve_asset]


def _static(content: bytes, media_type: str) -> Response[bytes]:
    return Response(content=content, media_type=media_type, headers=SECURITY_HEADERS)
