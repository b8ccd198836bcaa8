"""The chart's namespaced RBAC (`watchNamespaces`) against the operator's real calls.

The operator runs as the chart renders it for `watchNamespaces: [team-c]` (`--namespace=team-c`,
leader election in loraplex-system) against kmock, through a base, a pod and an adapter; every
request it made must be allowed by the Roles, RoleBindings and the small ClusterRole of that
render, evaluated as the RBAC authorizer would (tests/operator/rbac.py). The `-A` render is
checked the same way by test_integration.py.
"""
from __future__ import annotations

import pytest

from .harness import FakeCluster, OperatorProcess, free_port, pod_from_deployment, wait_for
from .rbac import ungranted
from .test_deploy_files import by_kind, operator_identity, render

pytestmark = pytest.mark.slow

NS = "team-c"
API = "loraplex.dev/v1alpha1"
ENV = {"LORAPLEX_RESYNC_INTERVAL": "1", "LORAPLEX_POLL_INTERVAL": "0.2", "LORAPLEX_ENGINE_CONNECT_TIMEOUT": "0.5",
       "LORAPLEX_ENGINE_TIMEOUT": "1", "LORAPLEX_UNLOAD_ATTEMPTS": "1", "LORAPLEX_UNLOAD_RETRY_DELAY": "0.2"}


def test_namespaced_rbac_covers_a_namespaced_operator(tmp_path):
    docs = render({"watchNamespaces": [NS]})
    args = by_kind(docs)["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    scope = tuple(a for a in args if a.startswith("--namespace=") or a in ("-A", "--all-namespaces"))
    assert scope == (f"--namespace={NS}",)
    sa, sa_ns = operator_identity(docs)
    with FakeCluster() as c:
        op = OperatorProcess(c.write_kubeconfig(tmp_path / "kubeconfig"), tmp_path / "operator.log", env=ENV,
                             namespace=sa_ns, scope=scope).start()
        try:
            c.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "namespace": NS}})
            port = free_port(["127.0.0.1"])  # no engine: the pod is tracked as unreachable
            c.create({"apiVersion": API, "kind": "BaseModelDeployment", "metadata": {"name": "b", "namespace": NS},
                      "spec": {"model": {"id": "org/model"}, "engine": {"port": port}}})
            c.create({"apiVersion": API, "kind": "LoraAdapter", "metadata": {"name": "a", "namespace": NS},
                      "spec": {"baseModel": "b", "source": {"type": "hub", "uri": "org/a-lora"}}})
            dep = wait_for(lambda: c.get("apps/v1", "deployments", NS, "b"), 30, "the Deployment", on_timeout=op.log)
            c.create(pod_from_deployment(dep, "b-0", "127.0.0.1", ready=True))
            wait_for(lambda: ((c.get(API, "loraadapters", NS, "a") or {}).get("status") or {}).get("pods"), 30,
                     "the pod tracked in the adapter's status", on_timeout=op.log)
            c.delete(API, "loraadapters", NS, "a")
            wait_for(lambda: c.get(API, "loraadapters", NS, "a") is None, 30, "the adapter's finalizer done",
                     on_timeout=op.log)
        finally:
            op.stop()
        requests = [(str(getattr(r.method, "value", r.method)), r.url.path, dict(r.params))
                    for r in c.requests() if {k.lower(): v for k, v in r.headers.items()}.get(
                        "user-agent", "").startswith(("loraplex-operator", "kopf"))]
    assert any("/leases" in path for _, path, _ in requests), "leader election ran"
    assert any(f"/namespaces/{NS}/secrets" in path for _, path, _ in requests), "the admin token was read or created"
    missing = ungranted(docs, sa, sa_ns, requests)
    assert not missing, "the namespaced RBAC does not allow:\n" + "\n".join(missing)
    # ...and the same calls are refused in a namespace that is not watched.
    elsewhere = [(m, p.replace(f"/namespaces/{NS}/", "/namespaces/team-z/"), q) for m, p, q in requests
                 if f"/namespaces/{NS}/" in p]
    assert elsewhere and len(ungranted(docs, sa, sa_ns, elsewhere)) > 0
