"""Domain errors, and the one place that maps them (and framework errors) to HTTP."""

from __future__ import annotations

import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class TriageError(Exception):
    """Base of errors a user may see. Messages must never contain patient data."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotAuthenticated(TriageError):
    status, code = 401, "not_authenticated"


class NotPermitted(TriageError):
    status, code = 403, "forbidden"


class NotFound(TriageError):
    status, code = 404, "not_found"


class Conflict(TriageError):
    status, code = 409, "conflict"


class BodyTooLarge(TriageError):
    status, code = 413, "body_too_large"


class UnsupportedMediaType(TriageError):
    status, code = 415, "unsupported_media_type"


class InvalidRequest(TriageError):
    """A well-formed request that breaks a domain rule (e.g. an override with no reason)."""

    status, code = 422, "invalid_request"


class InvalidStudy(TriageError):
    status, code = 422, "invalid_study"


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


def install_handlers(app: FastAPI) -> None:
    """Every error leaves as ``{"error": {"code", "message"}}``."""

    @app.exception_handler(TriageError)
    async def _domain(_request: Request, exc: TriageError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            headers = {"Retry-After": str(max(1, math.ceil(retry_after)))}
        return JSONResponse(error_body(exc.code, exc.message), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # Field locations and messages only: the offending input values are not echoed back.
        parts = [
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}"
            for err in exc.errors()
        ]
        return JSONResponse(error_body("invalid_request", "; ".join(parts)), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code)
