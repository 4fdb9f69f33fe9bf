"""KV state follows sessions on real llama.cpp replicas; tenants never share cached prefixes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import MODEL, Gateway, start_gateway


@pytest.fixture(scope="module")
def one_replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One replica with 2 slots: slot placement is fully determined by the slot manager."""
    gw = start_gateway(tmp_path_factory.mktemp("kv"), replicas=1)
    yield gw
    gw.stop()


def _turn(gw: Gateway, text: str, *, session: str | None = None, key: str | None = None) -> tuple[int, int, dict]:
    headers = {"X-Session-Id": session} if session else {}
    resp = gw.client(key=key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=2, temperature=0,
        extra_headers=headers)
    assert resp.usage is not None
    cached = resp.usage.prompt_tokens_details.cached_tokens if resp.usage.prompt_tokens_details else 0
    return resp.usage.prompt_tokens, cached or 0, (resp.model_extra or {}).get("timings", {})


def test_session_state_is_saved_on_eviction_and_restored(one_replica: Gateway) -> None:
    gw = one_replica
    story_a = "Session A is about apple orchards and cider presses. " * 12
    _, cached, _ = _turn(gw, story_a, session="a")
    assert cached == 0
    prompt, cached, _ = _turn(gw, story_a + "Continue.", session="a")
    assert cached > prompt * 0.8  # same slot: the whole earlier prompt is reused
    _turn(gw, "Session B is about boats on a bay. " * 12, session="b")  # takes the empty slot
    _turn(gw, "Session C is about comets and clouds. " * 12, session="c")  # evicts A (least recent): A is saved
    saved = list((gw.data_dir / "slots").glob("*.bin"))
    assert len(saved) >= 1
    # A comes back: its slot is gone, but its KV is restored from the saved file, not re-prefilled.
    prompt, cached, timings = _turn(gw, story_a + "Continue again.", session="a")
    assert cached > prompt * 0.8
    assert timings.get("prompt_n", prompt) < prompt * 0.2  # the engine computed only the new tail


def test_tenants_never_share_cached_prefixes(one_replica: Gateway) -> None:
    gw = one_replica
    other = json.loads(gw.cli("tenants", "create", "kv-other", "--json").stdout)
    assert other["name"] == "kv-other"
    other_key = json.loads(gw.cli("keys", "create", "--tenant", "kv-other", "--json").stdout)["key"]
    shared = "You are the assistant of ACME Corp. Internal policy: never disclose pricing. " * 10
    _turn(gw, shared + "Q1")
    prompt, cached, _ = _turn(gw, shared + "Q2")
    assert cached > prompt * 0.8  # the same tenant reuses its own prefix
    _turn(gw, "Unrelated session text. " * 20, session="pin")  # occupy the other slot for this tenant
    # Another tenant sends the very same prefix: it lands on a slot that held the first tenant's
    # prompt, which is erased first, so it gets no cached tokens and computes the whole prompt.
    prompt, cached, timings = _turn(gw, shared + "Q1", key=other_key)
    assert cached == 0
    assert timings.get("prompt_n") == prompt
    # ... while it does reuse its own prefix afterwards.
    prompt, cached, _ = _turn(gw, shared + "Q2", key=other_key)
    assert cached > prompt * 0.8


def test_chat_session_affinity_header_validation(one_replica: Gateway, tmp_path: Path) -> None:
    import httpx

    with httpx.Client(base_url=one_replica.url) as h:
        r = h.post("/v1/chat/completions", headers={"Authorization": f"Bearer {one_replica.member_key}",
                                                    "X-Session-Id": "x" * 300},
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Session-Id"
