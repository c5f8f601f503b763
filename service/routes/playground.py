"""`GET /playground`: a browser page for trying best-of-N by hand (docs/playground.md).

Plain static files, no build step. The page needs no key to load: it calls the public /v1 API from the
browser with the key the user types, so auth, limits and errors are exactly what any client gets. Kept out
of the OpenAPI schema, which documents the API, not this page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import FileResponse

from rlaifv.service.errors import NotFound
from rlaifv.service.json_body import JsonBodyRoute

STATIC = Path(__file__).resolve().parent.parent / "static" / "playground"
ASSETS = {
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
    "sample.png": "image/png",
}
HEADERS = {
    # Only the page's own files run; images are data/blob URLs; fetch goes to this origin only.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(route_class=JsonBodyRoute, tags=["playground"], include_in_schema=False)


# HEAD as GET without the body (FileResponse sends only the headers), as /healthz: uptime checkers probe with HEAD.
@router.get("/playground")
@router.head("/playground")
async def playground() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/playground/{asset}")
@router.head("/playground/{asset}")
async def playground_asset(asset: Annotated[str, PathParam(max_length=64)]) -> FileResponse:
    """Serves only the files listed in ASSETS, so no path can reach outside the folder."""
    media_type = ASSETS.get(asset)
    if media_type is None:
        raise NotFound(f"no playground file '{asset}'", param="asset")
    return FileResponse(STATIC / asset, media_type=media_type, headers=HEADERS)
