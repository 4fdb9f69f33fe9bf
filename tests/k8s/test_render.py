"""skyfleet k8s render: the 3-pool example validates against the Kubernetes schemas; golden key fields."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from skyfleet.cli.app import app
from skyfleet.config import Settings
from skyfleet.cost.catalog import Catalog
from skyfleet.fleet.k8s.engine import drain_script
from skyfleet.fleet.k8s.naming import MAX_STATEFULSET_NAME, dns_label, pool_names
from skyfleet.fleet.k8s.render import RenderError, RenderOptions, render, write
from skyfleet.fleet.k8s.validate import ObjectInvalid, check_all, check_names, check_schema
from skyfleet.fleet.spec import FleetSpec, load_fleet_spec, parse_fleet_spec

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fleet-3-pools.yaml"
MODEL = "llama-3.1-8b-instruct"


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.builtin()


@pytest.fixture(scope="module")
def spec(catalog: Catalog) -> FleetSpec:
    return load_fleet_spec(EXAMPLE, catalog)


@pytest.fixture(scope="module")
def objects(spec: FleetSpec, catalog: Catalog) -> list[dict[str, Any]]:
    return render(spec, catalog)


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (obj,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def sts_of(objects: list[dict[str, Any]], pool: str) -> dict[str, Any]:
    return find(objects, "StatefulSet", pool_names(MODEL, pool).statefulset)


def test_every_rendered_object_validates_against_the_kubernetes_schemas(objects: list[dict[str, Any]]) -> None:
    assert check_all(objects) == 17
    kinds = [o["kind"] for o in objects]
    assert kinds.count("StatefulSet") == 3 and kinds.count("Service") == 4
    assert kinds.count("PodDisruptionBudget") == 4
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment"} <= set(kinds)
    assert "Secret" not in kinds


@pytest.mark.parametrize("breakage", [
    lambda o: o["spec"].__setitem__("replicaz", 2),  # unknown field (strict)
    lambda o: o["spec"].__setitem__("replicas", "two"),  # wrong type
    lambda o: o["spec"]["template"]["spec"]["containers"][0].pop("name"),  # required field
    lambda o: o["spec"]["template"]["spec"]["containers"][0]["resources"].__setitem__("limitz", {}),
])
def test_a_broken_object_fails_schema_validation(objects: list[dict[str, Any]], breakage: Any) -> None:
    broken = copy.deepcopy(sts_of(objects, "l40s-spot"))
    check_schema(broken)
    breakage(broken)
    with pytest.raises(ObjectInvalid, match="StatefulSet/llama-3-1-8b-instruct-l40s-spot"):
        check_schema(broken)


@pytest.mark.parametrize("breakage", [
    lambda o: o["metadata"].__setitem__("name", "Bad_Name"),
    lambda o: o["metadata"]["labels"].__setitem__("skyfleet.io/model", "meta-llama/Llama"),
    lambda o: o["spec"]["template"]["metadata"]["labels"].__setitem__("app.kubernetes.io/instance", "other"),
    lambda o: o["spec"].__setitem__("serviceName", "other"),
])
def test_names_labels_and_selectors_are_checked(objects: list[dict[str, Any]], breakage: Any) -> None:
    broken = copy.deepcopy(sts_of(objects, "a10g-spot"))
    check_names(broken)
    breakage(broken)
    with pytest.raises(ObjectInvalid):
        check_names(broken)


def test_pool_statefulsets_golden_fields(objects: list[dict[str, Any]]) -> None:
    spot, ondemand, a10g = (sts_of(objects, p) for p in ("l40s-spot", "l40s-ondemand", "a10g-spot"))
    assert [s["spec"]["replicas"] for s in (spot, ondemand, a10g)] == [0, 1, 0]  # the pools' min
    for s in (spot, ondemand, a10g):
        assert s["spec"]["podManagementPolicy"] == "Parallel"
        assert s["spec"]["serviceName"] == s["metadata"]["name"]
        (pvc,) = s["spec"]["volumeClaimTemplates"]
        assert pvc["spec"]["resources"]["requests"]["storage"] == "200Gi"
        pod = s["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"  # catalog: 1x L40S / 1x A10G
        assert {"name": "state", "mountPath": "/state"} in c["volumeMounts"]
        assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        assert c["livenessProbe"]["httpGet"]["path"] == "/health"
        assert c["image"] == "docker.io/vllm/vllm-openai:v0.10.1"
        args = c["args"]
        assert args[args.index("--model") + 1] == "meta-llama/Llama-3.1-8B-Instruct"
        assert args[args.index("--port") + 1] == "8000" and "--enable-prefix-caching" in args
        assert args[args.index("--max-model-len") + 1] == "8192"
        assert pod["automountServiceAccountToken"] is False
        meta = s["spec"]["template"]["metadata"]
        assert meta["annotations"]["prometheus.io/scrape"] == "true"
        assert meta["labels"]["skyfleet.io/model"] == MODEL
        assert "preStop" in c["lifecycle"]
    assert spot["spec"]["template"]["spec"]["nodeSelector"] == {
        "node.kubernetes.io/instance-type": "g6e.xlarge", "topology.kubernetes.io/region": "us-east-1",
        "karpenter.sh/capacity-type": "spot"}
    assert ondemand["spec"]["template"]["spec"]["nodeSelector"]["karpenter.sh/capacity-type"] == "on-demand"
    assert a10g["spec"]["template"]["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"] == "g5.xlarge"
    spot_tol = spot["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "karpenter.sh/capacity-type", "operator": "Equal", "value": "spot", "effect": "NoSchedule"} \
        in spot_tol
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spot_tol
    assert not any(t["key"] == "karpenter.sh/capacity-type"
                   for t in ondemand["spec"]["template"]["spec"]["tolerations"])
    a10g_args = a10g["spec"]["template"]["spec"]["containers"][0]["args"]
    assert a10g_args[a10g_args.index("--gpu-memory-utilization") + 1] == "0.92"  # the pool's own engine args
    assert spot["spec"]["template"]["metadata"]["labels"]["skyfleet.io/tier"] == "spot"
    # drain within the tier's notice: AWS spot 2 min, on-demand longer
    assert spot["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 110
    assert ondemand["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 300
    assert spot["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Delete"
    assert ondemand["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"


def test_gateway_config_is_valid_settings_with_every_pool_ordinal(objects: list[dict[str, Any]],
                                                                   spec: FleetSpec, catalog: Catalog,
                                                                   tmp_path: Path) -> None:
    cm = find(objects, "ConfigMap", "skyfleet-gateway")
    raw = yaml.safe_load(cm["data"]["gateway.yaml"])
    # the controller runs on the ConfigMap's fleet.yaml (mounted beside gateway.yaml), with this provider
    assert raw["fleet_spec"] == "/etc/skyfleet/fleet.yaml" and raw["fleet"] == {"provider": "kubernetes"}
    (tmp_path / "fleet.yaml").write_text(cm["data"]["fleet.yaml"])
    settings = Settings(**{**raw, "fleet_spec": str(tmp_path / "fleet.yaml")})
    assert settings.keys.provider == "aws-kms" and settings.local.replicas == 0
    urls = [r.url for r in settings.static_replicas]
    assert len(urls) == 6 + 4 + 4  # every pool's max
    names = pool_names(MODEL, "l40s-spot")
    assert f"http://{names.statefulset}-5.{names.statefulset}.skyfleet.svc.cluster.local:8000" in urls
    first = settings.static_replicas[0]
    assert (first.tier, first.instance_type, first.region, first.engine) == ("spot", "g6e.xlarge", "us-east-1", "vllm")
    # routing capacity: sequences at the SLO, tokens_per_s x tpot_p95_s (1400 x 0.08 and 700 x 0.08), so the
    # L40S replicas take twice the A10G's share
    capacity = {r.pool: r.capacity for r in settings.static_replicas}
    assert capacity == {"l40s-spot": 112, "l40s-ondemand": 112, "a10g-spot": 56}
    assert parse_fleet_spec(yaml.safe_load(cm["data"]["fleet.yaml"]), catalog) == spec

    deployment = find(objects, "Deployment", "skyfleet-gateway")
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SKYFLEET_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "skyfleet-secrets", "key": "database-url", "optional": False}
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "skyfleet-controller"


def test_no_secret_can_be_rendered(spec: FleetSpec, catalog: Catalog) -> None:
    for bad in ({"database_url": "postgresql://u:p@db/x"}, {"admin_key": "sk-x"},
                {"keys": {"provider": "vault-transit", "vault_url": "https://v", "vault_token": "s.x"}}):
        with pytest.raises(RenderError, match="must not be set here"):
            render(spec, catalog, RenderOptions(gateway_settings=bad))
    with pytest.raises(RenderError, match=r"keys\.provider local"):
        render(spec, catalog, RenderOptions(gateway_settings={"keys": {"provider": "local"}}))


def test_gcp_pools_spot_and_on_demand_placement(catalog: Catalog) -> None:
    spec = parse_fleet_spec({"models": {"qwen2.5-72b": {
        "engine": "sglang", "engine_args": {"model": "Qwen/Qwen2.5-72B-Instruct"},
        "pools": [
            {"name": "a100-spot", "instance_type": "a2-highgpu-2g", "region": "us-central1", "tier": "spot", "max": 3},
            {"name": "a100", "instance_type": "a2-highgpu-2g", "region": "us-central1", "tier": "on-demand",
             "min": 1, "max": 2}]}}}, catalog)
    with pytest.raises(RenderError, match="keys"):
        render(spec, catalog)
    keys = {"keys": {"provider": "vault-transit", "vault_url": "https://vault.internal:8200",
                     "vault_token_file": "/var/run/vault/token"}}
    objects = render(spec, catalog, RenderOptions(namespace="llm", gateway_settings=keys,
                                                  image_registry="registry.example.com/mirror"))
    check_all(objects)
    spot = find(objects, "StatefulSet", "qwen2-5-72b-a100-spot")["spec"]["template"]["spec"]
    assert spot["nodeSelector"] == {"node.kubernetes.io/instance-type": "a2-highgpu-2g",
                                    "topology.kubernetes.io/region": "us-central1", "cloud.google.com/gke-spot": "true"}
    assert {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"} \
        in spot["tolerations"]
    assert spot["terminationGracePeriodSeconds"] == 25  # GCP gives 30 s
    (c,) = spot["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert c["image"] == "registry.example.com/mirror/lmsysorg/sglang:v0.4.10"
    assert c["command"] == ["python3", "-m", "sglang.launch_server"]
    assert c["args"][c["args"].index("--tp-size") + 1] == "2"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    ondemand = find(objects, "StatefulSet", "qwen2-5-72b-a100")["spec"]["template"]["spec"]
    assert "cloud.google.com/gke-spot" not in ondemand["nodeSelector"]
    term = ondemand["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term == [{"matchExpressions": [{"key": "cloud.google.com/gke-spot", "operator": "DoesNotExist"}]}]
    assert {o["metadata"]["namespace"] for o in objects if o["kind"] != "Namespace"} == {"llm"}


def test_llama_cpp_engine_for_a_gguf_model(catalog: Catalog) -> None:
    spec = parse_fleet_spec({"models": {"smollm2": {
        "engine": "llama", "engine_args": {"model": "/state/models/smollm2.gguf", "ctx_size": 4096},
        "pools": [{"name": "t4", "instance_type": "g4dn.xlarge", "region": "us-east-1", "tier": "on-demand",
                   "max": 2}]}}}, catalog)
    objects = render(spec, catalog)
    check_all(objects)
    (c,) = find(objects, "StatefulSet", "smollm2-t4")["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "ghcr.io/ggml-org/llama.cpp:server-cuda" and "command" not in c
    assert c["args"][c["args"].index("--model") + 1] == "/state/models/smollm2.gguf"
    assert "--metrics" in c["args"] and c["args"][c["args"].index("--ctx-size") + 1] == "4096"


def test_drain_script_waits_for_the_engines_busy_metrics() -> None:
    script = drain_script("vllm", 100)
    assert "vllm[:]num_requests_running|vllm[:]num_requests_waiting" in script and "+ 100 ))" in script
    assert "llamacpp[:]requests_processing" in drain_script("llama", 10)


def test_names_stay_within_kubernetes_limits() -> None:
    long = pool_names("a" * 80 + "/Model.Name", "pool-with-a-rather-long-name")
    assert len(long.statefulset) <= MAX_STATEFULSET_NAME
    assert long.statefulset != pool_names("a" * 80 + "/Model.Other", "pool-with-a-rather-long-name").statefulset
    assert dns_label("7b-model") == "m-7b-model"


def test_colliding_names_are_refused(catalog: Catalog) -> None:
    pool = {"name": "p", "instance_type": "g5.xlarge", "region": "us-east-1", "tier": "on-demand", "max": 1}
    spec = parse_fleet_spec({"models": {"m.1": {"pools": [pool]}, "m-1": {"pools": [pool]}}}, catalog)
    with pytest.raises(RenderError, match="would both be named 'm-1-p'"):
        render(spec, catalog)


def test_output_is_deterministic_and_cli_writes_it(tmp_path: Path, objects: list[dict[str, Any]]) -> None:
    runner = CliRunner()
    out = tmp_path / "k8s"
    result = runner.invoke(app, ["k8s", "render", "--spec", str(EXAMPLE), "--out", str(out)])
    assert result.exit_code == 0, result.output
    files = sorted(out.iterdir())
    assert len(files) == 17 and files[0].name == "00-namespace-skyfleet.yaml"
    first = {f.name: f.read_bytes() for f in files}
    (out / "99-stale.yaml").write_text("{}")
    assert runner.invoke(app, ["k8s", "render", "--spec", str(EXAMPLE), "--out", str(out)]).exit_code == 0
    assert {f.name: f.read_bytes() for f in sorted(out.iterdir())} == first  # same bytes, stale file gone
    assert [yaml.safe_load(b) for b in first.values()] == objects
    assert b"&id" not in b"".join(first.values())  # no YAML anchors
    result = runner.invoke(app, ["k8s", "validate", str(out)])
    assert result.exit_code == 0 and "17 objects valid" in result.output

    broken = yaml.safe_load((out / files[6].name).read_text())
    broken["spec"]["replicaz"] = 1
    write([broken], tmp_path / "broken")
    result = runner.invoke(app, ["k8s", "validate", str(tmp_path / "broken")])
    assert result.exit_code == 1 and "replicaz" in result.output


def test_cli_rejects_a_bad_spec_naming_the_field(tmp_path: Path) -> None:
    data = yaml.safe_load(EXAMPLE.read_text())
    data["models"][MODEL]["pools"][0]["instance_type"] = "g9.huge"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["k8s", "render", "--spec", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "pools[0]: instance_type" in result.output and "g9.huge" in result.output
    assert not (tmp_path / "o").exists()
