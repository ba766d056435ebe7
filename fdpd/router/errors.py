"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with the right status.

Every client mistake is a 4xx with a message that says what was wrong; a 500 is only ever an
internal bug, logged with its traceback and answered with a generic message.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
# Seconds a client is told to wait when the core gives no hint of its own.
DEFAULT_RETRY_AFTER = 1
# Type tags pydantic puts in ``loc`` for union members; they are not part of the field path.
_BASIC_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after",
               "function-before", "function-wrap", "json-or-python", "lax-or-strict"}


class APIError(Exception):
    """An error to answer with ``status`` and an OpenAI error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | int | None = None, error_type: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or error_type_for(status)
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)

    def response(self) -> JSONResponse:
        return ErrorResponse(self.body(), status_code=self.status, headers=self.headers)


class ErrorResponse(JSONResponse):
    """An error body as ASCII JSON: messages quote what the client sent, and a lone surrogate
    (valid in a JSON string, not in UTF-8) must not turn the 4xx into a failed 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


def error_type_for(status: int) -> str:
    if status >= 500:
        return "server_error"
    return _TYPES.get(status, "invalid_request_error")


def error_body(message: str, error_type: str, param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def internal_error() -> APIError:
    return APIError(500, "internal server error; the router log has the details",
                    code="internal_error")


def _field_path(loc: tuple[Any, ...]) -> str | None:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(str(item))
        elif isinstance(item, str) and not ("[" in item or item in _BASIC_TAGS
                                            or item[:1].isupper()):
            parts.append(item)
    return ".".join(parts) or None


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """The first problem of a failed body validation, as a 400 naming the field in ``param``."""
    if not errors:
        return bad_request("the request body is invalid")
    first = errors[0]
    loc = _strip_body(first.get("loc", ()))
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return bad_request(f"the request body is not valid JSON{': ' + detail if detail else ''}")
    if not loc and kind == "missing":
        return bad_request("the request body is missing; send a JSON object")
    if not loc:
        return bad_request(f"the request body must be a JSON object ({first.get('msg', '')})")
    param = _field_path(loc)
    # A union (e.g. str | list[str]) reports one error per member: name the field they share
    # and the deepest problem, which is usually the informative one.
    paths = [_field_path(_strip_body(e.get("loc", ()))) or "" for e in errors]
    if len(set(paths)) > 1:
        common = _common_prefix([p.split(".") for p in paths])
        if common:
            deepest = max(range(len(errors)), key=lambda i: len(paths[i].split(".")))
            return bad_request(f"{common}: invalid type or value ({paths[deepest]}: "
                               f"{errors[deepest].get('msg', '')})", common)
    return bad_request(f"{param}: {first.get('msg', 'invalid value')}", param)


def _common_prefix(paths: list[list[str]]) -> str:
    prefix: list[str] = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        prefix.append(parts[0])
    return ".".join(prefix)


def _strip_body(loc: Any) -> tuple[Any, ...]:
    loc = tuple(loc)
    return loc[1:] if loc[:1] == ("body",) else loc


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            detail = f"no route {request.method} {request.url.path}"
        return APIError(exc.status_code, detail, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        # Last resort (Starlette still logs the traceback): even a bug answers OpenAI-style.
        return internal_error().response()
