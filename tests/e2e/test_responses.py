"""The Responses and Conversations APIs through the official SDK, on real llama.cpp replicas."""

from __future__ import annotations

import itertools
import json

import httpx
import openai
import pytest

from tests.e2e.harness import MODEL, Gateway


def test_previous_response_id_chains_five_turns(gateway: Gateway) -> None:
    client = gateway.client()
    first = client.responses.create(
        model=MODEL, input="The secret code word is BANANA. Reply with OK.", max_output_tokens=8, temperature=0)
    assert first.status in ("completed", "incomplete") and first.output_text
    previous, inputs = first, [first.usage.input_tokens]
    for turn in range(2, 6):
        resp = client.responses.create(model=MODEL, input=f"Turn {turn}: say one short word.",
                                       previous_response_id=previous.id, max_output_tokens=6, temperature=0)
        assert resp.previous_response_id == previous.id
        inputs.append(resp.usage.input_tokens)
        previous = resp
    # Every turn carries the whole history: the input grows by at least the previous turn's text.
    assert all(b > a + 5 for a, b in itertools.pairwise(inputs))
    # The model sees the fact planted in turn 1, four turns back (greedy decoding: deterministic).
    final = client.responses.create(model=MODEL, input="What is the secret code word?",
                                    previous_response_id=previous.id, max_output_tokens=12, temperature=0)
    assert "BANANA" in final.output_text
    assert final.usage.input_tokens > inputs[-1]
    items = client.responses.input_items.list(first.id)
    assert "BANANA" in json.dumps([i.model_dump() for i in items.data])
    stored = client.responses.retrieve(final.id)
    assert stored.id == final.id and stored.output_text == final.output_text


def test_streaming_response_events(gateway: Gateway) -> None:
    client = gateway.client()
    events = list(client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=8, stream=True))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert "response.output_text.delta" in types
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = events[-1].response
    assert done.output_text == deltas and done.usage.output_tokens >= 1
    # Completed means stored: the response can be fetched right away.
    assert client.responses.retrieve(done.id).output_text == deltas


def test_conversations_lifecycle(gateway: Gateway) -> None:
    client = gateway.client()
    conv = client.conversations.create(metadata={"topic": "demo"},
                                       items=[{"type": "message", "role": "user", "content": "I like tea."}])
    assert conv.id.startswith("conv_") and conv.metadata == {"topic": "demo"}
    r1 = client.responses.create(model=MODEL, input="What drink do I like?", conversation=conv.id,
                                 max_output_tokens=8)
    r2 = client.responses.create(model=MODEL, input="And one more word.", conversation=conv.id, max_output_tokens=4)
    assert r2.usage.input_tokens > r1.usage.input_tokens
    items = client.conversations.items.list(conv.id, order="asc")
    roles = [i.role for i in items.data]
    assert roles == ["user", "user", "assistant", "user", "assistant"]
    first_item = items.data[0]
    assert client.conversations.items.retrieve(first_item.id, conversation_id=conv.id).id == first_item.id
    client.conversations.items.delete(first_item.id, conversation_id=conv.id)
    assert len(client.conversations.items.list(conv.id).data) == 4
    updated = client.conversations.update(conv.id, metadata={"topic": "tea"})
    assert updated.metadata == {"topic": "tea"}
    added = client.conversations.items.create(conv.id, items=[{"type": "message", "role": "user", "content": "x"}])
    assert len(added.data) == 1
    assert client.conversations.delete(conv.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conv.id)


def test_delete_response(gateway: Gateway) -> None:
    client = gateway.client()
    r = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"input": "x", "previous_response_id": "resp_x", "conversation": "conv_x"}, 400, "conversation"),
        ({"input": "x", "previous_response_id": "resp_doesnotexist"}, 404, None),
        ({"input": "x", "conversation": "conv_doesnotexist"}, 404, None),
        ({"input": []}, 400, "input"),
        ({"input": [{"role": "wizard", "content": "x"}]}, 400, "input.0.role"),
        ({"input": [{"type": "function_call", "name": "f"}]}, 400, "input.0.type"),
        ({"input": "x", "tools": [{"type": "function", "name": "f"}]}, 400, "tools"),
        ({"input": "x", "max_output_tokens": 100_000}, 400, "max_output_tokens"),
        ({"input": "x", "conversation": "conv_x", "store": False}, 400, "store"),
        ({"input": 5}, 400, "input"),
    ],
)
def test_responses_bad_input(gateway: Gateway, body: dict, status: int, param: str | None) -> None:
    with httpx.Client(base_url=gateway.url, timeout=30) as h:
        r = h.post("/v1/responses", json={"model": MODEL, **body},
                   headers={"Authorization": f"Bearer {gateway.member_key}"})
    assert r.status_code == status, r.text
    if param:
        assert r.json()["error"]["param"] == param


def test_history_longer_than_context(gateway: Gateway) -> None:
    client = gateway.client()
    long = "This sentence pads the conversation history. " * 170  # ~1,400 tokens a turn; slots hold 2,048
    r1 = client.responses.create(model=MODEL, input=long, max_output_tokens=2)
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, input=long, previous_response_id=r1.id, max_output_tokens=2)
    assert info.value.code == "context_length_exceeded" and "truncation" in info.value.message
    r2 = client.responses.create(model=MODEL, input=long, previous_response_id=r1.id, max_output_tokens=2,
                                 truncation="auto")
    assert r2.status in ("completed", "incomplete")
    assert r2.usage.input_tokens < 2048


def test_sessions_export_and_retention_cli(gateway: Gateway, tmp_path) -> None:
    client = gateway.client()
    conv = client.conversations.create(items=[{"type": "message", "role": "user", "content": "export-me-7c1"}])
    client.responses.create(model=MODEL, input="Say hi.", conversation=conv.id, max_output_tokens=2)
    out = tmp_path / "export.jsonl"
    done = gateway.cli("sessions", "export", "--tenant", "default", "--out", str(out))
    assert "exported" in done.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert any(conv.id in json.dumps(r) and "export-me-7c1" in json.dumps(r) for r in records)
    unknown = gateway.cli("sessions", "export", "--tenant", "nobody", check=False)
    assert unknown.returncode == 1 and "nobody" in unknown.stderr
    gateway.cli("tenants", "retention", "default", "--days", "30")
    tenants = {t["name"]: t for t in json.loads(gateway.cli("tenants", "list", "--json").stdout)}
    assert tenants["default"]["retention_days"] == 30
    gateway.cli("tenants", "retention", "default", "--forever")
    tenants = {t["name"]: t for t in json.loads(gateway.cli("tenants", "list", "--json").stdout)}
    assert tenants["default"]["retention_days"] is None
    bad = gateway.cli("tenants", "retention", "default", check=False)
    assert bad.returncode == 2
