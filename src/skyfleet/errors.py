"""The one error module: every error a client can see, and how lower layers map into it.

Every error is rendered in the OpenAI shape::

    {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}

The tree (HTTP status, OpenAI ``type``, ``code``)::

    SkyfleetError                              500 server_error
    ├── StoredDataUnreadableError              500  code=stored_data_unreadable
    │       (a stored record failed to decrypt: tampered, or its tenant's key was shredded;
    │        ``crypto.DecryptionError`` is mapped to it at the API boundary)
    ├── InvalidRequestError                    400 invalid_request_error
    │   ├── InvalidJSONError                   400  code=invalid_json
    │   ├── ContextLengthExceededError         400  code=context_length_exceeded
    │   └── PayloadTooLargeError               413  code=payload_too_large
    ├── AuthenticationError                    401 invalid_request_error code=invalid_api_key
    │       (opaque on purpose: missing, malformed, unknown, revoked and expired
    │        credentials all collapse into this one answer and fail closed)
    ├── PermissionDeniedError                  403 permission_error
    ├── NotFoundError                          404 invalid_request_error code=not_found
    │   ├── ModelNotFoundError                 404  code=model_not_found
    │   └── RouteNotFoundError                 404  code=unknown_url
    ├── MethodNotAllowedError                  405 invalid_request_error code=method_not_allowed
    ├── ConflictError                          409 invalid_request_error code=conflict
    ├── RateLimitError                         429 type=requests|tokens code=rate_limit_exceeded
    │       (carries Retry-After and OpenAI's x-ratelimit-* headers; gateway/ratelimit.py)
    ├── BudgetExceededError                    429 type=insufficient_quota code=budget_exceeded
    │       (a hard budget; carries x-should-retry: false and, for daily/monthly, Retry-After)
    ├── ServiceUnavailableError                503 service_unavailable (carries Retry-After)
    │   ├── NoReplicaAvailableError            503  code=no_replica_available
    │   └── ShuttingDownError                  503  code=shutting_down
    └── UpstreamError                          502 upstream_error
        ├── UpstreamConnectError               502  code=upstream_unreachable (retryable)
        └── UpstreamTimeoutError               504  code=upstream_timeout

Lower-layer errors never cross a boundary unmapped:

* engine (HTTP) errors are mapped by :func:`from_upstream` (an engine's 4xx stays a 4xx
  of ours, its 5xx becomes :class:`UpstreamError`; the engine's text is never echoed);
* transport errors (aiohttp) are mapped in ``gateway.upstream``;
* store errors (SQLAlchemy) are mapped in ``state.repositories``;
* crypto errors (one opaque ``DecryptionError``) are mapped in ``api.app``.

Messages never contain keys, tokens, prompts or completions.
"""

from __future__ import annotations

import re
from typing import Any

import orjson


class SkyfleetError(Exception):
    """Base of every error skyfleet reports to a client."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str = "internal server error",
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body_bytes(self) -> bytes:
        return orjson.dumps(self.body())


class StoredDataUnreadableError(SkyfleetError):
    code = "stored_data_unreadable"

    def __init__(self) -> None:
        super().__init__("A stored record could not be read.")


class InvalidRequestError(SkyfleetError):
    status = 400
    type = "invalid_request_error"


class InvalidJSONError(InvalidRequestError):
    code = "invalid_json"


class ContextLengthExceededError(InvalidRequestError):
    code = "context_length_exceeded"


class PayloadTooLargeError(InvalidRequestError):
    status = 413
    code = "payload_too_large"


class AuthenticationError(SkyfleetError):
    """Any credential failure. Deliberately says nothing about *why*."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def __init__(self) -> None:
        super().__init__(
            "Incorrect or missing API key. Pass a valid key as 'Authorization: Bearer <key>'.",
            headers={"WWW-Authenticate": 'Bearer realm="skyfleet"'},
        )


class PermissionDeniedError(SkyfleetError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class NotFoundError(SkyfleetError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"

    def __init__(self, model: str, available: list[str]) -> None:
        super().__init__(
            f"The model '{model[:200]}' does not exist. Available models: {', '.join(available) or 'none'}.",
            param="model",
        )


class RouteNotFoundError(NotFoundError):
    code = "unknown_url"


class MethodNotAllowedError(SkyfleetError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class ConflictError(SkyfleetError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class RateLimitError(SkyfleetError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, kind: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers=headers)
        if kind is not None:
            self.type = kind  # OpenAI's: "requests" or "tokens", the limit that was hit


class BudgetExceededError(SkyfleetError):
    """A hard budget would be exceeded (cost/budgets.py): OpenAI's ``insufficient_quota`` type, our code.

    Clients should not retry (``x-should-retry: false`` tells the OpenAI SDKs so); ``Retry-After``
    says when a daily or monthly budget resets.
    """

    status = 429
    type = "insufficient_quota"
    code = "budget_exceeded"


class ServiceUnavailableError(SkyfleetError):
    status = 503
    type = "service_unavailable"
    code = "service_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 1, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(max(1, retry_after_s))})


class NoReplicaAvailableError(ServiceUnavailableError):
    code = "no_replica_available"


class ShuttingDownError(ServiceUnavailableError):
    code = "shutting_down"


class UpstreamError(SkyfleetError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"
    #: True when the request certainly never reached the engine, so it may be retried elsewhere.
    retryable: bool = False


class UpstreamConnectError(UpstreamError):
    code = "upstream_unreachable"
    retryable = True


class UpstreamTimeoutError(UpstreamError):
    status = 504
    code = "upstream_timeout"


_SAFE_TYPE = re.compile(r"[A-Za-z_]{1,64}")
_WINDOW = re.compile(r"(?:context length is|context size \(|n_ctx[ =:]*)\s*(\d{1,9})")


def from_upstream(status: int, body: bytes) -> SkyfleetError:
    """Map an engine's HTTP error response to one of ours.

    No engine text reaches the client or the logs verbatim: an engine's message can quote the
    request (a prompt, a stop string), so every message here is rebuilt from the status, a
    sanitised error type, and the numbers of a context-length error.
    """
    message = ""
    etype: str | None = None
    extra: dict[str, object] = {}
    try:
        parsed = orjson.loads(body)
        err = parsed.get("error", {}) if isinstance(parsed, dict) else {}
        if isinstance(err, dict):
            message = str(err.get("message") or "")[:500]
            raw_type = err.get("type")
            etype = raw_type if isinstance(raw_type, str) and _SAFE_TYPE.fullmatch(raw_type) else None
            extra = err
        elif isinstance(err, str):
            message = err[:500]
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        pass
    if etype == "exceed_context_size_error" or ("context" in message and ("exceed" in message or "maximum" in
                                                                          message)):
        n_ctx = extra.get("n_ctx")
        found = _WINDOW.search(message)
        window = n_ctx if isinstance(n_ctx, int) else (int(found.group(1)) if found else None)
        detail = f" The model's context window is {window} tokens." if window else ""
        return ContextLengthExceededError(
            f"The prompt plus the requested output tokens exceed the model's context length.{detail} "
            "Shorten the input or lower max_tokens.", param="messages")
    kind = f", {etype}" if etype else ""
    if status == 404:
        return NotFoundError(f"The engine could not find what the request named (HTTP 404{kind}).")
    if 400 <= status < 500 and status != 429:
        return InvalidRequestError(f"The engine rejected the request (HTTP {status}{kind}); check the "
                                   "sampling parameters against the engine's OpenAI-compatible API.")
    if status == 429 or status == 503:
        return UpstreamConnectError(f"the engine is overloaded (HTTP {status})")
    return UpstreamError(f"the engine failed (HTTP {status})")
