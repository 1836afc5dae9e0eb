"""The webmail page: static files served at ``/``, and the sanitised HTML of a message.

The page is plain files in gateway/webmail/ (HTML, one ES module, one stylesheet): no
build step, no CDN. It talks only to the JSON API under /v1 with the bearer token it
keeps in sessionStorage.

Mail HTML comes from strangers. ``GET /v1/messages/{id}/html`` answers it cleaned by
nh3 (an allow-list: no script, no event handler, no SVG, no form, no javascript: URL,
no CSS that can fetch), with remote images removed unless ``remote_images=true``
(a remote image tells the sender when and where the mail was read). The page shows it
in an iframe with ``sandbox`` (no allow-scripts) and its own CSP: defence in depth, so
a sanitiser bug still runs nothing and fetches nothing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import nh3
from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, RedirectResponse
from pydantic import BaseModel

from gateway.http_api import User, _email_id
from mailgrid.clients import MetadataClient
from mailgrid.errors import NotFound

STATIC_DIR = Path(__file__).resolve().parent / "webmail"
# The page's own policy. Scripts and connections: our origin only (no inline script).
# Images from anywhere and inline styles: the sandboxed reading frame is an about:srcdoc
# document, which inherits this policy, and it must be able to show what the user asked
# for ("show images") and the mail's own inline styles; its own stricter policy (a meta
# CSP in the frame) still applies on top (policies intersect).
PAGE_CSP = ("default-src 'self'; script-src 'self'; connect-src 'self'; "
            "img-src 'self' data: blob: https: http:; style-src 'self' 'unsafe-inline'; "
            "frame-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")
_PAGE_HEADERS = {
    "Content-Security-Policy": PAGE_CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}

# What mail may keep: nh3's defaults (ammonia's allow-list: no script, style, svg,
# form, iframe, object) plus the presentational attributes HTML mail relies on.
_TAGS = set(nh3.ALLOWED_TAGS) | {"font", "center"}
_ATTRIBUTES = {tag: set(attrs) for tag, attrs in nh3.ALLOWED_ATTRIBUTES.items()}
_ATTRIBUTES.setdefault("*", set()).update({"style", "align", "valign", "dir", "title"})
_ATTRIBUTES.setdefault("font", set()).update({"color", "face", "size"})
for _tag in ("table", "td", "th", "tr", "tbody", "thead"):
    _ATTRIBUTES.setdefault(_tag, set()).update({"bgcolor", "width", "height", "border",
                                                "cellpadding", "cellspacing"})
_ATTRIBUTES.setdefault("img", set()).update({"src", "alt", "width", "height"})
# CSS properties kept in style attributes: none of them takes a url() (no fetch).
_STYLE = {"color", "background-color", "font", "font-family", "font-size", "font-style",
          "font-weight", "text-align", "text-decoration", "line-height", "margin",
          "margin-top", "margin-bottom", "margin-left", "margin-right", "padding",
          "padding-top", "padding-bottom", "padding-left", "padding-right", "border",
          "border-collapse", "width", "max-width", "height", "vertical-align",
          "white-space", "display"}
_SCHEMES = {"http", "https", "mailto", "data"}
_REMOTE = re.compile(r"^\s*(https?:)?//", re.IGNORECASE)
_DATA_IMAGE = re.compile(r"^\s*data:image/(png|gif|jpeg|webp);", re.IGNORECASE)
_URL_ATTRS = {"src", "href", "cite", "longdesc", "background", "action"}


class SafeHtml(BaseModel):
    # The message's HTML part, sanitised; "" when it has none.
    html: str
    # Remote images removed (0 when remote_images=true).
    blocked_images: int


def sanitize(html: str, *, remote_images: bool = False) -> SafeHtml:
    """``html`` reduced to what cannot run or fetch (remote images only if asked)."""
    blocked = 0

    def keep(tag: str, attr: str, value: str) -> str | None:
        nonlocal blocked
        if attr not in _URL_ATTRS:
            return value
        if value.lstrip().lower().startswith("data:"):
            # data: only as an image: a data: link could be a page of the sender's.
            return value if tag == "img" and _DATA_IMAGE.match(value) else None
        if tag == "img" and attr == "src" and _REMOTE.match(value) and not remote_images:
            blocked += 1
            return None
        return value

    cleaned = nh3.clean(html, tags=_TAGS, attributes=_ATTRIBUTES, attribute_filter=keep,
                        url_schemes=_SCHEMES, filter_style_properties=_STYLE,
                        link_rel="noopener noreferrer",
                        # A relative URL would point at our own origin (the API).
                        url_relative="deny")
    return SafeHtml(html=cleaned, blocked_images=blocked)


def pages_router() -> APIRouter:
    """``/`` and its assets (mounted at the root, outside /v1)."""
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8",
                            headers=_PAGE_HEADERS)

    @router.get("/webmail")
    async def webmail() -> RedirectResponse:
        return RedirectResponse("/")

    @router.get("/webmail/{name}")
    async def asset(name: str) -> FileResponse:
        # A fixed list, never a path from the request: no traversal to think about.
        media_type = _ASSETS.get(name)
        if media_type is None:
            raise NotFound("no such file")
        return FileResponse(STATIC_DIR / name, media_type=media_type, headers=_PAGE_HEADERS)

    return router


def html_router(metadata: MetadataClient) -> APIRouter:
    """``GET /v1/messages/{id}/html`` (mounted under /v1 with the other API routers)."""
    router = APIRouter(tags=["mail"], responses={
        401: {"description": "Missing, invalid or expired token"},
        404: {"description": "No such message (or not yours)"},
    })

    @router.get("/messages/{message_id}/html")
    async def message_html(
        user: User, message_id: str,
        remote_images: Annotated[bool, Query()] = False,
    ) -> SafeHtml:
        """The message's HTML part sanitised for display (see gateway.webmail)."""
        message = await metadata.get_message(user, _email_id(message_id))
        return sanitize(message.html, remote_images=remote_images)

    return router
