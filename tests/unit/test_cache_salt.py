"""Prefix-cache isolation by tenant: the cache salt (golden vectors, properties), the proxy's body
rewrite against a real simulated vLLM-like engine served in-process, and the router's partitions."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvicorn
from hypothesis import given
from hypothesis import strategies as st

from skyfleet.clock import SystemClock
from skyfleet.config import ConfigError, Settings
from skyfleet.engines.kvstate import SoleTenantCache
from skyfleet.engines.sim import SimApp, SimProfile
from skyfleet.engines.sim.protocol import Kind, parse_job
from skyfleet.engines.sim.text import block_hashes
from skyfleet.errors import InvalidRequestError
from skyfleet.fleet.registry import ReplicaRegistry
from skyfleet.fleet.replica import ReplicaSpec, ReplicaState
from skyfleet.gateway.cache_salt import (
    CacheSalter,
    derive_salt,
    load_or_create_secret,
    tenant_salt,
)
from skyfleet.gateway.context import RequestContext, RequestRecord
from skyfleet.gateway.proxy import DONE, Proxy, usage_of
from skyfleet.gateway.upstream import UpstreamClient
from skyfleet.iam.principal import Principal
from skyfleet.routing import LeastOutstandingRequests
from skyfleet.routing.affinity import PUBLIC_PREFIX_PARTITION, PrefixAffinity, prefix_partition
from skyfleet.routing.policy import ReplicaLoad, RouteRequest, RoutingSnapshot

SECRET = bytes(range(32))

# -- the salt -------------------------------------------------------------------------------------


def test_golden_vectors() -> None:
    # Cross-checked with OpenSSL:
    # printf 'skyfleet/cache-salt/v1ten_acme' | openssl dgst -sha256 -mac HMAC \
    #   -macopt hexkey:000102...1f -binary | base64 | tr '+/' '-_' | tr -d '='
    assert tenant_salt(SECRET, "ten_acme") == "cjv7pA4JL5IUVtjWb_YRZ1IIywD2Fi0vqGw26x_PPss"
    assert tenant_salt(SECRET, "tenant-é") == "Ruif3ChK9VHwCO2Cras51C3x3PwDRh7tNy4PQcxSY9Q"
    assert CacheSalter(SECRET).public_salt == "LUiOl7YyTvmmW-l-gFgMSuxr8_aT6E1zuPeVxyQBJRo"
    assert derive_salt(SECRET, b"\x00public") == CacheSalter(SECRET).public_salt


tenant_ids = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)


@given(tenant_ids, tenant_ids, st.binary(min_size=16, max_size=64))
def test_salts_are_url_safe_deterministic_and_per_tenant(a: str, b: str, secret: bytes) -> None:
    salt = tenant_salt(secret, a)
    assert len(salt) == 43 and set(salt) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert tenant_salt(secret, a) == salt
    assert (tenant_salt(secret, b) == salt) == (a == b)
    assert salt != CacheSalter(secret).public_salt
    assert tenant_salt(bytes(reversed(secret)) + b"x", a) != salt  # another secret: another salt


def test_salter_uses_the_public_salt_only_for_opted_in_tenants() -> None:
    salter = CacheSalter(SECRET)
    a = Principal("ten_acme", "acme", "member", "key_1")
    shared = Principal("ten_acme", "acme", "member", "key_2", share_public_prefix=True)
    assert salter.salt_for(a) == tenant_salt(SECRET, "ten_acme") == salter.salt_for(a)
    assert salter.salt_for(shared) == salter.public_salt
    with pytest.raises(ValueError):
        CacheSalter(b"short")


def test_secret_file_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "cache-salt.key"
    first = load_or_create_secret(path)
    assert len(first) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_secret(path) == first
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="0600"):
        load_or_create_secret(path)
    os.chmod(path, 0o600)
    path.write_bytes(b"truncated")
    with pytest.raises(ConfigError, match="damaged"):
        load_or_create_secret(path)


def test_configured_secret_must_be_long_enough(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 32"):
        Settings(data_dir=tmp_path, cache_salt_secret="too short")
    assert Settings(data_dir=tmp_path, cache_salt_secret="x" * 32).cache_salt_secret is not None


def test_usage_reads_llamacpp_timings_when_details_are_missing() -> None:
    assert usage_of({"usage": {"prompt_tokens": 9, "completion_tokens": 2}, "timings": {"cache_n": 7}}) == (9, 2, 7)
    assert usage_of({"usage": {"prompt_tokens": 9, "completion_tokens": 2,
                               "prompt_tokens_details": {"cached_tokens": 5}}, "timings": {"cache_n": 7}}) == (9, 2, 5)


# -- the proxy's rewrite, against simulated engines served over HTTP in-process -------------------


class _Records:
    def __init__(self) -> None:
        self.records: list[RequestRecord] = []

    def on_finish(self, record: RequestRecord) -> None:
        self.records.append(record)


async def _serve(app: SimApp) -> tuple[uvicorn.Server, asyncio.Task[None], str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(500):
        if server.started:
            break
        await asyncio.sleep(0.01)
    assert server.started
    return server, task, f"http://127.0.0.1:{sock.getsockname()[1]}"


class Stack:
    def __init__(self, proxy: Proxy, apps: dict[str, SimApp]) -> None:
        self.proxy = proxy
        self.apps = apps

    async def ask(self, principal: Principal, model: str, payload: dict[str, Any], *,
                  stream: bool = False) -> tuple[int, int]:
        """(prompt tokens, cached tokens) of one request through the proxy."""
        ctx = RequestContext(request_id="req", principal=principal, route="chat", model=model, stream=stream,
                             include_usage=True, started=0.0, started_wall=0.0)
        body = {"model": model, "max_tokens": 2, "stream": stream, **payload}
        if not stream:
            usage = usage_of((await self.proxy.unary(ctx, "/v1/chat/completions", body)).data)
        else:
            s = await self.proxy.open_stream(ctx, "/v1/chat/completions", body)
            async for ev in s:
                if ev.startswith(DONE):  # as the relay does
                    break
                s.is_usage_event(ev)
            s.finish("completed")
            usage = s.usage
        assert usage is not None
        return usage[0], usage[2]


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    profile = SimProfile.paced(ttft_s=0.001, tpot_s=0.0)
    apps = {engine: SimApp(profile, model="sim-model") for engine in ("vllm", "sglang", "llama")}
    served = [await _serve(app) for app in apps.values()]
    registry = ReplicaRegistry()
    for (engine, _), (_, _, url) in zip(apps.items(), served, strict=True):
        registry.add(ReplicaSpec(id=engine, base_url=url, model=f"{engine}-model", engine=engine,
                                 upstream_model="sim-model"), state=ReplicaState.READY)
    upstream = UpstreamClient(connect_timeout_s=2, request_timeout_s=10, pool_size=4)
    await upstream.start()
    proxy = Proxy(registry=registry, policy=LeastOutstandingRequests(), upstream=upstream, clock=SystemClock(),
                  observer=_Records(), salter=CacheSalter(SECRET))
    try:
        yield Stack(proxy, apps)
    finally:
        await upstream.close()
        for server, task, _ in served:
            server.should_exit = True
            await task


A = Principal("ten_a", "a", "member", "key_a")
B = Principal("ten_b", "b", "member", "key_b")
P1 = Principal("ten_p1", "p1", "member", "key_p1", share_public_prefix=True)
P2 = Principal("ten_p2", "p2", "member", "key_p2", share_public_prefix=True)
LONG = [{"role": "user", "content": "tell me about this document: " + "lorem ipsum dolor " * 200}]


@pytest.mark.parametrize("stream", [False, True])
async def test_engines_get_the_tenant_salt_and_never_the_clients(stack: Stack, stream: bool) -> None:
    for engine in ("vllm", "sglang", "llama"):
        for principal in (A, B, P1):
            await stack.ask(principal, f"{engine}-model", {"messages": LONG[:1], "cache_salt": "chosen-by-client"},
                            stream=stream)
    public = CacheSalter(SECRET).public_salt
    for engine in ("vllm", "sglang"):
        assert stack.apps[engine].cache_salts == {tenant_salt(SECRET, "ten_a"): 1, tenant_salt(SECRET, "ten_b"): 1,
                                                  public: 1}
    assert stack.apps["llama"].cache_salts == {None: 3}  # llama.cpp takes no salt: stripped, none added


async def test_a_tenant_never_hits_another_tenants_cache(stack: Stack) -> None:
    n, cached = await stack.ask(A, "vllm-model", {"messages": LONG})
    assert n > 800 and cached == 0
    assert (await stack.ask(A, "vllm-model", {"messages": LONG}))[1] > 0.9 * n  # A's own cache
    assert (await stack.ask(B, "vllm-model", {"messages": LONG}))[1] == 0  # same prompt, other tenant
    # A client salt cannot join A's partition: the gateway replaces it with B's own.
    assert (await stack.ask(B, "vllm-model", {"messages": LONG, "cache_salt": tenant_salt(SECRET, "ten_a")}))[1] \
        > 0.9 * n  # B's own entry from the request before
    other = [{"role": "user", "content": "another document " + "sit amet " * 300}]
    await stack.ask(A, "vllm-model", {"messages": other})
    assert (await stack.ask(B, "vllm-model", {"messages": other, "cache_salt": tenant_salt(SECRET, "ten_a")}))[1] == 0


async def test_opted_in_tenants_share_among_themselves_only(stack: Stack) -> None:
    n, _ = await stack.ask(P1, "vllm-model", {"messages": LONG})
    assert (await stack.ask(P2, "vllm-model", {"messages": LONG}))[1] > 0.9 * n  # public partition
    assert (await stack.ask(A, "vllm-model", {"messages": LONG}))[1] == 0  # A did not opt in


def test_the_simulated_engine_takes_a_salt_like_vllm() -> None:
    for bad in ("", 7, ["x"]):
        with pytest.raises(InvalidRequestError) as info:
            parse_job(Kind.CHAT, orjson.dumps({"messages": LONG, "cache_salt": bad}), 4)
        assert info.value.param == "cache_salt"
    assert parse_job(Kind.CHAT, orjson.dumps({"messages": LONG, "cache_salt": "s"}), 4).cache_salt == "s"
    text = "x" * 640
    assert block_hashes(text, 16) != block_hashes(text, 16, "s") != block_hashes(text, 16, "t")
    assert block_hashes(text, 16, "s") == block_hashes(text, 16, "s")


# -- the router: prefix keys are partitioned by tenant ---------------------------------------------


def _placements(policy: PrefixAffinity, tenant: str, keys: list[str]) -> list[str | None]:
    snap = RoutingSnapshot(now=0.0, replicas=tuple(ReplicaLoad(f"r{i}", 0) for i in range(8)))
    return [policy.choose(snap, RouteRequest(tenant, "m", session_key=k)) for k in keys]


def test_prefix_routing_places_each_tenant_independently_and_opted_in_tenants_together() -> None:
    policy = PrefixAffinity()
    keys = [policy.key_for_text(f"document {i} " * 300) or "" for i in range(200)]
    a, b = _placements(policy, "ten_a", keys), _placements(policy, "ten_b", keys)
    same = sum(x == y for x, y in zip(a, b, strict=True))
    assert same < 60  # independent: about 1/8 of 200 coincide, not all of them
    assert _placements(policy, "ten_a", keys) == a  # and each tenant's placement is stable
    p1 = _placements(policy, prefix_partition("ten_p1", True), keys)
    assert p1 == _placements(policy, prefix_partition("ten_p2", True), keys)
    assert prefix_partition("ten_a") == "ten_a" and prefix_partition("ten_a", True) == PUBLIC_PREFIX_PARTITION


# -- llama.cpp without the slot manager ------------------------------------------------------------


async def test_without_the_slot_manager_a_shared_replica_reuses_no_prompt() -> None:
    guard = SoleTenantCache()
    spec = ReplicaSpec(id="r0", base_url="http://127.0.0.1:1", model="m", engine="llama", upstream_model="m")
    other = ReplicaSpec(id="r1", base_url="http://127.0.0.1:2", model="m", engine="llama", upstream_model="m")
    assert (await guard.acquire(spec, "ten_a", None)).fields == {}
    assert (await guard.acquire(spec, "ten_a", "s1")).fields == {}  # one tenant so far: llama.cpp caches
    assert (await guard.acquire(other, "ten_b", None)).fields == {}  # its own replica
    assert (await guard.acquire(spec, "ten_b", None)).fields == {"cache_prompt": False}
    assert (await guard.acquire(spec, "ten_a", None)).fields == {"cache_prompt": False}  # shared from now on
    guard.replica_gone("r0")  # restarted: empty caches
    assert (await guard.acquire(spec, "ten_b", None)).fields == {}
    assert (await guard.acquire(spec, "ten_a", None)).fields == {"cache_prompt": False}
