"""One pool as Kubernetes objects: its StatefulSet (engine pods), headless Service and PodDisruptionBudget.

Placement, per the instance catalog entry of the pool's instance type and region:

* every cloud: ``node.kubernetes.io/instance-type`` and ``topology.kubernetes.io/region`` (well-known labels);
* AWS (Karpenter): ``karpenter.sh/capacity-type: spot|on-demand``; a spot pool also tolerates the taint
  ``karpenter.sh/capacity-type=spot:NoSchedule`` (for NodePools that keep spot capacity for tolerant pods);
* GCP (GKE): a spot pool selects ``cloud.google.com/gke-spot: "true"`` and tolerates its taint; an
  on-demand pool requires the label to be absent (node affinity), so it never lands on spot capacity;
* GPU pools: ``nvidia.com/gpu`` = the catalog's accelerator count (limits), tolerating the GPU taint;
  replicas of a pool spread across zones (a reclaim rarely takes two zones at once).

Draining: ``terminationGracePeriodSeconds`` fits the tier (AWS spot: 110 s of its 2-minute notice; GCP
spot: 25 s of 30 s; on-demand: ``on_demand_grace_s``), and a ``preStop`` hook waits, within it, until
the engine's ``/metrics`` show no running or waiting request (the gateway stops routing to a
terminating replica first: the provider reports it), so in-flight requests finish before SIGTERM.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from skyfleet.fleet.k8s.naming import (
    ANNOTATION_MODEL,
    ENGINE_PORT,
    LABEL_MODEL,
    LABEL_POOL,
    LABEL_TIER,
    SECRET_NAME,
    PoolNames,
    label_value,
)

if TYPE_CHECKING:
    from skyfleet.cost.catalog import InstanceType
    from skyfleet.fleet.k8s.render import RenderOptions
    from skyfleet.fleet.spec import ModelFleet, PoolSpec

STATE_MOUNT = "/state"
#: Engine metrics that count requests in the engine (running + waiting): the preStop drain waits for 0.
_BUSY_METRICS = {
    "vllm": ("vllm:num_requests_running", "vllm:num_requests_waiting"),
    "sim": ("vllm:num_requests_running", "vllm:num_requests_waiting"),
    "sglang": ("sglang:num_running_reqs", "sglang:num_queue_reqs"),
    "llama": ("llamacpp:requests_processing", "llamacpp:requests_deferred"),
}
DRAIN_DELAY_S = 2  # before the drain loop: the controller notices the termination and stops routing to it


def grace_seconds(pool: PoolSpec, itype: InstanceType, on_demand_grace_s: int) -> int:
    if pool.tier == "spot":
        return 25 if itype.cloud == "gcp" else 110
    return on_demand_grace_s


def labels(names: PoolNames, pool: PoolSpec, version: str) -> dict[str, str]:
    return {
        **names.selector,
        "app.kubernetes.io/component": "engine",
        "app.kubernetes.io/part-of": "skyfleet",
        "app.kubernetes.io/managed-by": "skyfleet",
        "app.kubernetes.io/version": label_value(version),
        LABEL_POOL: label_value(pool.name),
        LABEL_MODEL: label_value(names.model),
        LABEL_TIER: pool.tier,
    }


def placement(pool: PoolSpec, itype: InstanceType) -> dict[str, Any]:
    """nodeSelector, tolerations and affinity of a pool's pods."""
    selector = {"node.kubernetes.io/instance-type": pool.instance_type, "topology.kubernetes.io/region": pool.region}
    tolerations: list[dict[str, Any]] = []
    affinity: dict[str, Any] | None = None
    if itype.cloud == "gcp":
        if pool.tier == "spot":
            selector["cloud.google.com/gke-spot"] = "true"
            tolerations.append({"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true",
                                "effect": "NoSchedule"})
        else:
            affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "cloud.google.com/gke-spot", "operator": "DoesNotExist"}]}]}}}
    else:
        selector["karpenter.sh/capacity-type"] = pool.tier
        if pool.tier == "spot":
            tolerations.append({"key": "karpenter.sh/capacity-type", "operator": "Equal", "value": "spot",
                                "effect": "NoSchedule"})
    if itype.accelerator_count > 0:
        tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    out: dict[str, Any] = {"nodeSelector": selector, "tolerations": tolerations}
    if affinity is not None:
        out["affinity"] = affinity
    return out


def cli_args(args: Mapping[str, Any]) -> list[str]:
    """Engine arguments as flags, sorted: ``max_model_len: 8192`` -> ``--max-model-len 8192``; ``true`` ->
    a bare flag; ``false``/null -> omitted; a list -> the flag repeated; a mapping -> JSON."""
    out: list[str] = []
    for key in sorted(args):
        value = args[key]
        flag = "--" + str(key).replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            out.append(flag)
        elif isinstance(value, list | tuple):
            for item in value:
                out += [flag, str(item)]
        elif isinstance(value, Mapping):
            out += [flag, json.dumps(value, sort_keys=True, separators=(",", ":"))]
        else:
            out += [flag, str(value)]
    return out


def _has(args: Mapping[str, Any], *keys: str) -> bool:
    return any(k in args or k.replace("-", "_") in args for k in keys)


def engine_command(engine: str, model: str, args: dict[str, Any], gpus: int) -> tuple[list[str] | None, list[str]]:
    """(command, args) of the engine container; ``args['model']`` is what to load (default: the model name)."""
    args = dict(args)
    source = str(args.pop("model", model))
    port = str(ENGINE_PORT)
    if engine == "vllm":
        head = ["--model", source, "--served-model-name", model, "--host", "0.0.0.0", "--port", port,
                "--enable-prefix-caching"]
        if gpus > 1 and not _has(args, "tensor-parallel-size", "tensor_parallel_size"):
            head += ["--tensor-parallel-size", str(gpus)]
        return ["python3", "-m", "vllm.entrypoints.openai.api_server"], head + cli_args(args)
    if engine == "sglang":
        head = ["--model-path", source, "--served-model-name", model, "--host", "0.0.0.0", "--port", port,
                "--enable-metrics"]
        if gpus > 1 and not _has(args, "tp-size", "tp_size", "tp"):
            head += ["--tp-size", str(gpus)]
        return ["python3", "-m", "sglang.launch_server"], head + cli_args(args)
    if engine == "llama":
        load = ["--model", source] if source.endswith(".gguf") else ["--hf-repo", source]
        head = ["--host", "0.0.0.0", "--port", port, "--alias", model, "--metrics", "--slots",
                "--slot-save-path", f"{STATE_MOUNT}/slots", *load]
        if gpus > 0 and not _has(args, "n-gpu-layers", "n_gpu_layers"):
            head += ["--n-gpu-layers", "999"]
        return None, head + cli_args(args)  # the image's entrypoint is llama-server
    if engine == "sim":
        return ["skyfleet", "engine", "sim"], ["--host", "0.0.0.0", "--port", port, "--model", model,
                                               *cli_args(args)]
    raise ValueError(f"unknown engine {engine!r}")


def drain_script(engine: str, budget_s: int) -> str:
    """sh + curl + awk: wait until the engine has no running or waiting request, at most ``budget_s``."""
    names = "|".join(m.replace(":", "[:]") for m in _BUSY_METRICS[engine])
    return (
        f"sleep {DRAIN_DELAY_S}; end=$(( $(date +%s) + {max(1, budget_s)} )); "
        f"while [ $(date +%s) -lt $end ]; do "
        f"busy=$(curl -sf http://127.0.0.1:{ENGINE_PORT}/metrics | "
        f"awk '/^({names})[{{ ]/ {{s+=$NF}} END {{print s+0}}'); "
        f'[ "$busy" = "0" ] && exit 0; sleep 1; done; exit 0'
    )


def _image(engine: str, gpus: int, options: RenderOptions) -> str:
    key = {"llama": "llama-cuda" if gpus else "llama"}.get(engine, engine)
    return options.image(key)


def pool_objects(model: str, fleet: ModelFleet, pool: PoolSpec, names: PoolNames, itype: InstanceType,
                 options: RenderOptions) -> list[dict[str, Any]]:
    """The pool's headless Service, StatefulSet and PodDisruptionBudget."""
    ns = options.namespace
    gpus = itype.accelerator_count
    engine = fleet.engine
    lab = labels(names, pool, options.version)
    meta = {"name": names.statefulset, "namespace": ns, "labels": lab, "annotations": {ANNOTATION_MODEL: model}}
    grace = grace_seconds(pool, itype, options.on_demand_grace_s)
    command, args = engine_command(engine, model, {**fleet.engine_args, **pool.engine_args}, gpus)

    requests = {"cpu": str(max(1, int(itype.vcpus * 0.75))), "memory": f"{max(1, int(itype.memory_gib * 0.75))}Gi"}
    limits: dict[str, str] = {"memory": requests["memory"]}
    if gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(gpus)
    http_get = {"path": "/health", "port": "http"}
    container: dict[str, Any] = {
        "name": "engine",
        "image": _image(engine, gpus, options),
        "imagePullPolicy": "IfNotPresent",
        "args": args,
        "ports": [{"name": "http", "containerPort": ENGINE_PORT, "protocol": "TCP"}],
        "env": [
            {"name": "HF_HOME", "value": f"{STATE_MOUNT}/hf"},
            {"name": "LLAMA_CACHE", "value": f"{STATE_MOUNT}/hf"},
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": SECRET_NAME, "key": "hf-token",
                                                                "optional": True}}},
        ],
        "resources": {"requests": requests, "limits": limits},
        # model download + load can take long: liveness only starts once the engine answered once
        "startupProbe": {"httpGet": http_get, "periodSeconds": 10, "failureThreshold": 180, "timeoutSeconds": 5},
        "readinessProbe": {"httpGet": http_get, "periodSeconds": 5, "failureThreshold": 2, "timeoutSeconds": 3},
        "livenessProbe": {"httpGet": http_get, "periodSeconds": 10, "failureThreshold": 6, "timeoutSeconds": 5},
        "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c",
                                                       drain_script(engine, grace - DRAIN_DELAY_S - 5)]}}},
        "volumeMounts": [{"name": "state", "mountPath": STATE_MOUNT}],
        "securityContext": {"allowPrivilegeEscalation": False},
    }
    if command is not None:
        container["command"] = command
    volumes: list[dict[str, Any]] = []
    if gpus > 1:  # NCCL between the GPUs of a tensor-parallel engine needs more than the default 64 MiB
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}})
        container["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"})

    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,  # engines never talk to the API server
        "terminationGracePeriodSeconds": grace,
        **placement(pool, itype),
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                       "whenUnsatisfiable": "ScheduleAnyway",
                                       "labelSelector": {"matchLabels": names.selector}}],
        "containers": [container],
    }
    if volumes:
        pod_spec["volumes"] = volumes
    pvc: dict[str, Any] = {
        "metadata": {"name": "state", "labels": names.selector},
        "spec": {"accessModes": ["ReadWriteOnce"],
                 "resources": {"requests": {"storage": f"{options.state_size_gib(gpus)}Gi"}}},
    }
    if options.storage_class is not None:
        pvc["spec"]["storageClassName"] = options.storage_class
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": meta,
        "spec": {
            "serviceName": names.statefulset,
            "replicas": pool.min,
            "podManagementPolicy": "Parallel",
            # Spot: a scaled-away replica's volume is deleted (a zonal volume would pin the next replica to
            # its zone, where spot capacity may be gone); on-demand keeps it: a warm model cache next time.
            "persistentVolumeClaimRetentionPolicy": {
                "whenScaled": "Delete" if pool.tier == "spot" else "Retain", "whenDeleted": "Retain"},
            "selector": {"matchLabels": names.selector},
            "updateStrategy": {"type": "RollingUpdate"},
            "template": {
                "metadata": {"labels": lab, "annotations": {
                    ANNOTATION_MODEL: model,
                    "prometheus.io/scrape": "true",
                    "prometheus.io/port": str(ENGINE_PORT),
                    "prometheus.io/path": "/metrics",
                    # the fleet controller decides when an engine goes, not Karpenter's consolidation
                    "karpenter.sh/do-not-disrupt": "true",
                }},
                "spec": pod_spec,
            },
            "volumeClaimTemplates": [pvc],
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": names.selector,
                 "ports": [{"name": "http", "port": ENGINE_PORT, "targetPort": "http", "protocol": "TCP"}]},
    }
    pdb = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta,
        # voluntary disruptions (node drains, consolidation) take one replica of a pool at a time
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": names.selector}},
    }
    return [service, statefulset, pdb]
