"""Reading and validating request bodies: size limit, UTF-8 JSON, schema errors as OpenAI 400s."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from skyfleet.errors import InvalidJSONError, InvalidRequestError, PayloadTooLargeError

M = TypeVar("M", bound=BaseModel)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequestError("Content-Length must be a non-negative integer.")
        if int(declared) > limit:
            raise PayloadTooLargeError(f"The request body is larger than the limit of {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"The request body is larger than the limit of {limit} bytes.")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def read_json_object(request: Request, limit: int) -> dict[str, Any]:
    body = await read_body(request, limit)
    if not body:
        raise InvalidJSONError("The request body is empty; a JSON object is required.")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # orjson's message names the position, never the content.
        raise InvalidJSONError(
            f"We could not parse the JSON body of your request (it must be UTF-8 JSON): {exc.args[0][:120]}"
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    return data


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal"}


def _field_path(loc: tuple[int | str, ...]) -> str | None:
    """The field path of a validation error, without pydantic's union-member tags (``input.str``)."""
    parts = [str(p) for p in loc if not (isinstance(p, str) and (p in _TYPE_TAGS or any(c in p for c in "[-:(")))]
    return ".".join(parts) or None


def validate(model: type[M], data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_input=False, include_url=False)[0]
        loc = _field_path(err["loc"])
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise InvalidRequestError(f"Invalid value for '{loc}': {err['msg']}{more}", param=loc) from None
