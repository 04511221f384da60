"""HTTP errors in OpenAI's error shape, so the ``openai`` SDK and other clients show the message as it is."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from appliance.service.openai_format import error_body


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.headers = status, message, kind, code, headers


async def api_error_response(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return JSONResponse(error_body(exc.message, exc.kind, exc.code), status_code=exc.status, headers=exc.headers)
