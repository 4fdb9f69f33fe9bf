"""skyfleet k8s render|validate: the fleet spec as plain Kubernetes YAML, checked offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(help="Kubernetes: render the fleet spec as plain YAML, validate it offline.",
                  no_args_is_help=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"skyfleet: {message}", err=True)
    return typer.Exit(code)


def _load_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise _fail(f"{what} {path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise _fail(f"{what} {path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise _fail(f"{what} {path}: expected a mapping")
    return data


@app.command("render")
def render_cmd(
    spec: Annotated[Path, typer.Option("--spec", help="Fleet spec YAML (see examples/fleet-3-pools.yaml).")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the YAML files to (created).")],
    namespace: Annotated[str, typer.Option(help="Namespace of every object.")] = "skyfleet",
    image_registry: Annotated[str | None, typer.Option(
        help="Pull every image through this registry (mirror), e.g. registry.example.com/mirror.")] = None,
    gateway_settings: Annotated[Path | None, typer.Option(
        help="YAML of extra gateway settings (keys, oidc, limits, ...) for its ConfigMap; no secrets.")] = None,
    gateway_replicas: Annotated[int, typer.Option(min=1, help="Gateway replicas.")] = 2,
    storage_class: Annotated[str | None, typer.Option(
        help="StorageClass of the engines' state volumes; default: the cluster's default.")] = None,
    kubernetes_version: Annotated[str | None, typer.Option(
        help="Kubernetes version to validate against (default: the one skyfleet is checked with).")] = None,
) -> None:
    """Write one YAML file per object (apply with `kubectl apply -f OUT`), validated against the
    Kubernetes OpenAPI schemas first."""
    from skyfleet.config import ConfigError
    from skyfleet.cost.catalog import Catalog
    from skyfleet.fleet.k8s.render import RenderError, RenderOptions, render, write
    from skyfleet.fleet.k8s.validate import KUBERNETES_VERSION, ObjectInvalid, check_all
    from skyfleet.fleet.spec import load_fleet_spec

    extra = _load_yaml_mapping(gateway_settings, "gateway settings") if gateway_settings else {}
    catalog = Catalog.builtin()
    try:
        fleet = load_fleet_spec(spec, catalog)
        options = RenderOptions(namespace=namespace, image_registry=image_registry, gateway_settings=extra,
                                gateway_replicas=gateway_replicas, storage_class=storage_class)
        objects = render(fleet, catalog, options)
        check_all(objects, kubernetes_version or KUBERNETES_VERSION)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    except (RenderError, ObjectInvalid) as exc:
        raise _fail(f"cannot render {spec}: {exc}") from None
    paths = write(objects, out)
    typer.echo(f"wrote {len(paths)} objects to {out} (valid for Kubernetes {kubernetes_version or KUBERNETES_VERSION}); "
               f"apply with: kubectl apply -f {out}")


@app.command("validate")
def validate_cmd(
    paths: Annotated[list[Path], typer.Argument(help="YAML files or directories of them.")],
    kubernetes_version: Annotated[str | None, typer.Option(help="Kubernetes version to validate against.")] = None,
) -> None:
    """Validate Kubernetes YAML (e.g. edited render output) offline, strictly (unknown fields are errors)."""
    import yaml

    from skyfleet.fleet.k8s.validate import KUBERNETES_VERSION, ObjectInvalid, check_all

    files = sorted(f for p in paths for f in ([p] if p.is_file() else [*p.glob("*.yaml"), *p.glob("*.yml")]))
    if not files:
        raise _fail("no YAML files found")
    objects = []
    for f in files:
        try:
            objects += [d for d in yaml.safe_load_all(f.read_text()) if d]
        except (OSError, yaml.YAMLError) as exc:
            raise _fail(f"{f}: {exc}") from None
    try:
        n = check_all(objects, kubernetes_version or KUBERNETES_VERSION)
    except ObjectInvalid as exc:
        raise _fail(f"invalid: {exc}", 1) from None
    typer.echo(f"{n} objects valid for Kubernetes {kubernetes_version or KUBERNETES_VERSION}")
