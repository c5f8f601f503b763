"""Optional API keys: `Authorization: Bearer <key>` (what the OpenAI client sends) or `X-API-Key: <key>`.

Keys are kept only as SHA-256 digests and compared in constant time against
every configured digest. With no keys configured, everything is open.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from rlaifv.service.errors import Overloaded, ServiceError, Unauthorized

bearer = HTTPBearer(auto_error=False, description="API key as a bearer token (RLAIFV_API_KEYS).")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key (RLAIFV_API_KEYS).")


class KeyRing:
    def __init__(self, digests: list[bytes]) -> None:
        self._digests = list(digests)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    @property
    def count(self) -> int:
        return len(self._digests)

    def check(self, key: str) -> bool:
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        found = False
        for known in self._digests:  # no early exit: timing does not depend on which key matched
            found |= hmac.compare_digest(digest, known)
        return found


def _authenticate(
    request: Request, credentials: HTTPAuthorizationCredentials | None, header_key: str | None
) -> str | None:
    keys: KeyRing = request.app.state.keys
    if not keys.enabled:
        return None
    key = header_key or (credentials.credentials if credentials is not None else None)
    if not key:
        raise Unauthorized(
            "an API key is required: send 'Authorization: Bearer <key>'",
            code="missing_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not keys.check(key):
        raise Unauthorized(
            "the API key is not valid",
            code="invalid_api_key",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]


async def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    header_key: Annotated[str | None, Depends(api_key_header)],
) -> str | None:
    """Dependency of every /v1 route. Returns a short key fingerprint (for rate limits), or None when auth is off.
    With rate limits on, refused keys count against their client address's own quota: 300 wrong keys a second
    were all answered 401, never slowed."""
    try:
        key_id = _authenticate(request, credentials, header_key)
    except Unauthorized:
        await _count_refusal(request)
        raise
    request.state.key_id = key_id
    return key_id


async def _count_refusal(request: Request) -> None:
    limiter = getattr(request.app.state, "limiter", None)
    if limiter is None:
        return
    address = request.client.host if request.client else "unknown"
    retry = await limiter.hit(f"refused-key:{address}")
    if retry is not None:
        request.app.state.metrics.rejected.labels(reason="rate_limited").inc()
        raise Overloaded(
            "too many requests without a valid API key from this client address",
            code="rate_limited",
            headers={"Retry-After": str(retry)},
        )


async def require_metrics_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    header_key: Annotated[str | None, Depends(api_key_header)],
) -> None:
    if request.app.state.settings.protect_metrics:
        _authenticate(request, credentials, header_key)


def auth_refusal(request: Request) -> ServiceError | None:
    """Why this /v1 request's key is refused (None: accepted, or keys are off). For errors raised before the
    route's dependencies run (a body that is not JSON): a client without a valid key hears 401 whatever it
    sent, as for any other body, not a 400 about a body it had no right to send."""
    keys: KeyRing | None = getattr(request.app.state, "keys", None)
    if keys is None or not keys.enabled or not request.url.path.startswith("/v1/"):
        return None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    bearer_key = token.strip() if scheme.lower() == "bearer" and token.strip() else None
    credentials = HTTPAuthorizationCredentials(scheme=scheme, credentials=bearer_key) if bearer_key else None
    try:
        _authenticate(request, credentials, request.headers.get("x-api-key"))
    except ServiceError as exc:
        return exc
    return None


KeyDep = Annotated[str | None, Depends(require_api_key)]
