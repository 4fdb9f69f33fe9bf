"""Offline checks of rendered objects: the Kubernetes OpenAPI schemas (``kubernetes_validate``, strict:
unknown fields are errors) plus the naming rules the schemas do not encode (DNS names, label values,
StatefulSet name length, selectors matching their template's labels).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from skyfleet.fleet.k8s.naming import MAX_STATEFULSET_NAME, is_label_value

#: The Kubernetes version the output is checked against (bundled by kubernetes-validate 1.37.0).
KUBERNETES_VERSION = "1.31"
_DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_KEY_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


class ObjectInvalid(ValueError):
    """A rendered object fails a check; the message names the object and the field."""


def _where(obj: Mapping[str, Any]) -> str:
    return f"{obj.get('kind', '?')}/{(obj.get('metadata') or {}).get('name', '?')}"


def check_schema(obj: Mapping[str, Any], version: str = KUBERNETES_VERSION) -> None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(dict(obj), version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path) or "(root)"
        raise ObjectInvalid(f"{_where(obj)}: {path}: {exc.message}") from None
    except kubernetes_validate.SchemaNotFoundError as exc:
        raise ObjectInvalid(f"{_where(obj)}: {exc.message}") from None


def _labels(obj: Mapping[str, Any], labels: Mapping[str, str] | None, where: str) -> None:
    for key, value in (labels or {}).items():
        prefix, _, name = key.rpartition("/")
        if (prefix and (len(prefix) > 253 or not _DNS_1123_SUBDOMAIN.match(prefix))) or len(name) > 63 \
                or not _LABEL_KEY_NAME.match(name):
            raise ObjectInvalid(f"{_where(obj)}: {where}: invalid label key {key!r}")
        if not isinstance(value, str) or not is_label_value(value):
            raise ObjectInvalid(f"{_where(obj)}: {where}: invalid value {value!r} of label {key!r}")


def check_names(obj: Mapping[str, Any]) -> None:
    md = obj.get("metadata") or {}
    name, kind = md.get("name", ""), obj.get("kind")
    rule = _DNS_1035_LABEL if kind == "Service" else _DNS_1123_SUBDOMAIN
    limit = 63 if kind in ("Service", "Namespace") else MAX_STATEFULSET_NAME if kind == "StatefulSet" else 253
    if not rule.match(name) or len(name) > limit:
        raise ObjectInvalid(f"{_where(obj)}: metadata.name: {name!r} is not a valid {kind} name")
    _labels(obj, md.get("labels"), "metadata.labels")
    spec = obj.get("spec") or {}
    template = spec.get("template")
    if template is not None:
        tlabels = (template.get("metadata") or {}).get("labels") or {}
        _labels(obj, tlabels, "spec.template.metadata.labels")
        wanted = (spec.get("selector") or {}).get("matchLabels") or {}
        if any(tlabels.get(k) != v for k, v in wanted.items()):
            raise ObjectInvalid(f"{_where(obj)}: spec.selector does not match the template's labels")
    if kind == "StatefulSet" and spec.get("serviceName") != name:
        raise ObjectInvalid(f"{_where(obj)}: spec.serviceName must be its headless Service ({name})")


def check_all(objects: Iterable[Mapping[str, Any]], version: str = KUBERNETES_VERSION) -> int:
    """Check every object; raise :class:`ObjectInvalid` at the first bad one. Returns how many were checked."""
    n = 0
    seen: set[tuple[str, str]] = set()
    for obj in objects:
        check_schema(obj, version)
        check_names(obj)
        key = (str(obj["kind"]), str(obj["metadata"]["name"]))
        if key in seen:
            raise ObjectInvalid(f"{_where(obj)}: rendered twice")
        seen.add(key)
        n += 1
    return n
