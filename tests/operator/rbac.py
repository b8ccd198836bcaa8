"""RBAC, evaluated the way the API server's RBAC authorizer does, against the chart's rendered
objects: which API requests would the operator's ServiceAccount be allowed to make?

A request is the (method, path, query) an HTTP client sent; `attributes` turns it into the
authorizer's attributes (verb, API group, resource, subresource, namespace, name). A rule grants
it when its apiGroups, resources (`plural` or `plural/subresource`), verbs and, if set,
resourceNames match; a ClusterRole bound by a ClusterRoleBinding grants everywhere, a Role (or a
ClusterRole) bound by a RoleBinding only in that binding's namespace. Discovery paths (/api,
/apis, /version, /openapi) are allowed to every authenticated user by the default
system:discovery role, so they are not checked here.
"""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs

WRITE_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


@dataclass(frozen=True)
class Attributes:
    verb: str
    group: str
    resource: str
    subresource: str
    namespace: str  # "" for cluster-scoped objects and cluster-wide lists/watches
    name: str

    def __str__(self) -> str:
        res = self.resource + (f"/{self.subresource}" if self.subresource else "")
        where = f" in {self.namespace}" if self.namespace else " cluster-wide"
        return f"{self.verb} {self.group or 'core'}/{res}{f' {self.name}' if self.name else ''}{where}"


def attributes(method: str, path: str, query: str | dict = "") -> Attributes | None:
    """The authorizer's view of one request; None for a discovery (non-resource) path."""
    params = parse_qs(query) if isinstance(query, str) else {k: [v] if isinstance(v, str) else v
                                                                 for k, v in query.items()}
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 2:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        return None
    if not rest:
        return None  # /api/v1, /apis/g/v: discovery
    namespace = ""
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    resource = rest[0]
    name = rest[1] if len(rest) > 1 else ""
    sub = rest[2] if len(rest) > 2 else ""
    method = method.upper()
    if method in ("GET", "HEAD"):
        watch = params.get("watch", ["false"])[0] in ("true", "1")
        verb = "watch" if watch else ("get" if name else "list")
    else:
        verb = WRITE_VERBS[method]
        if method == "DELETE" and not name:
            verb = "deletecollection"
    return Attributes(verb, group, resource, sub, namespace, name)


def _rule_grants(rule: dict, a: Attributes) -> bool:
    res = a.resource + (f"/{a.subresource}" if a.subresource else "")
    return ((a.group in rule.get("apiGroups", []) or "*" in rule.get("apiGroups", []))
            and (res in rule.get("resources", []) or "*" in rule.get("resources", []))
            and (a.verb in rule.get("verbs", []) or "*" in rule.get("verbs", []))
            and (not rule.get("resourceNames") or a.name in rule["resourceNames"]))


def _bound_to(binding: dict, sa_name: str, sa_namespace: str) -> bool:
    return any(s.get("kind") == "ServiceAccount" and s.get("name") == sa_name
               and s.get("namespace", binding["metadata"].get("namespace")) == sa_namespace
               for s in binding.get("subjects") or [])


def allowed(docs: list[dict], sa_name: str, sa_namespace: str, a: Attributes) -> bool:
    """Would the ServiceAccount be allowed `a`, given the RBAC objects among `docs`?"""
    roles = {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]): d
             for d in docs if d["kind"] in ("Role", "ClusterRole")}
    for b in docs:
        if b["kind"] not in ("RoleBinding", "ClusterRoleBinding") or not _bound_to(b, sa_name, sa_namespace):
            continue
        ref = b["roleRef"]
        role_ns = b["metadata"].get("namespace", "") if ref["kind"] == "Role" else ""
        role = roles.get((ref["kind"], role_ns, ref["name"]))
        if role is None:
            continue
        if b["kind"] == "RoleBinding" and a.namespace != b["metadata"]["namespace"]:
            continue  # a RoleBinding grants only inside its own namespace
        if any(_rule_grants(rule, a) for rule in role.get("rules") or []):
            return True
    return False


def ungranted(docs: list[dict], sa_name: str, sa_namespace: str,
              requests: list[tuple[str, str, str | dict]]) -> list[str]:
    """The requests (method, path, query) that the rendered RBAC does not allow, described."""
    missing = set()
    for method, path, query in requests:
        a = attributes(method, path, query)
        if a is not None and not allowed(docs, sa_name, sa_namespace, a):
            missing.add(str(a))
    return sorted(missing)


def assert_chart_grants_operator_requests(cluster, values: dict | None = None) -> int:
    """Every request the operator(s) made to a FakeCluster (harness.py) is allowed by the Helm
    chart's rendered RBAC for its ServiceAccount; returns how many were checked. `values`: the
    chart's values for the operator's scope; default: cluster-wide (the tests' operators run -A)."""
    from .harness import from_operator
    from .test_deploy_files import operator_identity, render

    docs = render({"rbac": {"clusterWide": True}, "networkPolicy": {"enabled": False}} if values is None else values)
    sa_name, sa_ns = operator_identity(docs)
    requests = [(str(getattr(r.method, "value", r.method)), r.url.path, dict(r.params))
                for r in cluster.requests() if from_operator(r)]
    assert requests, "the operator made no requests"
    missing = ungranted(docs, sa_name, sa_ns, requests)
    assert not missing, "the chart's RBAC does not allow:\n" + "\n".join(missing)
    return len(requests)
