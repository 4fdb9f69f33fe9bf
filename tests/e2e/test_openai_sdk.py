"""The official openai SDK against the real gateway and real llama.cpp replicas."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.e2e.harness import MODEL, Gateway


def test_models_list(gateway: Gateway) -> None:
    models = gateway.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert gateway.client().models.retrieve(MODEL).id == MODEL


def test_chat_completion_non_streaming(gateway: Gateway) -> None:
    resp = gateway.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=12, temperature=0
    )
    assert resp.object == "chat.completion"
    assert resp.model == MODEL
    text = resp.choices[0].message.content
    assert text and text.strip()
    u = resp.usage
    assert u is not None
    assert u.prompt_tokens >= 5  # the chat template alone is several tokens
    assert 1 <= u.completion_tokens <= 12
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert resp.choices[0].finish_reason in ("stop", "length")


def test_chat_completion_streaming_with_usage(gateway: Gateway) -> None:
    stream = gateway.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count to five."}], max_tokens=16, stream=True,
        stream_options={"include_usage": True}, temperature=0,
    )
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert "".join(pieces).strip()
    assert finish in ("stop", "length")
    assert usage is not None and 1 <= usage.completion_tokens <= 16 and usage.prompt_tokens > 0
    # One content piece per generated token, give or take the role/finish chunks.
    assert abs(len(pieces) - usage.completion_tokens) <= 1


def test_streaming_without_usage_has_no_usage_chunk(gateway: Gateway) -> None:
    chunks = list(gateway.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, stream=True))
    assert chunks and all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)


def test_completions_non_streaming_and_streaming(gateway: Gateway) -> None:
    client = gateway.client()
    resp = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert resp.object == "text_completion" and resp.choices[0].text
    assert resp.usage is not None and resp.usage.prompt_tokens >= 3 and 1 <= resp.usage.completion_tokens <= 8
    chunks = list(client.completions.create(model=MODEL, prompt="The sky is", max_tokens=6, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices).strip()
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_request_id_header(gateway: Gateway) -> None:
    raw = gateway.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert raw.headers["x-request-id"].startswith("req_")


def test_metrics_move(gateway: Gateway) -> None:
    labels = {"tenant": "default", "model": MODEL}
    before_req = gateway.metric("skyfleet_requests_total", **labels, status="completed")
    before_prompt = gateway.metric("skyfleet_prompt_tokens_total", **labels)
    before_completion = gateway.metric("skyfleet_completion_tokens_total", **labels)
    resp = gateway.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say yes."}], max_tokens=4)
    assert resp.usage is not None
    assert gateway.metric("skyfleet_requests_total", **labels, status="completed") == before_req + 1
    assert gateway.metric("skyfleet_prompt_tokens_total", **labels) == before_prompt + resp.usage.prompt_tokens
    assert gateway.metric("skyfleet_completion_tokens_total", **labels) == (
        before_completion + resp.usage.completion_tokens)
    assert gateway.metric("skyfleet_request_duration_seconds_count", model=MODEL) >= 1
    assert gateway.metric("skyfleet_replicas", model=MODEL, state="ready") == 2


def test_health_endpoints(gateway: Gateway) -> None:
    with httpx.Client(base_url=gateway.url) as h:
        assert h.get("/healthz").json() == {"status": "ok"}
        ready = h.get("/readyz").json()
        assert ready["status"] == "ready" and ready["ready_replicas"] == {MODEL: 2}


def test_sdk_raises_typed_errors(gateway: Gateway) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        gateway.client().chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError) as unauthorised:
        gateway.client(key="sk-sf-" + "A" * 43).models.list()
    assert unauthorised.value.code == "invalid_api_key"
