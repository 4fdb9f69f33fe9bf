"""KubernetesProvider through the REAL kubernetes client against the fake API server (tests/fakes/k8s_api.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from kubernetes.client import ApiClient, Configuration

from skyfleet.fleet.k8s.naming import ANNOTATION_DRAINING, pool_names
from skyfleet.fleet.k8s.provider import KubernetesProvider
from skyfleet.fleet.providers.base import (
    FleetProvider,
    PoolNotFoundError,
    ProviderUnavailableError,
    ReplicaNotFoundError,
)
from skyfleet.fleet.replica import ReplicaState
from tests.fakes.k8s_api import FakeKubernetesApi

NS = "skyfleet"
TOKEN = "test-token-not-a-secret"
SPOT = pool_names("llama-3.1-8b", "l40s-spot")
ONDEMAND = pool_names("llama-3.1-8b", "l40s-ondemand")


@pytest.fixture
def fake() -> Iterator[FakeKubernetesApi]:
    with FakeKubernetesApi(token=TOKEN) as k8s:
        for names, n in ((SPOT, 1), (ONDEMAND, 0)):
            k8s.add_statefulset(NS, names.statefulset, selector=names.selector, replicas=n)
        yield k8s


def make_client(url: str, token: str = TOKEN) -> ApiClient:
    configuration = Configuration(host=url, api_key={"BearerToken": token}, api_key_prefix={"BearerToken": "Bearer"})
    configuration.retries = False
    return ApiClient(configuration)


@pytest.fixture
def provider(fake: FakeKubernetesApi) -> Iterator[KubernetesProvider]:
    client = make_client(fake.url)
    yield KubernetesProvider(client, NS, {n.key: n for n in (SPOT, ONDEMAND)}, backoff_base_s=0.01,
                             backoff_max_s=0.05, poll_interval_s=0.05, request_timeout_s=5)
    client.close()


def test_it_is_a_fleet_provider(provider: KubernetesProvider) -> None:
    assert isinstance(provider, FleetProvider)


async def test_set_replicas_goes_through_the_scale_subresource(fake: FakeKubernetesApi,
                                                              provider: KubernetesProvider) -> None:
    await provider.set_replicas(SPOT.key, 3)
    assert fake.scale_of(NS, SPOT.statefulset) == (3, 3)
    scale_calls = [(m, ct) for m, p, ct in fake.requests if p.endswith(f"/statefulsets/{SPOT.statefulset}/scale")]
    # a read, then a JSON merge patch carrying the resourceVersion read
    assert [m for m, _ in scale_calls] == ["GET", "PATCH"]
    assert scale_calls[1][1] == "application/merge-patch+json"
    state = await provider.scale(SPOT.key)
    assert (state.desired, state.current) == (3, 3)
    assert state.selector == SPOT.selector_string

    replicas = await provider.replicas(SPOT.key)
    assert [r.id for r in replicas] == [f"{SPOT.statefulset}-{i}" for i in range(3)]
    assert [r.ordinal for r in replicas] == [0, 1, 2]
    assert all(r.state is ReplicaState.READY for r in replicas)
    assert replicas[1].base_url == f"http://{SPOT.statefulset}-1.{SPOT.statefulset}.{NS}.svc.cluster.local:8000"

    await provider.set_replicas(SPOT.key, 3)  # idempotent: a read, no write
    assert sum(1 for m, p, _ in fake.requests if m == "PATCH") == 1

    await provider.set_replicas(SPOT.key, 1)
    replicas = await provider.replicas(SPOT.key)
    assert [(r.ordinal, r.state) for r in replicas] == [
        (0, ReplicaState.READY), (1, ReplicaState.DRAINING), (2, ReplicaState.DRAINING)]
    assert replicas[2].deadline is not None and replicas[2].deadline > datetime.now(UTC)
    fake.finish_terminations()
    assert [r.id for r in await provider.replicas(SPOT.key)] == [f"{SPOT.statefulset}-0"]
    assert await provider.replicas(ONDEMAND.key) == []


async def test_a_pod_not_ready_yet_is_starting(fake: FakeKubernetesApi, provider: KubernetesProvider) -> None:
    fake.auto_ready = False
    await provider.set_replicas(ONDEMAND.key, 1)
    (r,) = await provider.replicas(ONDEMAND.key)
    assert r.state is ReplicaState.STARTING
    fake.set_ready(NS, r.id)
    (r,) = await provider.replicas(ONDEMAND.key)
    assert r.state is ReplicaState.READY


async def test_a_conflict_is_retried_with_the_fresh_resource_version(fake: FakeKubernetesApi,
                                                                    provider: KubernetesProvider) -> None:
    original = provider._apps.read_namespaced_stateful_set_scale
    bumps = {"left": 2}

    def read_then_someone_writes(*args, **kwargs):  # type: ignore[no-untyped-def]
        scale = original(*args, **kwargs)
        if bumps["left"]:
            bumps["left"] -= 1
            fake.bump(NS, SPOT.statefulset)  # another writer between our read and our patch
        return scale

    provider._apps.read_namespaced_stateful_set_scale = read_then_someone_writes  # type: ignore[method-assign]
    await provider.set_replicas(SPOT.key, 2)
    assert fake.scale_of(NS, SPOT.statefulset) == (2, 2)
    patches = [m for m, p, _ in fake.requests if m == "PATCH"]
    assert len(patches) == 3  # two 409s, then the write with the fresh resourceVersion


async def test_a_stale_resource_version_is_a_409_on_the_fake(fake: FakeKubernetesApi) -> None:
    from kubernetes.client import AppsV1Api
    from kubernetes.client.exceptions import ApiException

    with make_client(fake.url) as client:
        api = AppsV1Api(client)
        scale = api.read_namespaced_stateful_set_scale(SPOT.statefulset, NS)
        fake.bump(NS, SPOT.statefulset)
        body = {"metadata": {"resourceVersion": scale.metadata.resource_version}, "spec": {"replicas": 4}}
        with pytest.raises(ApiException) as err:
            api.patch_namespaced_stateful_set_scale(SPOT.statefulset, NS, body,
                                                    _content_type="application/merge-patch+json")
        assert err.value.status == 409
        # a dict body without a content type goes as a strategic merge patch (the client's rest.py); a
        # json-patch content type with an object is refused, as the API server refuses it
        assert api.patch_namespaced_stateful_set_scale(SPOT.statefulset, NS, {"spec": {"replicas": 4}}).spec.replicas == 4
        assert fake.requests[-1][2] == "application/strategic-merge-patch+json"
        with pytest.raises(ApiException) as err:
            api.api_client.call_api(
                f"/apis/apps/v1/namespaces/{NS}/statefulsets/{SPOT.statefulset}/scale", "PATCH",
                header_params={"Content-Type": "application/json-patch+json"}, body="{}", auth_settings=["BearerToken"])
        assert err.value.status == 400
        # a replace (PUT) with the current version works; a JSON patch array too
        scale = api.read_namespaced_stateful_set_scale(SPOT.statefulset, NS)
        scale.spec.replicas = 2
        assert api.replace_namespaced_stateful_set_scale(SPOT.statefulset, NS, scale).spec.replicas == 2
        ops = [{"op": "replace", "path": "/spec/replicas", "value": 0}]
        assert api.patch_namespaced_stateful_set_scale(SPOT.statefulset, NS, ops).spec.replicas == 0
    assert fake.scale_of(NS, SPOT.statefulset)[0] == 0


async def test_unknown_pool_and_missing_statefulset_are_not_found(fake: FakeKubernetesApi,
                                                                 provider: KubernetesProvider) -> None:
    with pytest.raises(PoolNotFoundError, match="unknown pool 'nope'"):
        await provider.set_replicas("nope", 1)
    del fake.statefulsets[(NS, ONDEMAND.statefulset)]
    with pytest.raises(PoolNotFoundError, match=r"StatefulSet .* not found"):
        await provider.set_replicas(ONDEMAND.key, 1)
    with pytest.raises(ReplicaNotFoundError):
        await provider.delete_replica(f"{SPOT.statefulset}-7")
    with pytest.raises(ReplicaNotFoundError):
        await provider.drain("other-0")


async def test_server_errors_are_retried_with_backoff_then_unavailable(fake: FakeKubernetesApi,
                                                                      provider: KubernetesProvider) -> None:
    fake.fail_next = [503, 500]
    await provider.set_replicas(SPOT.key, 2)  # two failures, then it works
    assert fake.scale_of(NS, SPOT.statefulset)[0] == 2
    fake.fail_next = [503] * 10
    with pytest.raises(ProviderUnavailableError, match="after 5 attempts") as err:
        await provider.set_replicas(SPOT.key, 3)
    assert err.value.status == 503 and err.value.code == "provider_unavailable"
    fake.fail_next = []
    assert fake.scale_of(NS, SPOT.statefulset)[0] == 2


async def test_network_errors_are_unavailable(fake: FakeKubernetesApi) -> None:
    url = fake.url
    fake.stop()
    client = make_client(url)
    provider = KubernetesProvider(client, NS, {SPOT.key: SPOT}, retries=1, backoff_base_s=0.01)
    with pytest.raises(ProviderUnavailableError, match="after 2 attempts"):
        await provider.set_replicas(SPOT.key, 1)
    client.close()


async def test_wrong_credentials_fail_at_once(fake: FakeKubernetesApi) -> None:
    client = make_client(fake.url, token="wrong")
    provider = KubernetesProvider(client, NS, {SPOT.key: SPOT}, backoff_base_s=0.01)
    with pytest.raises(ProviderUnavailableError, match="401"):
        await provider.replicas(SPOT.key)
    assert len(fake.requests) == 1  # not retried
    client.close()


async def test_drain_and_delete(fake: FakeKubernetesApi, provider: KubernetesProvider) -> None:
    await provider.set_replicas(SPOT.key, 2)
    victim = f"{SPOT.statefulset}-1"
    await provider.drain(victim)
    assert ANNOTATION_DRAINING in fake.pods[(NS, victim)].annotations
    states = {r.id: r.state for r in await provider.replicas(SPOT.key)}
    assert states[victim] is ReplicaState.DRAINING and states[f"{SPOT.statefulset}-0"] is ReplicaState.READY

    await provider.delete_replica(f"{SPOT.statefulset}-0", grace_period_s=90)
    pod = fake.pods[(NS, f"{SPOT.statefulset}-0")]
    assert pod.grace_s == 90
    old_uid = pod.uid
    fake.finish_terminations()
    # the StatefulSet controller recreates the deleted ordinal (new uid); the drained pod was only annotated
    pods = {r.id for r in await provider.replicas(SPOT.key)}
    assert pods == {f"{SPOT.statefulset}-0", victim}
    assert fake.pods[(NS, f"{SPOT.statefulset}-0")].uid != old_uid


async def test_preemption_notices(fake: FakeKubernetesApi, provider: KubernetesProvider) -> None:
    await provider.set_replicas(SPOT.key, 3)
    seen: list = []

    async def collect() -> None:
        async for notice in provider.events():
            seen.append(notice)

    task = asyncio.create_task(collect())
    try:
        await provider.set_replicas(SPOT.key, 2)  # a scale-down: the controller's own, not a notice
        await provider.delete_replica(f"{SPOT.statefulset}-0")  # deleted by us: not a notice either
        fake.preempt(NS, f"{SPOT.statefulset}-1", grace_s=120)  # a spot reclaim
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        # a few more polls: nothing else is reported, and the same pod only once
        polls = len(fake.requests)
        while len(fake.requests) < polls + 6 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert len(seen) == 1
    (notice,) = seen
    assert notice.replica_id == f"{SPOT.statefulset}-1" and notice.pool == SPOT.key
    assert notice.reason == "TerminationByKubelet"
    assert timedelta(seconds=100) < notice.deadline - datetime.now(UTC) <= timedelta(seconds=120)


async def test_the_rendered_objects_and_role_are_what_the_provider_needs() -> None:
    from pathlib import Path

    from skyfleet.cost.catalog import Catalog
    from skyfleet.fleet.k8s.provider import targets_from_spec
    from skyfleet.fleet.k8s.render import render
    from skyfleet.fleet.spec import load_fleet_spec

    catalog = Catalog.builtin()
    spec = load_fleet_spec(Path(__file__).resolve().parents[2] / "examples" / "fleet-3-pools.yaml", catalog)
    objects = render(spec, catalog)
    (role,) = [o for o in objects if o["kind"] == "Role"]
    with FakeKubernetesApi(token=TOKEN, rbac_rules=role["rules"]) as k8s:
        for obj in objects:
            if obj["kind"] == "StatefulSet":
                k8s.add_statefulset_object(obj)
        client = make_client(k8s.url)
        provider = KubernetesProvider(client, "skyfleet", targets_from_spec(spec), backoff_base_s=0.01)
        assert provider.pools == [f"llama-3.1-8b-instruct/{p}" for p in ("a10g-spot", "l40s-ondemand", "l40s-spot")]
        for key in provider.pools:
            before = await provider.replicas(key)
            assert len(before) == spec.models["llama-3.1-8b-instruct"].pool(key.split("/")[1]).min
            await provider.set_replicas(key, 2)
            replicas = await provider.replicas(key)
            assert [r.state for r in replicas] == [ReplicaState.READY] * 2
            await provider.drain(replicas[1].id)
            await provider.delete_replica(replicas[1].id)
        # without the pods/patch grant the drain is refused (403), and not retried
        k8s.rbac_rules = [dict(r, verbs=[v for v in r["verbs"] if v != "patch"]) if r["resources"] == ["pods"] else r
                          for r in role["rules"]]
        with pytest.raises(ProviderUnavailableError, match="403"):
            await provider.drain(replicas[0].id)
        client.close()


async def test_client_from_a_kubeconfig(fake: FakeKubernetesApi, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from skyfleet.fleet.k8s.provider import client_from_environment

    kubeconfig = {
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
        "users": [{"name": "controller", "user": {"token": TOKEN}}],
        "contexts": [{"name": "test", "context": {"cluster": "fake", "user": "controller", "namespace": NS}}],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(path))
    client = await asyncio.to_thread(client_from_environment)
    provider = KubernetesProvider(client, NS, {SPOT.key: SPOT})
    await provider.set_replicas(SPOT.key, 2)
    assert fake.scale_of(NS, SPOT.statefulset) == (2, 2)
    client.close()
