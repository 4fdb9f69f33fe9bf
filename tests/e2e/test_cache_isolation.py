"""Prefix-cache isolation between tenants on REAL llama.cpp replicas (one replica, so tenants share it).

Tenant A's repeated prompt is served from its cache (cached tokens reported, TTFT far lower);
tenant B sending the very same prompt right after gets nothing cached and no TTFT advantage:
no cache-timing side channel between tenants. With the slot manager (default) and without it
(then llama.cpp picks slots itself and the gateway turns prompt reuse off on a shared replica).
"""

from __future__ import annotations

import secrets
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.harness import MODEL, Gateway, start_gateway, wait_until

#: ~1,000 prompt tokens with SmolLM2's tokenizer: below the 2,048 a slot holds (ctx 4096, 2 slots).
WORDS = 250


def _prompt(words: int = WORDS) -> list[dict[str, str]]:
    nonce = secrets.token_hex(4)  # a fresh prompt: nothing after the chat template's head is cached yet
    notes = " ".join(f"note{i} alpha" for i in range(words))
    return [{"role": "user", "content": f"[{nonce}] Summarise these notes: {notes}"}]


def _ask(client: openai.OpenAI, messages: list[dict[str, str]]) -> tuple[float, int, int]:
    """(TTFT seconds, prompt tokens, cached prompt tokens) of one streamed request."""
    start = time.perf_counter()
    ttft = None
    usage = None
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        if ttft is None and chunk.choices:
            ttft = time.perf_counter() - start
        if chunk.usage is not None:
            usage = chunk.usage
    assert ttft is not None and usage is not None and usage.prompt_tokens_details is not None
    return ttft, usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens or 0


def _tenant_client(gw: Gateway) -> openai.OpenAI:
    name = "t" + secrets.token_hex(4)
    assert gw.admin("POST", "/admin/v1/tenants", json={"name": name}).status_code == 201
    r = gw.admin("POST", "/admin/v1/keys", json={"tenant": name, "role": "member"})
    assert r.status_code == 201, r.text
    return gw.client(key=r.json()["key"], timeout=120)


def _start(tmp_path: Path, **settings: str) -> Gateway:
    gw = start_gateway(tmp_path, replicas=1, local__threads="1", **settings)
    wait_until(lambda: "Admin key" in gw.keys, 10, what="bootstrap keys on stdout")
    return gw


@pytest.fixture(scope="module")
def gw_slots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = _start(tmp_path_factory.mktemp("gw-slots"))
    yield gw
    gw.stop(timeout_s=60)


@pytest.fixture
def gw_no_slots(tmp_path: Path) -> Iterator[Gateway]:
    gw = _start(tmp_path, local__kv_slot_manager="false")
    yield gw
    gw.stop(timeout_s=60)


def test_identical_prompt_of_another_tenant_is_not_served_from_cache(gw_slots: Gateway) -> None:
    a = _tenant_client(gw_slots)
    cold, warm, other = [], [], []
    for _ in range(3):
        prompt = _prompt()
        cold.append(_ask(a, prompt))
        warm.append(_ask(a, prompt))
        # A new tenant each round: its slot last held another tenant (B of the round before), so
        # nothing at all may be cached for it, not even the chat template's first tokens.
        other.append(_ask(_tenant_client(gw_slots), prompt))
    for (_, n_cold, _), (_, n_warm, c_warm), (_, n_b, c_b) in zip(cold, warm, other, strict=True):
        assert 900 < n_cold == n_warm == n_b < 2000
        assert c_warm >= n_warm - 2  # A's own repeat: all but the last token(s) from the cache
        assert c_b == 0  # B: nothing from A's cache
    t_cold, t_warm, t_b = (statistics.median(t for t, _, _ in rows) for rows in (cold, warm, other))
    print(f"\nTTFT medians (s): A cold {t_cold:.3f}  A warm {t_warm:.3f}  B same prompt {t_b:.3f}")
    assert t_warm < 0.5 * t_cold  # the cache is real and visible in timing...
    assert t_b > 0.6 * t_cold  # ...and B gets no part of that advantage
    assert t_b > 3 * t_warm


def test_a_prompt_another_tenant_sent_earlier_is_not_restored_for_b(gw_slots: Gateway) -> None:
    """llama.cpp keeps prompts it moves out of a slot in a host-memory cache and loads them into any
    slot whose new prompt matches; the local replicas run with that cache off (``cache_ram 0``)."""
    a, b = _tenant_client(gw_slots), _tenant_client(gw_slots)
    _ask(b, _prompt(80))  # B's slot holds B's own prompt
    earlier = _prompt(80)
    _ask(a, earlier)
    _ask(a, _prompt(80))  # A's next prompt replaces the earlier one in A's slot
    _, n, cached = _ask(b, earlier)  # B, in its own slot, probes: did anyone send this?
    assert n > 300 and cached <= 32  # at most the chat template's head, from B's own previous prompt


def test_without_the_slot_manager_a_shared_replica_reuses_no_prompt(gw_no_slots: Gateway) -> None:
    a, b = _tenant_client(gw_no_slots), _tenant_client(gw_no_slots)
    prompt = _prompt(120)
    _ask(a, prompt)
    _, n, cached = _ask(a, prompt)
    assert cached >= n - 2  # one tenant so far: llama.cpp's own prompt cache works
    _, _, cached_b = _ask(b, prompt)
    assert cached_b == 0  # llama.cpp would hand B A's slot (same prompt): the gateway sent cache_prompt=false
    _, _, cached_a = _ask(a, prompt)
    assert cached_a == 0  # the replica is shared now: no prompt reuse for anyone until it restarts
