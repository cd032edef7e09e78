"""``ADAPTSERVE_API_KEY``: a bearer token on every route but health, metrics and the API description."""

from __future__ import annotations

import hmac
import os

from adaptserve.service.http import error_response

# Routes that stay open when ADAPTSERVE_API_KEY is set (health, metrics, API description, BentoML's UI).
OPEN_PATHS = ("/livez", "/readyz", "/healthz", "/metrics", "/docs", "/docs.json", "/schema.json", "/",
              "/v2/health/live", "/v2/health/ready")
OPEN_PREFIXES = ("/static_content/", "/assets/")

class ApiKeyMiddleware:
    """When ``ADAPTSERVE_API_KEY`` is set, require ``Authorization: Bearer <key>`` on every route but the
    open ones (health, metrics, API docs); answer 401 otherwise. Pure ASGI, so the body is not touched."""

    def __init__(self, app, key: str | None = None):
        self.app = app
        self.key = (key if key is not None else os.environ.get("ADAPTSERVE_API_KEY", "")).encode()

    @staticmethod
    def is_open(path: str) -> bool:
        return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)

    async def __call__(self, scope, receive, send):
        if not self.key or scope["type"] != "http" or self.is_open(scope.get("path", "")):
            return await self.app(scope, receive, send)
        auth = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        message = "missing API key: send Authorization: Bearer <key>" if not auth else "invalid API key"
        await error_response(401, message)(scope, receive, send)
