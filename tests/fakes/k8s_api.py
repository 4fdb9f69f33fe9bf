"""A fake of the Kubernetes API server, for the parts the Kubernetes provider uses (no cluster here).

It follows the documented API (https://kubernetes.io/docs/reference/kubernetes-api/ and the API
concepts page: resource versions, optimistic concurrency, patch types, Status errors):

=====================================================================  =======================================
``GET   /apis/apps/v1/namespaces/{ns}/statefulsets/{name}/scale``      ``autoscaling/v1`` Scale: ``spec.replicas``
                                                                       (desired), ``status.replicas`` (pods that
                                                                       exist), ``status.selector`` (string)
``PATCH .../scale``                                                    merge-patch / strategic-merge-patch (an
                                                                       object) or json-patch (an array of ops; an
                                                                       object is a 400, as the real server says);
                                                                       other content types 415
``PUT   .../scale``                                                    a whole Scale; the name must match the URL
``GET   /apis/apps/v1/namespaces/{ns}/statefulsets/{name}``            the StatefulSet
``GET   /api/v1/namespaces/{ns}/pods?labelSelector=...``               PodList (``=``, ``==``, ``!=``, ``k``, ``!k``)
``PATCH /api/v1/namespaces/{ns}/pods/{name}``                          merge patch (annotations, labels)
``DELETE /api/v1/namespaces/{ns}/pods/{name}``                         graceful: ``deletionTimestamp`` = now +
                                                                       grace period; the pod stays until
                                                                       :meth:`finish_terminations`
=====================================================================  =======================================

Optimistic concurrency: a Scale written with a non-empty ``metadata.resourceVersion`` that is not
the current one is refused with 409 Conflict (``reason: Conflict``, the apiserver's message);
without one the write is unconditional. Every write bumps the one resource-version counter.
``spec.replicas`` below 0 or not an integer: 422 Invalid. Unknown objects: 404 ``NotFound``
Status (``statefulsets.apps "x" not found``). ``Authorization: Bearer <token>`` is required (401).
With ``rbac_rules`` (the ``rules`` of a rendered Role) a request its verb/resource is not granted
gets 403 Forbidden, so a test proves the rendered Role is enough.

The StatefulSet controller is simulated synchronously with ``podManagementPolicy: Parallel``: on a
new ``spec.replicas`` the missing ordinals ``0..n-1`` are created at once (Running and Ready with
``auto_ready``, else Pending until :meth:`set_ready`) and pods with an ordinal ``>= n`` start
terminating. A terminating pod disappears at :meth:`finish_terminations`; a pod that disappears
while its ordinal is still wanted is recreated (new uid), as the controller does. Spot reclaims
and node drains: :meth:`preempt` (``deletionTimestamp`` and a ``DisruptionTarget`` condition).
``fail_next`` makes the next requests answer a status (500, 503, 429) to test error paths;
``bump`` changes an object's resourceVersion as a concurrent writer would.
Served by ``http.server`` in a thread on 127.0.0.1.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.fakes.http_server import FakeHttpServer

_SCALE = re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/statefulsets/([^/]+)/scale$")
_STS = re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/statefulsets/([^/]+)$")
_PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
_POD = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)$")
_VERBS = {"GET": "get", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}



def _ts(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                               "message": self.message, "reason": self.reason, "code": self.code}
        if self.details is not None:
            out["details"] = self.details
        return out


def _not_found(group_resource: str, name: str) -> ApiError:
    kind = group_resource.split(".")[0]
    group = group_resource.partition(".")[2]
    return ApiError(404, "NotFound", f'{group_resource} "{name}" not found',
                    {"name": name, "group": group, "kind": kind})


@dataclass
class StatefulSet:
    namespace: str
    name: str
    selector: dict[str, str]
    template_labels: dict[str, str]
    replicas: int
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    resource_version: int = 0
    created: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass
class Pod:
    namespace: str
    name: str
    sts: str
    ordinal: int
    labels: dict[str, str]
    annotations: dict[str, str] = field(default_factory=dict)
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    resource_version: int = 0
    created: datetime = field(default_factory=lambda: datetime.now(UTC))
    ready: bool = False
    phase: str = "Pending"
    ip: str | None = None
    node: str | None = None
    deletion: datetime | None = None
    grace_s: int | None = None
    disruption: str | None = None  # reason of a DisruptionTarget condition


def parse_selector(text: str) -> list[tuple[str, str, str | None]]:
    """Equality-based label selector terms: (key, op, value); op is =, !=, exists or !exists."""
    terms: list[tuple[str, str, str | None]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "!=" in part:
            k, v = part.split("!=", 1)
            terms.append((k.strip(), "!=", v.strip()))
        elif "==" in part or "=" in part:
            k, v = re.split(r"==?", part, maxsplit=1)
            terms.append((k.strip(), "=", v.strip()))
        elif part.startswith("!"):
            terms.append((part[1:].strip(), "!exists", None))
        else:
            terms.append((part, "exists", None))
    return terms


def _matches(labels: dict[str, str], terms: list[tuple[str, str, str | None]]) -> bool:
    for k, op, v in terms:
        if op == "=" and labels.get(k) != v:
            return False
        if op == "!=" and labels.get(k) == v:
            return False
        if op == "exists" and k not in labels:
            return False
        if op == "!exists" and k in labels:
            return False
    return True


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ApiError(422, "Invalid", f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(doc: dict[str, Any], ops: list[Any]) -> dict[str, Any]:
    """RFC 6902 JSON patch: add, replace, remove, test on object members (what a Scale needs)."""
    doc = json.loads(json.dumps(doc))
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise ApiError(400, "BadRequest", "invalid JSON patch operation")
        *parents, last = _pointer(op["path"])
        node = doc
        for p in parents:
            if not isinstance(node, dict) or p not in node:
                raise ApiError(422, "Invalid", f"the server rejected our request: missing path {op['path']}")
            node = node[p]
        kind = op["op"]
        if kind in ("add", "replace"):
            if kind == "replace" and last not in node:
                raise ApiError(422, "Invalid", f"replace operation does not apply: doc is missing path: "
                                               f"{op['path']}")
            node[last] = op.get("value")
        elif kind == "remove":
            node.pop(last, None)
        elif kind == "test":
            if node.get(last) != op.get("value"):
                raise ApiError(422, "Invalid", f"testing value {op['path']} failed: test failed")
        else:
            raise ApiError(400, "BadRequest", f"unexpected kind: {kind}")
    return doc


class FakeKubernetesApi(FakeHttpServer):
    """``with FakeKubernetesApi(token=...) as k8s: k8s.add_statefulset(...); k8s.url``."""

    def __init__(self, *, token: str, auto_ready: bool = True,
                 rbac_rules: list[dict[str, Any]] | None = None) -> None:
        self.token = token
        self.auto_ready = auto_ready
        self.rbac_rules = rbac_rules
        self.statefulsets: dict[tuple[str, str], StatefulSet] = {}
        self.pods: dict[tuple[str, str], Pod] = {}
        self.requests: list[tuple[str, str, str]] = []  # (method, path, content type)
        self.fail_next: list[int] = []
        self._rv = 100
        self._lock = threading.RLock()
        super().__init__(name="fake-k8s")

    # -- test controls (the cluster's side) --

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def add_statefulset(self, namespace: str, name: str, *, selector: dict[str, str], replicas: int = 0,
                        template_labels: dict[str, str] | None = None) -> None:
        """Create a StatefulSet as ``kubectl apply`` of a rendered one would."""
        with self._lock:
            sts = StatefulSet(namespace, name, dict(selector), dict(template_labels or selector), replicas)
            sts.resource_version = self._next_rv()
            self.statefulsets[(namespace, name)] = sts
            self._reconcile(sts)

    def add_statefulset_object(self, obj: dict[str, Any]) -> None:
        """Create a StatefulSet from a rendered object (its selector, template labels and replicas)."""
        md, spec = obj["metadata"], obj["spec"]
        self.add_statefulset(md.get("namespace", "default"), md["name"], selector=spec["selector"]["matchLabels"],
                             replicas=spec.get("replicas", 1), template_labels=spec["template"]["metadata"]["labels"])

    def scale_of(self, namespace: str, name: str) -> tuple[int, int]:
        """(spec.replicas, status.replicas)."""
        with self._lock:
            sts = self.statefulsets[(namespace, name)]
            return sts.replicas, self._live_count(sts)

    def bump(self, namespace: str, name: str) -> None:
        """Another writer touched the StatefulSet: only its resourceVersion changes."""
        with self._lock:
            self.statefulsets[(namespace, name)].resource_version = self._next_rv()

    def set_ready(self, namespace: str, pod: str, ready: bool = True) -> None:
        with self._lock:
            p = self.pods[(namespace, pod)]
            p.ready, p.phase = ready, "Running"
            p.ip = p.ip or f"10.0.0.{len(self.pods) + 10}"
            p.resource_version = self._next_rv()

    def preempt(self, namespace: str, pod: str, *, grace_s: int = 120,
                reason: str = "TerminationByKubelet") -> None:
        """The platform takes the pod's node away: graceful deletion plus a DisruptionTarget condition."""
        with self._lock:
            p = self.pods[(namespace, pod)]
            self._start_termination(p, grace_s)
            p.disruption = reason

    def finish_terminations(self, namespace: str | None = None) -> list[str]:
        """The kubelet is done with every terminating pod: they go; the controller replaces wanted ordinals."""
        with self._lock:
            gone = [k for k, p in self.pods.items() if p.deletion is not None
                    and (namespace is None or p.namespace == namespace)]
            for k in gone:
                del self.pods[k]
            for sts in self.statefulsets.values():
                self._reconcile(sts)
            return [name for _, name in gone]

    def _start_termination(self, p: Pod, grace_s: int) -> None:
        if p.deletion is None:
            p.deletion = datetime.now(UTC) + timedelta(seconds=grace_s)
            p.grace_s = grace_s
            p.ready = False
            p.resource_version = self._next_rv()

    def _live_count(self, sts: StatefulSet) -> int:
        return sum(1 for p in self.pods.values() if p.namespace == sts.namespace and p.sts == sts.name)

    def _reconcile(self, sts: StatefulSet) -> None:
        """The StatefulSet controller, Parallel pod management."""
        for p in list(self.pods.values()):
            if p.namespace == sts.namespace and p.sts == sts.name and p.ordinal >= sts.replicas:
                self._start_termination(p, 30)
        for i in range(sts.replicas):
            name = f"{sts.name}-{i}"
            if (sts.namespace, name) in self.pods:
                continue
            labels = dict(sts.template_labels)
            labels.update({"statefulset.kubernetes.io/pod-name": name, "apps.kubernetes.io/pod-index": str(i),
                           "controller-revision-hash": f"{sts.name}-5d8f9c7b6d"})
            pod = Pod(sts.namespace, name, sts.name, i, labels, resource_version=self._next_rv(),
                      node=f"node-{sts.name}-{i}")
            if self.auto_ready:
                pod.ready, pod.phase, pod.ip = True, "Running", f"10.0.{len(self.pods) % 250}.{i + 10}"
            self.pods[(sts.namespace, name)] = pod

    # -- objects --

    def _scale(self, sts: StatefulSet) -> dict[str, Any]:
        return {
            "kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {"name": sts.name, "namespace": sts.namespace, "uid": sts.uid,
                         "resourceVersion": str(sts.resource_version), "creationTimestamp": _ts(sts.created)},
            "spec": {"replicas": sts.replicas},
            "status": {"replicas": self._live_count(sts),
                       "selector": ",".join(f"{k}={v}" for k, v in sorted(sts.selector.items()))},
        }

    def _sts_object(self, sts: StatefulSet) -> dict[str, Any]:
        ready = sum(1 for p in self.pods.values() if p.namespace == sts.namespace and p.sts == sts.name and p.ready)
        return {
            "kind": "StatefulSet", "apiVersion": "apps/v1",
            "metadata": {"name": sts.name, "namespace": sts.namespace, "uid": sts.uid,
                         "resourceVersion": str(sts.resource_version), "creationTimestamp": _ts(sts.created)},
            "spec": {"replicas": sts.replicas, "serviceName": sts.name, "podManagementPolicy": "Parallel",
                     "selector": {"matchLabels": sts.selector},
                     "template": {"metadata": {"labels": sts.template_labels},
                                  "spec": {"containers": [{"name": "engine", "image": "engine"}]}}},
            "status": {"replicas": self._live_count(sts), "readyReplicas": ready, "availableReplicas": ready},
        }

    def _pod_object(self, p: Pod) -> dict[str, Any]:
        sts = self.statefulsets.get((p.namespace, p.sts))
        md: dict[str, Any] = {
            "name": p.name, "namespace": p.namespace, "uid": p.uid, "resourceVersion": str(p.resource_version),
            "creationTimestamp": _ts(p.created), "labels": dict(p.labels), "annotations": dict(p.annotations),
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": p.sts,
                                 "uid": sts.uid if sts else "", "controller": True, "blockOwnerDeletion": True}],
        }
        if p.deletion is not None:
            md["deletionTimestamp"] = _ts(p.deletion)
            md["deletionGracePeriodSeconds"] = p.grace_s
        now = _ts(datetime.now(UTC))
        conditions = [{"type": "PodScheduled", "status": "True", "lastTransitionTime": _ts(p.created)},
                      {"type": "Ready", "status": "True" if p.ready else "False", "lastTransitionTime": now}]
        if p.disruption is not None:
            conditions.append({"type": "DisruptionTarget", "status": "True", "reason": p.disruption,
                               "message": "node is shutting down", "lastTransitionTime": now})
        status: dict[str, Any] = {"phase": p.phase, "conditions": conditions}
        if p.phase == "Running":
            status["startTime"] = _ts(p.created)
        if p.ip:
            status["podIP"] = p.ip
        return {
            "kind": "Pod", "apiVersion": "v1", "metadata": md,
            "spec": {"hostname": p.name, "subdomain": p.sts, "nodeName": p.node,
                     "containers": [{"name": "engine", "image": "engine"}]},
            "status": status,
        }

    # -- HTTP --

    def _authorize(self, verb: str, group: str, resource: str, namespace: str, name: str) -> None:
        if self.rbac_rules is None:
            return
        for rule in self.rbac_rules:
            if (group in rule.get("apiGroups", []) and resource in rule.get("resources", [])
                    and verb in rule.get("verbs", [])
                    and (not rule.get("resourceNames") or name in rule["resourceNames"])):
                return
        what = resource.partition("/")[0]
        group_resource = f"{what}.{group}" if group else what
        raise ApiError(403, "Forbidden",
                       f'{group_resource} "{name}" is forbidden: User "system:serviceaccount:{namespace}:skyfleet" '
                       f'cannot {verb} resource "{resource}" in API group "{group}" in the namespace "{namespace}"',
                       {"name": name, "group": group, "kind": what})

    def _dispatch(self, handler: BaseHTTPRequestHandler) -> None:
        method = handler.command
        parts = urlsplit(handler.path)
        query = parse_qs(parts.query)
        ctype = (handler.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        with self._lock:
            self.requests.append((method, parts.path, ctype))
            injected = self.fail_next.pop(0) if self.fail_next else None
        try:
            if injected is not None:
                reason = {429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable"}.get(injected,
                                                                                                       "Unknown")
                raise ApiError(injected, reason, "injected failure")
            if handler.headers.get("Authorization") != f"Bearer {self.token}":
                raise ApiError(401, "Unauthorized", "Unauthorized")
            body: Any = None
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError:
                    raise ApiError(400, "BadRequest", "the request body is not valid JSON") from None
            with self._lock:
                code, out = self._route(method, parts.path, query, ctype, body)
        except ApiError as exc:
            code, out = exc.code, exc.status()
        data = json.dumps(out).encode()
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _route(self, method: str, path: str, query: dict[str, list[str]], ctype: str,
               body: Any) -> tuple[int, dict[str, Any]]:
        if m := _SCALE.match(path):
            ns, name = m.groups()
            self._authorize(_VERBS.get(method, method.lower()), "apps", "statefulsets/scale", ns, name)
            sts = self.statefulsets.get((ns, name))
            if sts is None:
                raise _not_found("statefulsets.apps", name)
            if method == "GET":
                return 200, self._scale(sts)
            if method == "PATCH":
                new = self._patched(self._scale(sts), ctype, body)
            elif method == "PUT":
                if not isinstance(body, dict) or body.get("kind", "Scale") != "Scale":
                    raise ApiError(400, "BadRequest", "expected a Scale object")
                new = body
                if (new.get("metadata") or {}).get("name") != name:
                    raise ApiError(400, "BadRequest", f"the name of the object "
                                   f"({(new.get('metadata') or {}).get('name')}) does not match the name on the "
                                   f"URL ({name})")
            else:
                raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested "
                                                         "resource")
            return 200, self._write_scale(sts, new)
        if m := _STS.match(path):
            ns, name = m.groups()
            self._authorize(_VERBS.get(method, method.lower()), "apps", "statefulsets", ns, name)
            sts = self.statefulsets.get((ns, name))
            if sts is None:
                raise _not_found("statefulsets.apps", name)
            if method != "GET":
                raise ApiError(405, "MethodNotAllowed", "the fake serves only GET on statefulsets")
            return 200, self._sts_object(sts)
        if m := _PODS.match(path):
            (ns,) = m.groups()
            if method != "GET":
                raise ApiError(405, "MethodNotAllowed", "the fake serves only list on pods")
            self._authorize("list", "", "pods", ns, "")
            terms = parse_selector((query.get("labelSelector") or [""])[0])
            items = [self._pod_object(p) for (pns, _), p in sorted(self.pods.items())
                     if pns == ns and _matches(p.labels, terms)]
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": str(self._rv)},
                         "items": items}
        if m := _POD.match(path):
            ns, name = m.groups()
            self._authorize(_VERBS.get(method, method.lower()), "", "pods", ns, name)
            pod = self.pods.get((ns, name))
            if pod is None:
                raise _not_found("pods", name)
            if method == "GET":
                return 200, self._pod_object(pod)
            if method == "DELETE":
                grace = (body or {}).get("gracePeriodSeconds", (query.get("gracePeriodSeconds") or [None])[0])
                self._start_termination(pod, 30 if grace is None else int(grace))
                return 200, self._pod_object(pod)
            if method == "PATCH":
                new = self._patched(self._pod_object(pod), ctype, body)
                rv = (new.get("metadata") or {}).get("resourceVersion")
                if rv and rv != str(pod.resource_version):
                    raise self._conflict("pods", name)
                pod.annotations = dict((new.get("metadata") or {}).get("annotations") or {})
                pod.labels = dict((new.get("metadata") or {}).get("labels") or {})
                pod.resource_version = self._next_rv()
                return 200, self._pod_object(pod)
            raise ApiError(405, "MethodNotAllowed", "method not allowed")
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    @staticmethod
    def _patched(current: dict[str, Any], ctype: str, body: Any) -> dict[str, Any]:
        if ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            if not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "json: cannot unmarshal array into Go value of type "
                                                  "map[string]interface {}")
            return merge_patch(current, body)
        if ctype == "application/json-patch+json":
            if not isinstance(body, list):
                raise ApiError(400, "BadRequest", "json: cannot unmarshal object into Go value of type "
                                                  "jsonpatch.Patch")
            return json_patch(current, body)
        raise ApiError(415, "UnsupportedMediaType", 'the body of the request was in an unknown format - '
                       'accepted media types include: application/json-patch+json, application/merge-patch+json, '
                       'application/apply-patch+yaml, application/strategic-merge-patch+json')

    @staticmethod
    def _conflict(group_resource: str, name: str) -> ApiError:
        return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {group_resource} "{name}": the object '
                        f"has been modified; please apply your changes to the latest version and try again",
                        {"name": name, "group": group_resource.partition(".")[2],
                         "kind": group_resource.split(".")[0]})

    def _write_scale(self, sts: StatefulSet, new: dict[str, Any]) -> dict[str, Any]:
        rv = (new.get("metadata") or {}).get("resourceVersion")
        if rv and rv != str(sts.resource_version):
            raise self._conflict("statefulsets.apps", sts.name)
        replicas = (new.get("spec") or {}).get("replicas", 0)
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise ApiError(422, "Invalid", f'Scale.autoscaling "{sts.name}" is invalid: spec.replicas: Invalid '
                           f"value: {json.dumps(replicas)}: must be greater than or equal to 0",
                           {"name": sts.name, "group": "autoscaling", "kind": "Scale"})
        if replicas != sts.replicas:
            sts.replicas = replicas
            sts.resource_version = self._next_rv()
            self._reconcile(sts)
        return self._scale(sts)
