"""The error tree renders the OpenAI shape, and engine errors are mapped at the boundary."""

from __future__ import annotations

import orjson
import pytest

from skyfleet import errors as e


def test_shape() -> None:
    body = orjson.loads(e.ModelNotFoundError("x", ["a", "b"]).body_bytes())
    assert body == {"error": {"message": "The model 'x' does not exist. Available models: a, b.",
                              "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}


def test_authentication_error_is_opaque() -> None:
    a, b = e.AuthenticationError(), e.AuthenticationError()
    assert a.body() == b.body() and a.status == 401
    assert a.headers["WWW-Authenticate"].startswith("Bearer")


def test_retry_after() -> None:
    err = e.NoReplicaAvailableError("none", retry_after_s=3)
    assert err.status == 503 and err.headers == {"Retry-After": "3"}


@pytest.mark.parametrize(
    ("status", "body", "expected", "code"),
    [
        (400, b'{"error":{"code":400,"message":"request (3001 tokens) exceeds the available context size '
              b'(2048 tokens)","type":"exceed_context_size_error"}}', e.ContextLengthExceededError,
         "context_length_exceeded"),
        (400, b'{"error":{"message":"bad grammar","type":"invalid_request_error"}}', e.InvalidRequestError, None),
        (404, b'{"error":"nope"}', e.NotFoundError, "not_found"),
        (500, b"<html>internal</html>", e.UpstreamError, "upstream_error"),
        (503, b'{"error":{"message":"Loading model"}}', e.UpstreamConnectError, "upstream_unreachable"),
        (422, b"not json at all", e.InvalidRequestError, None),
    ],
)
def test_from_upstream(status: int, body: bytes, expected: type, code: str | None) -> None:
    err = e.from_upstream(status, body)
    assert type(err) is expected
    assert 400 <= err.status < 600
    if code:
        assert err.code == code


def test_upstream_5xx_body_is_not_echoed() -> None:
    err = e.from_upstream(500, b'{"error":{"message":"SECRET-PROMPT-TEXT"}}')
    assert "SECRET" not in err.message


@pytest.mark.parametrize("status", [400, 404, 422, 500, 503])
def test_upstream_messages_are_never_echoed(status: int) -> None:
    # An engine message may quote the request (a prompt, a stop string): nothing of it comes back.
    for body in (b'{"error":{"message":"CANARY-4242 in your prompt","type":"CANARY-4242"}}',
                 b'{"error":"CANARY-4242"}', b'{"error":{"message":"context exceeded: CANARY-4242 (2048)"}}'):
        err = e.from_upstream(status, body)
        assert "CANARY" not in err.message and "CANARY" not in err.body_bytes().decode()


def test_context_error_keeps_the_window_size() -> None:
    llama = b'{"error":{"code":400,"message":"x","type":"exceed_context_size_error","n_prompt_tokens":3001,"n_ctx":2048}}'
    assert "2048 tokens" in e.from_upstream(400, llama).message
    vllm = (b'{"error":{"message":"This model\'s maximum context length is 4096 tokens. However, you requested '
            b'5000 tokens.","type":"BadRequestError"}}')
    err = e.from_upstream(400, vllm)
    assert err.code == "context_length_exceeded" and "4096 tokens" in err.message
    llama_text = b'{"error":{"message":"request (3001 tokens) exceeds the available context size (2048 tokens)"}}'
    assert "2048 tokens" in e.from_upstream(400, llama_text).message


def test_replica_log_lines_that_may_quote_a_request_are_redacted() -> None:
    from skyfleet.engines.llamacpp import redact_line

    line = (b'0.01.016.543 W srv    operator(): got exception: {"error":{"code":400,"message":"JSON schema error '
            b'at #: unrecognized type CANARY"}}\n')
    assert redact_line(line) == b"0.01.016.543 W srv    operator(): got exception: [redacted: may quote a request]\n"
    plain = b"0.00.001.440 I srv          init: build_info: b0-unknown\n"
    assert redact_line(plain) == plain
