"""Who may use the service: ``--api-key`` / ``--api-key-file`` (``Authorization: Bearer KEY``, which the openai
client sends from its ``api_key``)."""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

OPEN_PATHS = ("/health",)  # load balancers and orchestrators probe it without a key


class BearerKey:
    """ASGI middleware: a request without one of ``keys`` as its bearer token gets 401, as OpenAI answers one."""

    def __init__(self, app, keys: list[str]):
        self.app = app
        self.keys = [key.encode() for key in keys]

    def allowed(self, scope) -> bool:
        header = Headers(scope=scope).get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = token.strip().encode(errors="replace")
        return any(hmac.compare_digest(given, key) for key in self.keys)  # no timing hint of how much matched

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self.allowed(scope):
            return await self.app(scope, receive, send)
        response = JSONResponse({"error": {"message": "a valid API key is required: send it as "
                                           "'Authorization: Bearer KEY'", "type": "invalid_request_error",
                                           "code": "invalid_api_key"}},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
