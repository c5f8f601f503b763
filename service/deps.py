"""Typed dependencies: route signatures read as plain types, objects come from `app.state`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from rlaifv.service.auth import require_api_key
from rlaifv.service.errors import Overloaded, Unavailable
from rlaifv.service.serving import Serving


def get_serving(request: Request) -> Serving:
    serving: Serving | None = getattr(request.app.state, "serving", None)
    if serving is None:
        raise Unavailable("the model is not loaded yet", code="not_ready", headers={"Retry-After": "5"})
    return serving


async def enforce_limits(request: Request, key_id: Annotated[str | None, Depends(require_api_key)]) -> None:
    """Auth first, then the per-client rate limit (when configured)."""
    limiter = getattr(request.app.state, "limiter", None)
    if limiter is None:
        return
    client = key_id or (request.client.host if request.client else "unknown")
    retry = await limiter.hit(client)
    if retry is not None:
        request.app.state.metrics.rejected.labels(reason="rate_limited").inc()
        who = "this API key" if key_id else "this client address"
        raise Overloaded(f"rate limit exceeded for {who}", code="rate_limited", headers={"Retry-After": str(retry)})


ServingDep = Annotated[Serving, Depends(get_serving)]
