"""``KubernetesProvider``: one StatefulSet per pool (rendered by ``skyfleet k8s render``), scaled
through its scale subresource with the official ``kubernetes`` client.

* ``set_replicas``: read the pool's Scale (``AppsV1Api.read_namespaced_stateful_set_scale``), then a
  JSON merge patch of ``spec.replicas`` carrying the read ``metadata.resourceVersion``
  (``patch_namespaced_stateful_set_scale``): a concurrent writer makes it a 409, and the provider
  re-reads and tries again. (The content type is set explicitly: left alone, the client sends a
  dict as a strategic merge patch, which for a Scale means the same, but the intent is RFC 7386.)
* ``replicas``: the pods matching the pool's selector (``CoreV1Api.list_namespaced_pod``), as
  :class:`~skyfleet.fleet.providers.base.ReplicaInfo`; a pod's ``deletionTimestamp`` is its deadline.
* ``drain``: annotates the pod ``skyfleet.io/draining`` (so a restarted controller sees it);
  ``delete_replica``: a graceful pod deletion (the StatefulSet recreates the ordinal if wanted).
* ``events``: polls the pools' pods; a pod terminating that the controller did not remove (not
  deleted here, ordinal below the desired size, or with a ``DisruptionTarget`` condition: a spot
  reclaim, a node drain) is a :class:`~skyfleet.fleet.providers.base.PreemptionNotice`, once.

The client is synchronous: every call runs in a thread (``asyncio.to_thread``) with a request
timeout. Errors are mapped here: 404 -> ``PoolNotFoundError`` / ``ReplicaNotFoundError``; 409 ->
re-read and retry; 429, 5xx and network errors -> retried with exponential backoff, then
``ProviderUnavailableError``; 401/403 -> ``ProviderUnavailableError`` at once (credentials or RBAC:
retrying does not help). RBAC the provider needs: the Role ``skyfleet k8s render`` writes.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from skyfleet.fleet.k8s.naming import ANNOTATION_DRAINING, ENGINE_PORT, PoolNames, pool_names
from skyfleet.fleet.providers.base import (
    PoolNotFoundError,
    PreemptionNotice,
    ProviderUnavailableError,
    ReplicaInfo,
    ReplicaNotFoundError,
)
from skyfleet.fleet.replica import ReplicaState

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from skyfleet.fleet.spec import FleetSpec

log = logging.getLogger("skyfleet.fleet.k8s")
T = TypeVar("T")
_MERGE_PATCH = "application/merge-patch+json"


class _Conflict(Exception):
    """A 409: the object changed since it was read."""


@dataclass(frozen=True, slots=True)
class ScaleState:
    desired: int  # spec.replicas
    current: int  # status.replicas (pods that exist, terminating ones included)
    selector: str  # status.selector
    resource_version: str


def targets_from_spec(spec: FleetSpec) -> dict[str, PoolNames]:
    """The pools of a fleet spec by key (``<model>/<pool>``), named as ``skyfleet k8s render`` names them."""
    return {n.key: n for n in (pool_names(model, p.name) for model, fleet in spec.models.items()
                               for p in fleet.pools)}


def client_from_environment(*, kubeconfig: str | None = None, context: str | None = None) -> ApiClient:
    """An API client from the in-cluster service account, else the kubeconfig (``kubeconfig``, else
    ``$KUBECONFIG`` as it is now, else ~/.kube/config). Blocking: reads files."""
    import os

    from kubernetes import config
    from kubernetes.client import ApiClient, Configuration

    configuration = Configuration()
    configuration.api_key = _BearerTokenAlias()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(config_file=kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config",
                                context=context, client_configuration=configuration)
    configuration.retries = False  # retries (with backoff) are the provider's
    return ApiClient(configuration)


class _BearerTokenAlias(dict[str, str]):
    """The token under both names. kubernetes 36.0.0's config loaders (kubeconfig and in-cluster, and their
    token refresh) store it as ``api_key['authorization']`` while its generated client only sends
    ``api_key['BearerToken']``, so requests would go out anonymous (kubernetes-client/python#2584, fixed
    in 36.0.1)."""

    def __setitem__(self, key: str, value: str) -> None:
        super().__setitem__(key, value)
        if key == "authorization":
            super().__setitem__("BearerToken", value)


class KubernetesProvider:
    """Scales StatefulSets and reads their pods; see the module docstring."""

    #: a StatefulSet removes its highest ordinals on a scale-down: the controller drains those
    ordered_scale_down = True

    def __init__(self, api_client: ApiClient, namespace: str, pools: Mapping[str, PoolNames], *,
                 cluster_domain: str = "cluster.local", port: int = ENGINE_PORT,
                 request_timeout_s: float = 10.0, retries: int = 4, backoff_base_s: float = 0.5,
                 backoff_max_s: float = 8.0, conflict_retries: int = 5, poll_interval_s: float = 0.5,
                 now: Callable[[], datetime] | None = None) -> None:
        from kubernetes.client import AppsV1Api, CoreV1Api

        self._apps = AppsV1Api(api_client)
        self._core = CoreV1Api(api_client)
        self._ns = namespace
        self._pools = dict(pools)
        self._by_sts = {n.statefulset: key for key, n in self._pools.items()}
        self._domain = cluster_domain
        self._port = port
        self._timeout = request_timeout_s
        self._retries = retries
        self._backoff_base = backoff_base_s
        self._backoff_max = backoff_max_s
        self._conflict_retries = conflict_retries
        self._poll_interval = poll_interval_s
        self._now = now or (lambda: datetime.now(UTC))
        self._deleted_uids: set[str] = set()  # pods this provider deleted (not preemptions)

    @property
    def pools(self) -> list[str]:
        return sorted(self._pools)

    def _target(self, pool: str) -> PoolNames:
        found = self._pools.get(pool)
        if found is None:
            raise PoolNotFoundError(f"unknown pool '{pool}'; known: {', '.join(sorted(self._pools)) or 'none'}")
        return found

    def _pool_of(self, replica_id: str) -> str:
        sts, _, ordinal = replica_id.rpartition("-")
        pool = self._by_sts.get(sts)
        if pool is None or not ordinal.isdigit():
            raise ReplicaNotFoundError(f"replica '{replica_id}' is not a pod of a known pool")
        return pool

    # -- the one place that calls the client --

    async def _call(self, fn: Callable[..., T], *args: Any, not_found: Exception, **kwargs: Any) -> T:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        delay = self._backoff_base
        for attempt in range(self._retries + 1):
            try:
                return await asyncio.to_thread(fn, *args, _request_timeout=self._timeout, **kwargs)
            except ApiException as exc:
                status = exc.status or 0
                if status == 404:
                    raise not_found from None
                if status == 409:
                    raise _Conflict() from None
                if status in (401, 403):
                    raise ProviderUnavailableError(
                        f"Kubernetes API refused {_name(fn)} ({status} {exc.reason}): check the service account "
                        f"and its Role") from None
                if status != 0 and status != 429 and status < 500:
                    raise ProviderUnavailableError(
                        f"Kubernetes API rejected {_name(fn)} ({status} {exc.reason})") from None
                reason = f"{status} {exc.reason}"
                retry_after = _retry_after(exc.headers)
            except (HTTPError, OSError) as exc:
                reason, retry_after = type(exc).__name__, None
            if attempt == self._retries:
                raise ProviderUnavailableError(
                    f"Kubernetes API unavailable for {_name(fn)} after {attempt + 1} attempts ({reason})")
            wait = retry_after if retry_after is not None else delay * (0.5 + random.random() / 2)
            log.warning("kubernetes call failed; retrying",
                        extra={"call": _name(fn), "reason": reason, "retry_in_s": round(wait, 3)})
            await asyncio.sleep(min(wait, self._backoff_max))
            delay = min(delay * 2, self._backoff_max)
        raise AssertionError("unreachable")

    # -- scale --

    async def scale(self, pool: str) -> ScaleState:
        """The pool's Scale: desired and current replicas."""
        t = self._target(pool)
        s = await self._call(self._apps.read_namespaced_stateful_set_scale, t.statefulset, self._ns,
                             not_found=self._missing(pool, t))
        return ScaleState(desired=int(s.spec.replicas or 0), current=int(s.status.replicas or 0),
                          selector=s.status.selector or "", resource_version=s.metadata.resource_version or "")

    async def set_replicas(self, pool: str, n: int) -> None:
        if n < 0:
            raise ValueError(f"replicas must be >= 0, not {n}")
        t = self._target(pool)
        for _ in range(self._conflict_retries):
            current = await self.scale(pool)
            if current.desired == n:
                return
            body = {"metadata": {"resourceVersion": current.resource_version}, "spec": {"replicas": n}}
            try:
                await self._call(self._apps.patch_namespaced_stateful_set_scale, t.statefulset, self._ns, body,
                                 _content_type=_MERGE_PATCH, not_found=self._missing(pool, t))
            except _Conflict:
                log.info("scale conflict; re-reading", extra={"pool": pool})
                continue
            log.info("pool scaled", extra={"pool": pool, "from": current.desired, "to": n})
            return
        raise ProviderUnavailableError(f"pool '{pool}': the StatefulSet kept changing under us "
                                       f"({self._conflict_retries} conflicts)")

    def _missing(self, pool: str, t: PoolNames) -> PoolNotFoundError:
        return PoolNotFoundError(f"pool '{pool}': StatefulSet '{t.statefulset}' not found in namespace "
                                 f"'{self._ns}' (was `skyfleet k8s render` output applied?)")

    # -- replicas --

    async def _pods(self, pool: str) -> list[Any]:
        t = self._target(pool)
        result = await self._call(self._core.list_namespaced_pod, self._ns, label_selector=t.selector_string,
                                  not_found=PoolNotFoundError(f"namespace '{self._ns}' not found"))
        return list(result.items or [])

    async def replicas(self, pool: str) -> list[ReplicaInfo]:
        t = self._target(pool)
        out = [self._info(pool, t, p) for p in await self._pods(pool)]
        return sorted(out, key=lambda r: (r.ordinal if r.ordinal is not None else 1 << 30, r.id))

    def _info(self, pool: str, t: PoolNames, pod: Any) -> ReplicaInfo:
        md, status = pod.metadata, pod.status
        labels = md.labels or {}
        index = labels.get("apps.kubernetes.io/pod-index") or md.name.rpartition("-")[2]
        ordinal = int(index) if index.isdigit() else None
        ready = any(c.type == "Ready" and c.status == "True" for c in (status.conditions or []))
        phase = status.phase or "Unknown"
        draining = (md.annotations or {}).get(ANNOTATION_DRAINING)
        if md.deletion_timestamp is not None:
            state, detail = ReplicaState.DRAINING, "terminating"
        elif phase in ("Failed", "Succeeded"):
            state, detail = ReplicaState.STOPPED, phase.lower()
        elif draining:
            state, detail = ReplicaState.DRAINING, f"drained at {draining}"
        elif phase == "Running" and ready:
            state, detail = ReplicaState.READY, "running"
        else:
            state, detail = ReplicaState.STARTING, phase.lower() if ready or phase != "Running" else "not ready"
        base_url = (f"http://{t.pod_host(ordinal, self._ns, self._domain)}:{self._port}"
                    if ordinal is not None else None)
        return ReplicaInfo(id=md.name, pool=pool, state=state, base_url=base_url, ordinal=ordinal,
                           node=pod.spec.node_name if pod.spec else None, started_at=status.start_time,
                           deadline=md.deletion_timestamp, detail=detail)

    async def drain(self, replica_id: str) -> None:
        self._pool_of(replica_id)
        body = {"metadata": {"annotations": {ANNOTATION_DRAINING: self._now().strftime("%Y-%m-%dT%H:%M:%SZ")}}}
        await self._call(self._core.patch_namespaced_pod, replica_id, self._ns, body, _content_type=_MERGE_PATCH,
                         not_found=ReplicaNotFoundError(f"replica '{replica_id}' not found"))

    async def delete_replica(self, replica_id: str, *, grace_period_s: int | None = None) -> None:
        self._pool_of(replica_id)
        kwargs: dict[str, Any] = {}
        if grace_period_s is not None:
            kwargs["grace_period_seconds"] = grace_period_s
        pod = await self._call(self._core.delete_namespaced_pod, replica_id, self._ns,
                               not_found=ReplicaNotFoundError(f"replica '{replica_id}' not found"), **kwargs)
        uid = getattr(getattr(pod, "metadata", None), "uid", None)
        if uid:
            self._deleted_uids.add(uid)

    # -- preemption notices --

    async def events(self) -> AsyncIterator[PreemptionNotice]:
        reported: set[str] = set()
        while True:
            live: set[str] = set()
            for pool in self.pools:
                try:
                    notices, uids = await self._notices(pool, reported)
                except (ProviderUnavailableError, PoolNotFoundError) as exc:
                    log.warning("cannot watch pool for preemptions", extra={"pool": pool, "error": exc.message})
                    continue
                live |= uids
                for notice in notices:
                    yield notice
            reported &= live
            self._deleted_uids &= live
            await asyncio.sleep(self._poll_interval)

    async def _notices(self, pool: str, reported: set[str]) -> tuple[list[PreemptionNotice], set[str]]:
        pods = await self._pods(pool)
        uids = {p.metadata.uid for p in pods}
        terminating = [p for p in pods if p.metadata.deletion_timestamp is not None
                       and p.metadata.uid not in reported and p.metadata.uid not in self._deleted_uids]
        if not terminating:
            return [], uids
        desired = (await self.scale(pool)).desired
        out = []
        for p in terminating:
            info = self._info(pool, self._target(pool), p)
            reason = _disruption(p.status.conditions or [])
            if reason is None and info.ordinal is not None and info.ordinal >= desired:
                continue  # a scale-down: the controller's own doing
            reported.add(p.metadata.uid)
            out.append(PreemptionNotice(replica_id=info.id, pool=pool, deadline=p.metadata.deletion_timestamp,
                                        reason=reason or "terminating", extra={"node": info.node or ""}))
        return out, uids


def _disruption(conditions: Iterable[Any]) -> str | None:
    for c in conditions:
        if c.type == "DisruptionTarget" and c.status == "True":
            return str(c.reason or "DisruptionTarget")
    return None


def _retry_after(headers: Any) -> float | None:
    try:
        value = headers.get("Retry-After") if headers is not None else None
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__name__", "call")
