"""Names and labels shared by the renderer and the provider, so both agree on what a pool is called.

Kubernetes rules applied here (the OpenAPI schemas do not check them, ``validate.check_names`` does):
a Service name is a DNS-1035 label (``[a-z]([-a-z0-9]*[a-z0-9])?``, at most 63); a StatefulSet's name
at most 52 characters (its pods' ``controller-revision-hash`` label is ``<name>-<10 chars>``, a label
value, at most 63); label values at most 63 of ``[-A-Za-z0-9_.]``, starting and ending alphanumeric.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

MAX_STATEFULSET_NAME = 52
ENGINE_PORT = 8000
GATEWAY_NAME = "skyfleet-gateway"
SERVICE_ACCOUNT = "skyfleet-controller"
SECRET_NAME = "skyfleet-secrets"

LABEL_POOL = "skyfleet.io/pool"
LABEL_MODEL = "skyfleet.io/model"
LABEL_TIER = "skyfleet.io/tier"
ANNOTATION_MODEL = "skyfleet.io/model-name"  # the model's full name (label values cannot hold every name)
ANNOTATION_DRAINING = "skyfleet.io/draining"  # set by the provider's drain(): when it was drained

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _digest(text: str, n: int = 6) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def dns_label(text: str, max_len: int = 63) -> str:
    """``text`` as a DNS-1035 label: lower case, [-a-z0-9], starting with a letter; a hash keeps long ones unique.

    Different texts can give the same label ("a.b" and "a-b"): the renderer rejects such collisions.
    """
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if not s or not s[0].isalpha():
        s = ("m-" + s).rstrip("-")
    if len(s) > max_len:
        s = s[: max_len - 7].rstrip("-") + "-" + _digest(text)
    return s


def label_value(text: str) -> str:
    """``text`` as a Kubernetes label value (at most 63 of [-A-Za-z0-9_.], alphanumeric at both ends)."""
    s = re.sub(r"[^-A-Za-z0-9_.]+", "-", text).strip("-_.")
    if len(s) > 63:
        s = s[:56].rstrip("-_.") + "-" + _digest(text)
    return s


def is_label_value(text: str) -> bool:
    return len(text) <= 63 and bool(_LABEL_VALUE.match(text))


@dataclass(frozen=True, slots=True)
class PoolNames:
    """What one pool (a model's pool) is called in the cluster."""

    model: str  # the model's name as clients use it
    pool: str  # the pool's name in the fleet spec (unique within its model)
    statefulset: str  # also its headless Service and the pods' prefix (<statefulset>-<ordinal>)

    @property
    def key(self) -> str:
        """The pool's key in the provider and controller: ``<model>/<pool>``."""
        return pool_key(self.model, self.pool)

    @property
    def selector(self) -> dict[str, str]:
        """The StatefulSet's pod selector (immutable once created)."""
        return {"app.kubernetes.io/name": "skyfleet-engine", "app.kubernetes.io/instance": self.statefulset}

    @property
    def selector_string(self) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(self.selector.items()))

    def pod_host(self, ordinal: int, namespace: str, cluster_domain: str = "cluster.local") -> str:
        """Stable DNS name of the pod with this ordinal (through the pool's headless Service)."""
        return f"{self.statefulset}-{ordinal}.{self.statefulset}.{namespace}.svc.{cluster_domain}"


def pool_key(model: str, pool: str) -> str:
    return f"{model}/{pool}"


def pool_names(model: str, pool: str) -> PoolNames:
    return PoolNames(model=model, pool=pool, statefulset=dns_label(f"{model}-{pool}", MAX_STATEFULSET_NAME))
