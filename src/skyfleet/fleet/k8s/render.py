"""``skyfleet k8s render``: a fleet spec as plain Kubernetes objects (dicts), written as YAML files.

Objects, in apply order: the Namespace; the controller's ServiceAccount, Role (get/patch/update on
``statefulsets/scale``, get/list/watch on ``statefulsets``, get/list/watch/patch/delete on ``pods``)
and RoleBinding; the gateway's ConfigMap (its settings: every pool's ordinals ``0..max-1`` as static
replicas by their stable DNS names, so a replica the controller adds is routed to once healthy; the
fleet spec beside it); per pool a headless Service, a StatefulSet and a PodDisruptionBudget
(``engine.py``); the gateway's Service, Deployment and PodDisruptionBudget.

No secret is ever written: the gateway reads ``DATABASE_URL`` etc. from the Secret ``skyfleet-secrets``
(keys ``database-url``, ``redis-url``, ``admin-key``, ``cache-salt-secret``, ``hf-token``), which the
operator creates. Gateway settings that are secrets are refused in ``gateway_settings``.

Output is deterministic: objects in a fixed order, keys sorted, one file per object
(``NN-<kind>-<name>.yaml``, so ``kubectl apply -f DIR`` applies them in order).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from skyfleet.fleet.k8s.engine import pool_objects
from skyfleet.fleet.k8s.naming import (
    ENGINE_PORT,
    GATEWAY_NAME,
    SECRET_NAME,
    SERVICE_ACCOUNT,
    dns_label,
    label_value,
    pool_names,
)

if TYPE_CHECKING:
    from skyfleet.cost.catalog import Catalog
    from skyfleet.fleet.spec import FleetSpec, ModelFleet, PoolSpec

DEFAULT_IMAGES: dict[str, str] = {
    "vllm": "docker.io/vllm/vllm-openai:v0.10.1",
    "sglang": "docker.io/lmsysorg/sglang:v0.4.10",
    "llama": "ghcr.io/ggml-org/llama.cpp:server",
    "llama-cuda": "ghcr.io/ggml-org/llama.cpp:server-cuda",
    "sim": "docker.io/skyfleet/skyfleet:{version}",
    "gateway": "docker.io/skyfleet/skyfleet:{version}",
}
#: Gateway settings that hold secrets: they come from the Secret, never from the rendered ConfigMap.
SECRET_SETTINGS = ("database_url", "redis_url", "admin_key", "cache_salt_secret", "keys.vault_token",
                   "budgets.webhook_url", "static_replicas")
GATEWAY_PORT = 8000
CONFIG_DIR = "/etc/skyfleet"


class RenderError(ValueError):
    """The spec or options cannot be rendered; the message says why."""


@dataclass(frozen=True)
class RenderOptions:
    namespace: str = "skyfleet"
    #: Pull every image through this registry (a mirror), e.g. registry.example.com/mirror.
    image_registry: str | None = None
    images: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_IMAGES))
    version: str = "0.1.0"
    gateway_replicas: int = 2
    #: Extra gateway settings (keys, oidc, limits, ...) merged into its ConfigMap; no secrets.
    gateway_settings: Mapping[str, Any] = field(default_factory=dict)
    storage_class: str | None = None
    gpu_state_gib: int = 200  # model cache + KV/slot state per GPU replica
    cpu_state_gib: int = 50
    cluster_domain: str = "cluster.local"
    on_demand_grace_s: int = 300

    def image(self, key: str) -> str:
        ref = self.images.get(key) or DEFAULT_IMAGES[key]
        ref = ref.format(version=self.version)
        if self.image_registry:
            first, _, rest = ref.partition("/")
            path = rest if rest and ("." in first or ":" in first or first == "localhost") else ref
            ref = f"{self.image_registry.rstrip('/')}/{path}"
        return ref

    def state_size_gib(self, gpus: int) -> int:
        return self.gpu_state_gib if gpus else self.cpu_state_gib


def _common_labels(component: str, version: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": GATEWAY_NAME if component == "gateway" else f"skyfleet-{component}",
            "app.kubernetes.io/component": component, "app.kubernetes.io/part-of": "skyfleet",
            "app.kubernetes.io/managed-by": "skyfleet", "app.kubernetes.io/version": label_value(version)}


def render(spec: FleetSpec, catalog: Catalog, options: RenderOptions | None = None) -> list[dict[str, Any]]:
    """Every object, in apply order."""
    options = options or RenderOptions()
    ns = options.namespace
    if dns_label(ns) != ns:
        raise RenderError(f"namespace {ns!r} is not a DNS label (lower case letters, digits, '-')")
    engines: list[dict[str, Any]] = []
    replicas: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for model, fleet in sorted(spec.models.items()):
        for pool in fleet.pools:
            names = pool_names(model, pool.name)
            other = seen.setdefault(names.statefulset, names.key)
            if other != names.key:
                raise RenderError(f"pools {other} and {names.key} would both be named {names.statefulset!r}")
            itype = catalog.get(pool.instance_type, pool.region)
            engines += pool_objects(model, fleet, pool, names, itype, options)
            capacity = replica_capacity(fleet, pool)
            for i in range(pool.max):
                replicas.append({
                    "url": f"http://{names.pod_host(i, ns, options.cluster_domain)}:{ENGINE_PORT}",
                    "model": model, "engine": fleet.engine, "pool": pool.name,
                    "tier": pool.tier, "instance_type": pool.instance_type, "region": pool.region,
                    **({"capacity": capacity} if capacity is not None else {})})
    settings = _gateway_settings(spec, catalog, options, replicas)
    objects = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": _common_labels("fleet",
                                                                                                 options.version)}},
        *_rbac(options),
        _config_map(spec, settings, options),
        *engines,
        *_gateway(options),
    ]
    return [copy.deepcopy(o) for o in objects]


def replica_capacity(fleet: ModelFleet, pool: PoolSpec) -> int | None:
    """A pool's replicas' routing capacity: the sequences one replica runs at once at the SLO, by Little's law
    ``tokens_per_s x tpot_p95_s`` (each sequence makes one token per TPOT), so that a mixed fleet is loaded in
    proportion to speed; None (the gateway's default) without the pool's nominal ``tokens_per_s``."""
    if pool.tokens_per_s is None:
        return None
    return max(1, min(4096, math.floor(pool.tokens_per_s * fleet.slo.tpot_p95_s)))


def _check_no_secrets(settings: Mapping[str, Any]) -> None:
    for dotted in SECRET_SETTINGS:
        node: Any = settings
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None:
            where = "the rendered pools" if dotted == "static_replicas" else f"the Secret '{SECRET_NAME}'"
            raise RenderError(f"gateway settings: {dotted} must not be set here (it comes from {where})")


def _gateway_settings(spec: FleetSpec, catalog: Catalog, options: RenderOptions,
                      replicas: list[dict[str, Any]]) -> dict[str, Any]:
    extra = dict(options.gateway_settings)
    _check_no_secrets(extra)
    if "keys" not in extra:
        clouds = {(catalog.get(p.instance_type, p.region).cloud, p.region)
                  for f in spec.models.values() for p in f.pools}
        if len(clouds) == 1 and next(iter(clouds))[0] == "aws":
            extra["keys"] = {"provider": "aws-kms", "kms_region": next(iter(clouds))[1]}
        else:
            raise RenderError("gateway settings need a `keys` section (provider aws-kms or vault-transit): the local "
                              "key provider needs one key file shared by every gateway, which pods do not have")
    if (extra.get("keys") or {}).get("provider", "local") == "local":
        raise RenderError("gateway settings: keys.provider local does not work on Kubernetes (the key file must be "
                          "shared by every gateway and outlive its pods): use aws-kms or vault-transit")
    base: dict[str, Any] = {
        "host": "0.0.0.0", "port": GATEWAY_PORT, "data_dir": "/var/lib/skyfleet", "bootstrap": False,
        "local": {"replicas": 0},
        # the fleet controller, with the Kubernetes provider, on the spec beside this file (the gateway holding
        # the PostgreSQL advisory lock runs it; the others route and queue)
        "fleet_spec": f"{CONFIG_DIR}/fleet.yaml", "fleet": {"provider": "kubernetes"},
    }
    return {**base, **extra, "static_replicas": replicas}


def _config_map(spec: FleetSpec, settings: dict[str, Any], options: RenderOptions) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": GATEWAY_NAME, "namespace": options.namespace,
                     "labels": _common_labels("gateway", options.version)},
        "data": {
            "gateway.yaml": yaml.safe_dump(settings, sort_keys=True, default_flow_style=False),
            "fleet.yaml": yaml.safe_dump(spec.model_dump(mode="json", exclude_defaults=True), sort_keys=True,
                                         default_flow_style=False),
        },
    }


def rbac_rules() -> list[dict[str, Any]]:
    """What the Kubernetes provider does, and nothing more."""
    return [
        {"apiGroups": ["apps"], "resources": ["statefulsets/scale"], "verbs": ["get", "patch", "update"]},
        {"apiGroups": ["apps"], "resources": ["statefulsets"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "patch", "delete"]},
    ]


def _rbac(options: RenderOptions) -> list[dict[str, Any]]:
    meta = {"name": SERVICE_ACCOUNT, "namespace": options.namespace,
            "labels": _common_labels("controller", options.version)}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta, "rules": rbac_rules()},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta,
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": SERVICE_ACCOUNT},
         "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": options.namespace}]},
    ]


def _secret_env(var: str, key: str, optional: bool) -> dict[str, Any]:
    return {"name": var, "valueFrom": {"secretKeyRef": {"name": SECRET_NAME, "key": key, "optional": optional}}}


def _gateway(options: RenderOptions) -> list[dict[str, Any]]:
    lab = _common_labels("gateway", options.version)
    selector = {"app.kubernetes.io/name": GATEWAY_NAME, "app.kubernetes.io/component": "gateway"}
    meta = {"name": GATEWAY_NAME, "namespace": options.namespace, "labels": lab}
    probe = {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5, "timeoutSeconds": 3}
    container = {
        "name": "gateway",
        "image": options.image("gateway"),
        "imagePullPolicy": "IfNotPresent",
        "command": ["skyfleet", "serve"],
        "ports": [{"name": "http", "containerPort": GATEWAY_PORT, "protocol": "TCP"}],
        "env": [
            {"name": "SKYFLEET_CONFIG", "value": f"{CONFIG_DIR}/gateway.yaml"},
            _secret_env("SKYFLEET_DATABASE_URL", "database-url", False),
            _secret_env("SKYFLEET_REDIS_URL", "redis-url", True),
            _secret_env("SKYFLEET_ADMIN_KEY", "admin-key", True),
            _secret_env("SKYFLEET_CACHE_SALT_SECRET", "cache-salt-secret", True),
        ],
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        # /healthz, not /readyz: a gateway whose models are scaled to zero must still take requests (it
        # queues them while a replica starts)
        "readinessProbe": {**probe, "failureThreshold": 2},
        "livenessProbe": {**probe, "failureThreshold": 6},
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                         {"name": "data", "mountPath": "/var/lib/skyfleet"},
                         {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
        "spec": {
            "replicas": options.gateway_replicas,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": lab},
                "spec": {
                    "serviceAccountName": SERVICE_ACCOUNT,
                    "terminationGracePeriodSeconds": 60,  # drain_timeout_s (30 s) + margin
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [container],
                    "volumes": [{"name": "config", "configMap": {"name": GATEWAY_NAME}},
                                {"name": "data", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": meta,
        "spec": {"type": "ClusterIP", "selector": selector,
                 "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]},
    }
    pdb = {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta,
           "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}}}
    return [service, deployment, pdb]


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_yaml(obj: Mapping[str, Any]) -> str:
    return yaml.dump(dict(obj), Dumper=_Dumper, sort_keys=True, default_flow_style=False, width=120)


def file_name(index: int, obj: Mapping[str, Any]) -> str:
    return f"{index:02d}-{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"


def write(objects: list[dict[str, Any]], out: Path) -> list[Path]:
    """One YAML file per object in ``out`` (created); earlier ``*.yaml`` files there are replaced."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("[0-9][0-9]-*.yaml"):
        old.unlink()
    paths = []
    for i, obj in enumerate(objects):
        path = out / file_name(i, obj)
        path.write_text(to_yaml(obj))
        paths.append(path)
    return paths
