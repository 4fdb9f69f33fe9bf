"""The simulated engine: its timing model (manual clock), its text, and its HTTP side end to end."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from skyfleet.clock import ManualClock
from skyfleet.engines.sim import (
    ContextLengthError,
    ProfileError,
    SimModel,
    SimProfile,
    SimRequest,
    build_app,
    load_profile,
)
from skyfleet.engines.sim.model import RequestState
from skyfleet.engines.sim.prefix_cache import PrefixCache
from skyfleet.engines.sim.text import VOCAB, count_tokens, detokenize, generate, render_chat
from tests.threaded_server import serve_in_thread

MODEL = "sim-model"


def prompt_of(tokens: int, tag: str = "p") -> str:
    """A prompt of exactly ``tokens`` tokens (4 characters each), distinct per ``tag``."""
    body = (tag + "-" * 4 * tokens)[: 4 * tokens]
    assert count_tokens(body) == tokens
    return body


def run_until_done(model: SimModel, clock: ManualClock, reqs: list[SimRequest], limit: int = 100_000) -> None:
    """Advance the clock from event to event until every request is done."""
    for _ in range(limit):
        pending = [r for r in reqs if not r.done]
        if not pending:
            return
        ats = [model.next_update_at(r, each_token=False) for r in pending]
        # the clock has not moved since the last advance(), so asking must not finish anything
        assert None not in ats, "a request due by now was left pending by advance()"
        at = min(a for a in ats if a is not None)
        assert at != math.inf, "a waiting request with nothing running would wait forever"
        clock.advance(max(at - clock.now(), 0.0))
        model.advance()
        states = [(r.state, r.tokens_out) for r in reqs]
        model.advance()
        assert [(r.state, r.tokens_out) for r in reqs] == states, "advance() is not idempotent"
    raise AssertionError("the simulation did not converge")


# -- the timing model ----------------------------------------------------------------------------


def test_ttft_grows_with_uncached_prompt_tokens() -> None:
    profile = SimProfile(ttft_base_s=0.01, prefill_tokens_per_s=1000.0)
    clock = ManualClock()
    model = SimModel(profile, clock)
    short = model.submit(prompt_of(10, "a"), max_tokens=4)
    long = model.submit(prompt_of(1000, "b"), max_tokens=4)
    assert short.ttft == pytest.approx(0.01 + 10 / 1000)
    assert long.ttft == pytest.approx(0.01 + 1000 / 1000)
    assert short.cached_tokens == long.cached_tokens == 0
    clock.advance(0.019)
    assert model.poll(short) == 0
    clock.advance(0.002)
    assert model.poll(short) == 1
    assert model.poll(long) == 0


def test_repeated_prompt_hits_prefix_cache_and_has_lower_ttft() -> None:
    profile = SimProfile(ttft_base_s=0.01, prefill_tokens_per_s=1000.0, block_tokens=16)
    clock = ManualClock()
    model = SimModel(profile, clock)
    prompt = prompt_of(1000)
    first = model.submit(prompt, max_tokens=4)
    run_until_done(model, clock, [first])
    again = model.submit(prompt, max_tokens=4)
    # every full block but the last (at least one token is always computed)
    assert again.cached_tokens == (1000 - 1) // 16 * 16
    assert again.ttft == pytest.approx(0.01 + (1000 - again.cached_tokens) / 1000)
    assert again.ttft is not None and first.ttft is not None and again.ttft < first.ttft
    # a prompt sharing only the first 100 tokens hits only the blocks inside them
    partial = model.submit(prompt[:400] + "x" * 400, max_tokens=4)
    assert partial.cached_tokens == 100 // 16 * 16


def test_prefix_cache_covers_previous_answer_in_a_conversation() -> None:
    profile = SimProfile(ttft_base_s=0.0, tpot_base_s=0.0, block_tokens=4)
    clock = ManualClock()
    model = SimModel(profile, clock)
    turn1 = [{"role": "user", "content": "tell me a story about the sea " * 4}]
    prompt1 = render_chat(turn1)
    ids, _ = generate(prompt1, 0, 1024, 32, True)
    answer = detokenize(ids)
    r1 = model.submit(prompt1, max_tokens=32, output=answer)
    run_until_done(model, clock, [r1])
    turn2 = [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": "more"}]
    r2 = model.submit(render_chat(turn2), max_tokens=8)
    # every full block of the first prompt and its answer (4 tokens = 16 characters a block)
    assert r2.cached_tokens == len(prompt1 + answer) // 16 * 4 > count_tokens(prompt1)


def test_tpot_grows_with_batch_size() -> None:
    profile = SimProfile(
        ttft_base_s=0.0, prefill_tokens_per_s=math.inf, tpot_base_s=0.01, tpot_batch_slope=0.5
    )
    assert profile.tpot_s(1) == pytest.approx(0.01)
    assert profile.tpot_s(3) == pytest.approx(0.02)

    clock = ManualClock()
    model = SimModel(profile, clock)
    alone = model.submit(prompt_of(8, "solo"), max_tokens=11)
    run_until_done(model, clock, [alone])
    assert alone.finished_at == pytest.approx(10 * 0.01)

    clock = ManualClock()
    model = SimModel(profile, clock)
    batch = [model.submit(prompt_of(8, f"b{i}"), max_tokens=11) for i in range(3)]
    assert model.poll(batch[0]) == 1  # first token at once (free prefill)
    assert model.next_update_at(batch[0]) == pytest.approx(0.02)  # then one every tpot(3)
    run_until_done(model, clock, batch)
    assert [r.finished_at for r in batch] == pytest.approx([10 * 0.02] * 3)


def test_batch_shrinking_speeds_up_the_rest() -> None:
    profile = SimProfile(
        ttft_base_s=0.0, prefill_tokens_per_s=math.inf, tpot_base_s=0.01, tpot_batch_slope=1.0
    )
    clock = ManualClock()
    model = SimModel(profile, clock)
    short = model.submit(prompt_of(4, "s"), max_tokens=3)  # 2 decode steps at tpot(2) = 0.02
    long = model.submit(prompt_of(4, "l"), max_tokens=5)  # 2 at 0.02, then 2 alone at 0.01
    run_until_done(model, clock, [short, long])
    assert short.finished_at == pytest.approx(0.04)
    assert long.finished_at == pytest.approx(0.06)


def test_requests_queue_when_kv_is_full_and_are_admitted_fifo() -> None:
    profile = SimProfile(
        ttft_base_s=0.0, prefill_tokens_per_s=math.inf, tpot_base_s=0.01, kv_capacity_tokens=100
    )
    clock = ManualClock()
    model = SimModel(profile, clock)
    a = model.submit(prompt_of(50, "a"), max_tokens=10)  # 60 tokens of KV
    b = model.submit(prompt_of(50, "b"), max_tokens=10)  # does not fit beside a
    c = model.submit(prompt_of(5, "c"), max_tokens=5)  # would fit, but waits behind b
    assert (a.state, b.state, c.state) == (RequestState.RUNNING, RequestState.WAITING, RequestState.WAITING)
    stats = model.stats()
    assert (stats.running, stats.waiting, stats.kv_used_tokens) == (1, 2, 60)
    assert stats.kv_usage == pytest.approx(0.6)

    run_until_done(model, clock, [a])
    assert b.state is RequestState.RUNNING and c.state is RequestState.RUNNING
    assert b.admitted_at == c.admitted_at == a.finished_at
    assert model.stats().waiting == 0
    # queueing counts in the TTFT the client sees
    assert b.ttft == pytest.approx(a.finished_at)


def test_cancel_frees_kv_and_admits_the_next() -> None:
    profile = SimProfile(tpot_base_s=1.0, kv_capacity_tokens=100)
    clock = ManualClock()
    model = SimModel(profile, clock)
    a = model.submit(prompt_of(50, "a"), max_tokens=40)
    b = model.submit(prompt_of(50, "b"), max_tokens=40)
    assert b.state is RequestState.WAITING
    clock.advance(0.5)
    model.cancel(a)
    assert a.state is RequestState.CANCELLED and a.finish_reason == "abort"
    assert b.state is RequestState.RUNNING and b.admitted_at == pytest.approx(0.5)
    model.cancel(a)  # idempotent
    assert model.stats().kv_used_tokens == 90


def test_max_num_seqs_bounds_the_batch() -> None:
    profile = SimProfile(max_num_seqs=2)
    model = SimModel(profile, ManualClock())
    reqs = [model.submit(prompt_of(4, str(i)), max_tokens=4) for i in range(3)]
    assert [r.state for r in reqs] == [RequestState.RUNNING, RequestState.RUNNING, RequestState.WAITING]


def test_a_request_that_can_never_fit_is_refused() -> None:
    model = SimModel(SimProfile(kv_capacity_tokens=100, max_model_len=1000), ManualClock())
    with pytest.raises(ContextLengthError, match="exceeds"):
        model.submit(prompt_of(95), max_tokens=10)
    model = SimModel(SimProfile(max_model_len=50), ManualClock())
    with pytest.raises(ContextLengthError):
        model.submit(prompt_of(45), max_tokens=10)


def test_prefix_cache_lru_eviction_trims_prefixes_from_the_end() -> None:
    cache = PrefixCache(3)
    cache.insert([b"a1", b"a2"])
    cache.insert([b"b1"])
    assert cache.match([b"a1", b"a2", b"a3"]) == 2  # touches a1 and a2
    assert cache.insert([b"c1"]) == 1  # evicts b1, the least recently used
    assert b"b1" not in cache and len(cache) == 3
    cache.insert([b"d1"])  # evicts a2 (deeper than a1, so older)
    assert cache.match([b"a1", b"a2"]) == 1
    assert cache.match([b"a1"], limit=0) == 0


def test_prefix_cache_capacity_in_the_model() -> None:
    profile = SimProfile(ttft_base_s=0.0, tpot_base_s=0.0, block_tokens=16, prefix_cache_blocks=8)
    clock = ManualClock()
    model = SimModel(profile, clock)
    old = prompt_of(16 * 6, "old")
    run_until_done(model, clock, [model.submit(old, max_tokens=1)])
    assert len(model.prefix_cache) == 6
    run_until_done(model, clock, [model.submit(prompt_of(16 * 6, "new"), max_tokens=1)])
    assert len(model.prefix_cache) == 8
    assert model.submit(old, max_tokens=1).cached_tokens == 2 * 16  # 4 of its blocks were evicted


@dataclass
class _Spec:
    prompt_tokens: int
    max_tokens: int
    target: int
    delay: float
    cancel_previous: bool


_specs = st.builds(
    _Spec,
    prompt_tokens=st.integers(0, 60),
    max_tokens=st.integers(1, 40),
    target=st.integers(1, 40),
    delay=st.sampled_from([0.0, 0.0, 0.003, 0.01, 0.2]),
    cancel_previous=st.sampled_from([False, False, False, True]),
)


_FINISH_A_HAIR_AFTER_NOW = [
    _Spec(prompt_tokens=p, max_tokens=m, target=m, delay=d, cancel_previous=False)
    for p, m, d in [(4, 25, 0.0), (28, 1, 0.0), (36, 15, 0.2), (31, 5, 0.0), (47, 30, 0.0), (21, 8, 0.0),
                    (7, 2, 0.0), (3, 17, 0.0), (4, 13, 0.0)]
]  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(specs=_FINISH_A_HAIR_AFTER_NOW, capacity=113, max_seqs=2, tpot=0.02, slope=0.0)
@given(
    specs=st.lists(_specs, min_size=1, max_size=20),
    capacity=st.integers(100, 400),
    max_seqs=st.integers(1, 8),
    tpot=st.sampled_from([0.0, 0.001, 0.02]),
    slope=st.sampled_from([0.0, 0.3]),
)
def test_model_properties(
    specs: list[_Spec], capacity: int, max_seqs: int, tpot: float, slope: float
) -> None:
    """Queue is FIFO, KV never over-committed, every request ends with exactly its tokens (or cancelled)."""
    profile = SimProfile(
        ttft_base_s=0.005,
        prefill_tokens_per_s=2000.0,
        tpot_base_s=tpot,
        tpot_batch_slope=slope,
        kv_capacity_tokens=capacity,
        max_num_seqs=max_seqs,
        block_tokens=4,
        prefix_cache_blocks=16,
    )
    clock = ManualClock()
    model = SimModel(profile, clock)
    reqs: list[SimRequest] = []
    cancelled: set[int] = set()
    for i, spec in enumerate(specs):
        clock.advance(spec.delay)
        if spec.cancel_previous and reqs:
            model.cancel(reqs[-1])  # a no-op if it already finished
            if reqs[-1].state is RequestState.CANCELLED:
                cancelled.add(reqs[-1].rid)
        target = min(spec.target, spec.max_tokens)
        reqs.append(model.submit(prompt_of(spec.prompt_tokens, f"{i % 3}"), max_tokens=spec.max_tokens,
                                 target_tokens=target))  # fmt: skip
        stats = model.stats()
        assert stats.kv_used_tokens <= capacity and stats.running <= max_seqs
        assert stats.waiting == 0 or stats.running > 0, "a queue with nothing running never moves"
    run_until_done(model, clock, reqs)
    admitted = [r.admitted_at for r in reqs if r.admitted_at is not None]
    assert admitted == sorted(admitted), "admission is first in, first out"
    for r in reqs:
        if r.rid in cancelled:
            assert r.state is RequestState.CANCELLED and r.tokens_out <= r.target_tokens
            continue
        assert r.state is RequestState.FINISHED
        assert r.tokens_out == r.target_tokens <= r.max_tokens
        assert r.arrived_at <= r.admitted_at <= r.first_token_at <= r.finished_at  # type: ignore[operator]
        assert r.cached_tokens < max(r.prompt_tokens, 1)
    assert model.stats() == (0, 0, 0, 0.0, len(model.prefix_cache))


def test_a_finish_rounded_onto_now_fires_in_the_same_advance() -> None:
    """Regression: decoding up to ``now`` can round the decode clock onto a finish predicted one
    ulp after ``now``; ``advance()`` must fire it, not leave it to the next sync at the same time."""
    profile = SimProfile(
        ttft_base_s=0.005, prefill_tokens_per_s=2000.0, tpot_base_s=0.02, tpot_batch_slope=0.0,
        kv_capacity_tokens=113, max_num_seqs=2, block_tokens=4, prefix_cache_blocks=16,
    )  # fmt: skip
    clock = ManualClock()
    model = SimModel(profile, clock)
    reqs = []
    for i, spec in enumerate(_FINISH_A_HAIR_AFTER_NOW):
        clock.advance(spec.delay)
        reqs.append(model.submit(prompt_of(spec.prompt_tokens, f"{i % 3}"), max_tokens=spec.max_tokens))
    run_until_done(model, clock, reqs)
    last = reqs[-1]
    assert last.state is RequestState.FINISHED and last.finished_at == clock.now()
    assert model.stats() == (0, 0, 0, 0.0, len(model.prefix_cache))


# -- text ----------------------------------------------------------------------------------------


def test_text_is_deterministic() -> None:
    a = generate("hello there", 0, 1024, 32, False)
    assert a == generate("hello there", 0, 1024, 32, False)
    assert a != generate("hello there!", 0, 1024, 32, False)
    assert a != generate("hello there", 1, 1024, 32, False)
    # max_tokens only truncates
    long_ids, _ = generate("hello there", 0, 1024, 200, True)
    short_ids, reason = generate("hello there", 0, 1024, 20, True)
    assert long_ids[:20] == short_ids and reason == "length"


@given(
    prompt=st.text(max_size=200),
    seed=st.integers(0, 2**64 - 1),
    max_tokens=st.integers(1, 300),
    natural=st.integers(1, 400),
    ignore_eos=st.booleans(),
)
def test_completion_never_exceeds_max_tokens(
    prompt: str, seed: int, max_tokens: int, natural: int, ignore_eos: bool
) -> None:
    ids, reason = generate(prompt, seed, natural, max_tokens, ignore_eos)
    assert 1 <= len(ids) <= max_tokens
    assert all(i < len(VOCAB) for i in ids)
    if ignore_eos:
        assert len(ids) == max_tokens and reason == "length"
    elif reason == "stop":  # the natural end came first
        assert len(ids) <= min(natural, max_tokens)
    else:
        assert reason == "length" and len(ids) == max_tokens < natural
    assert count_tokens(detokenize(ids)) == len(ids)


def test_profile_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "p.yaml").write_text(
        "ttft_base_s: 0.5\nprefill_tokens_per_s: .inf\nkv_capacity_tokens: 1024\n"
    )
    p = load_profile(tmp_path / "p.yaml")
    assert p.ttft_base_s == 0.5 and p.prefill_tokens_per_s == math.inf and p.kv_capacity_tokens == 1024
    (tmp_path / "p.json").write_text('{"tpot_base_s": 1, "ignore_eos": true}')
    assert load_profile(tmp_path / "p.json") == SimProfile(tpot_base_s=1.0, ignore_eos=True)
    (tmp_path / "bad.yaml").write_text("tpot_base: 0.1\n")
    with pytest.raises(ProfileError, match="unknown"):
        load_profile(tmp_path / "bad.yaml")
    with pytest.raises(ProfileError):
        SimProfile(kv_capacity_tokens=0)
    paced = SimProfile.paced(ttft_s=0.05, tpot_s=0.01)
    assert paced.prefill_s(10_000) == 0.05 and paced.tpot_s(100) == 0.01


# -- end to end ----------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    app: object

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=10)


def _serve(app: object) -> Iterator[Server]:
    with serve_in_thread(app, loop="uvloop", http="httptools") as url:
        yield Server(url, app)


@pytest.fixture(scope="module")
def timed() -> Iterator[Server]:
    yield from _serve(build_app(SimProfile.paced(ttft_s=0.02, tpot_s=0.005), model=MODEL))


@pytest.fixture(scope="module")
def fast() -> Iterator[Server]:
    yield from _serve(build_app(SimProfile(), model=MODEL, fast=True))


def _metrics(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{server.url}/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert s.labels["model_name"] == MODEL
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    key = (name, tuple(sorted({"model_name": MODEL, **labels}.items())))
    return metrics[key]


CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Describe the sea. " * 8},
]


@pytest.mark.parametrize("which", ["timed", "fast"])
def test_chat_non_stream_and_stream_agree(which: str, request: pytest.FixtureRequest) -> None:
    server: Server = request.getfixturevalue(which)
    client = server.client()
    resp = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, seed=7)  # type: ignore[arg-type]
    assert resp.object == "chat.completion" and resp.model == MODEL and resp.id.startswith("chatcmpl-")
    choice = resp.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    text = choice.message.content
    assert text and resp.usage is not None
    assert resp.usage.completion_tokens == count_tokens(text) <= 12
    assert resp.usage.prompt_tokens == count_tokens(render_chat(CHAT))
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens

    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=12, seed=7, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    content = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert content == text  # deterministic
    assert chunks[-2].choices[0].finish_reason == choice.finish_reason
    assert usage_chunk.usage.completion_tokens == resp.usage.completion_tokens == len(chunks) - 3
    assert usage_chunk.usage.prompt_tokens == resp.usage.prompt_tokens
    if which == "timed":  # the repeat hit the prefix cache
        details = usage_chunk.usage.prompt_tokens_details
        assert details is not None and details.cached_tokens and details.cached_tokens > 0

    other = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, seed=8)  # type: ignore[arg-type]
    assert other.choices[0].message.content != text


@pytest.mark.parametrize("which", ["timed", "fast"])
def test_completions(which: str, request: pytest.FixtureRequest) -> None:
    server: Server = request.getfixturevalue(which)
    client = server.client()
    resp = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=9, extra_body={"ignore_eos": True}
    )
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    assert resp.choices[0].finish_reason == "length" and resp.usage is not None
    assert resp.usage.completion_tokens == 9 == count_tokens(resp.choices[0].text)
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=9, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == resp.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 9
    # without stream_options there is no usage chunk
    plain = list(client.completions.create(model=MODEL, prompt="x", max_tokens=3, stream=True))
    assert all(c.choices for c in plain) and plain[-1].usage is None


def test_sse_framing_is_exact(timed: Server) -> None:
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 3, "stream": True, "ignore_eos": True}
    raw = httpx.post(f"{timed.url}/v1/completions", json=body).content
    assert raw.startswith(b"data: {") and raw.endswith(b"data: [DONE]\n\n")
    frames = raw.split(b"\n\n")
    assert frames[-1] == b"" and all(f.startswith(b"data: ") for f in frames[:-1])
    assert len(frames) == 3 + 1 + 1 + 1  # tokens, finish chunk, [DONE], trailing ""


def test_timed_latency_follows_the_profile(timed: Server) -> None:
    client = timed.client()
    start = time.monotonic()
    stream = client.completions.create(
        model=MODEL, prompt="timing", max_tokens=10, stream=True, extra_body={"ignore_eos": True}
    )
    arrivals = [time.monotonic() - start for _ in stream]
    assert arrivals[0] >= 0.02  # TTFT of the paced profile
    assert arrivals[-1] >= 0.02 + 9 * 0.005  # then 5 ms a token


def test_models_health_and_errors(timed: Server) -> None:
    assert [m.id for m in timed.client().models.list()] == [MODEL]
    health = httpx.get(f"{timed.url}/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}

    def check(resp: httpx.Response, status: int, code: str | None = None) -> None:
        assert resp.status_code == status
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        if code:
            assert err["code"] == code

    url = f"{timed.url}/v1/chat/completions"
    check(httpx.post(url, content=b"{not json"), 400, "invalid_json")
    check(httpx.post(url, content=b"[1, 2]"), 400, "invalid_json")
    check(httpx.post(url, json={"model": MODEL}), 400)
    check(httpx.post(url, json={"messages": []}), 400)
    check(httpx.post(url, json={"messages": [{"content": "no role"}]}), 400)
    check(httpx.post(url, json={"messages": CHAT, "max_tokens": 0}), 400)
    check(httpx.post(f"{timed.url}/v1/completions", json={"max_tokens": 3}), 400)
    check(httpx.post(url, json={"messages": CHAT, "max_tokens": 2**41}), 400, "context_length_exceeded")
    check(httpx.get(url), 405)
    check(httpx.get(f"{timed.url}/v1/nope"), 404, "unknown_url")
    with pytest.raises(openai.BadRequestError):
        timed.client().chat.completions.create(model=MODEL, messages=[])


@pytest.mark.parametrize("which", ["timed", "fast"])
def test_metrics_parse_and_move(which: str, request: pytest.FixtureRequest) -> None:
    server: Server = request.getfixturevalue(which)
    before = _metrics(server)
    for name in (
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
    ):  # fmt: skip
        assert (name, (("model_name", MODEL),)) in before, name
    for hist in ("time_to_first_token", "inter_token_latency", "e2e_request_latency"):
        assert _value(before, f"vllm:{hist}_seconds_bucket", le="+Inf") >= 0
    server.client().completions.create(
        model=MODEL, prompt="count me", max_tokens=5, extra_body={"ignore_eos": True}
    )
    after = _metrics(server)
    assert _value(after, "vllm:generation_tokens_total") == _value(before, "vllm:generation_tokens_total") + 5
    assert _value(after, "vllm:prompt_tokens_total") == _value(before, "vllm:prompt_tokens_total") + 2
    success = "vllm:request_success_total"
    assert (
        _value(after, success, finished_reason="length")
        == _value(before, success, finished_reason="length") + 1
    )
    if which == "timed":
        ttft = "vllm:time_to_first_token_seconds_count"
        assert _value(after, ttft) == _value(before, ttft) + 1
        assert _value(after, "vllm:inter_token_latency_seconds_count") >= 4


def test_queued_requests_all_complete_on_a_small_replica() -> None:
    """Requests queued for KV space or a sequence slot are admitted as others finish, none hangs."""
    profile = SimProfile(
        ttft_base_s=0.002, prefill_tokens_per_s=50_000.0, tpot_base_s=0.001, tpot_batch_slope=0.3,
        kv_capacity_tokens=120, max_num_seqs=2, block_tokens=4, ignore_eos=True,
    )  # fmt: skip
    with contextlib.contextmanager(_serve)(build_app(profile, model=MODEL)) as server:
        sizes = [(20, 25), (30, 1), (40, 15), (30, 5), (45, 30), (20, 8), (8, 2), (4, 17), (4, 13)]

        statuses: dict[int, int] = {}

        def one(i: int) -> None:
            body = {"model": MODEL, "prompt": prompt_of(sizes[i][0], f"q{i}"), "max_tokens": sizes[i][1],
                    "stream": i % 2 == 0}  # fmt: skip
            statuses[i] = httpx.post(f"{server.url}/v1/completions", json=body, timeout=10).status_code

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(sizes))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
            assert not t.is_alive(), "a queued request never finished"
        assert statuses == dict.fromkeys(range(len(sizes)), 200)
        after = _metrics(server)
        assert _value(after, "vllm:request_success_total", finished_reason="length") == len(sizes)
        assert _value(after, "vllm:num_requests_running") == _value(after, "vllm:num_requests_waiting") == 0
        assert _value(after, "vllm:kv_cache_usage_perc") == 0


def test_disconnect_frees_the_slot(timed: Server) -> None:
    body = {"model": MODEL, "prompt": "a long one", "max_tokens": 2000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{timed.url}/v1/completions", json=body) as resp:
        chunks = resp.iter_bytes()  # (dropping this iterator would close the connection)
        next(chunks)
        assert _value(_metrics(timed), "vllm:num_requests_running") >= 1
    deadline = time.monotonic() + 5
    while _value(_metrics(timed), "vllm:num_requests_running") != 0:
        assert time.monotonic() < deadline, "the cancelled request kept running"
        time.sleep(0.01)
    assert _value(_metrics(timed), "vllm:request_success_total", finished_reason="abort") >= 1
