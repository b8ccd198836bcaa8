"""Scale to zero (issue 24), through kopf: the real operator against kmock, a base with
`autoscaling.minReplicas: 0`. No engine process is needed (the pods are the test's).

- without the KEDA HTTP add-on: ScaleToZero=False (KEDAHTTPAddonNotInstalled) with a Warning
  Event, and the base keeps one replica (the operator puts it back when someone sets 0);
- the add-on's CRD installed while the operator runs (kmock serves it from then on): the
  operator renders the HTTPScaledObject (owned, valid against the add-on's vendored CRD) and the
  `<base>-wake` Service, points the Ingress and status.endpoint at the interceptor, and from then
  on never writes the Deployment's replicas: KEDA takes the base to 0 and back;
- the way back from zero is measured: status.lastScaleFromZeroSeconds;
- minReplicas back to 1: the HTTPScaledObject and the wake Service are deleted, the replicas are
  the operator's again.
"""
from __future__ import annotations

import pytest

from .crd_tools import admit_foreign
from .harness import FakeCluster, from_operator, operator_cluster, pod_from_deployment, pod_status, wait_for
from .test_scaletozero import k8s_errors, keda_crd

pytestmark = pytest.mark.slow

NS, BASE = "sleepy-ns", "sleepy"
API = "loraplex.dev/v1alpha1"
HSO_API = "http.keda.sh/v1alpha1"
ENV = {
    "LORAPLEX_RESYNC_INTERVAL": "1",
    "LORAPLEX_POLL_INTERVAL": "0.2",
    "LORAPLEX_ENGINE_CONNECT_TIMEOUT": "0.5",
    "LORAPLEX_ENGINE_TIMEOUT": "1",
    "LORAPLEX_AUTOSCALE_INTERVAL": "0.5",
    "LORAPLEX_CATALOG_PORT": "0",  # no catalog: nothing here asks it, and 9091 may be taken
}
SPEC = {"model": {"id": "org/model"}, "engine": {"port": 18080},
        "autoscaling": {"enabled": True, "minReplicas": 0, "maxReplicas": 2, "scaleDownStabilizationSeconds": 0},
        "ingress": {"enabled": True, "host": "sleepy.example.com"}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with operator_cluster(tmp_path_factory.mktemp("scale-to-zero"), ENV) as c:
        yield c


def base_status(c: FakeCluster) -> dict:
    return (c.get(API, "basemodeldeployments", NS, BASE) or {}).get("status") or {}


def cond(c: FakeCluster, type_: str) -> dict:
    return next((x for x in base_status(c).get("conditions", []) if x["type"] == type_), {})


def replicas(c: FakeCluster) -> int | None:
    return ((c.get("apps/v1", "deployments", NS, BASE) or {}).get("spec") or {}).get("replicas")


def backend(c: FakeCluster) -> dict:
    ing = c.get("networking.k8s.io/v1", "ingresses", NS, BASE)
    return ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]


def operator_requests(c: FakeCluster, since: int, method: str, fragment: str) -> list:
    return [r for r in c.requests()[since:] if from_operator(r)
            and str(getattr(r.method, "value", r.method)).upper() == method and fragment in r.url.path]


def test_without_the_add_on_the_base_says_why_and_keeps_one_replica(cluster: FakeCluster):
    c, log = cluster, cluster.operator.log  # type: ignore[attr-defined]
    c.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "namespace": NS}})
    c.create({"apiVersion": API, "kind": "BaseModelDeployment", "metadata": {"name": BASE, "namespace": NS},
              "spec": SPEC})
    st = wait_for(lambda: cond(c, "ScaleToZero").get("status") == "False" and cond(c, "ScaleToZero"), 30,
                  "ScaleToZero=False", on_timeout=log)
    assert st["reason"] == "KEDAHTTPAddonNotInstalled", st
    assert "keda-add-ons-http" in st["message"] and "keeps at least 1 replica" in st["message"]
    wait_for(lambda: [e for e in c.list("v1", "events", NS) if e["reason"] == "KEDAHTTPAddonNotInstalled"
                      and e["type"] == "Warning"], 10, "a Warning Event", on_timeout=log)
    assert replicas(c) == 1
    assert backend(c) == {"name": BASE, "port": {"number": 80}}, "no interceptor: the Ingress goes to the engines"
    # Someone sets 0: nothing would hold the requests, so the operator puts 1 back.
    c.patch("apps/v1", "deployments", NS, BASE, {"spec": {"replicas": 0}})
    wait_for(lambda: replicas(c) == 1, 20, "back to 1 replica", on_timeout=log)
    assert c.get("v1", "services", NS, f"{BASE}-wake") is None


def test_with_the_add_on_keda_owns_the_replicas(cluster: FakeCluster):
    c, log = cluster, cluster.operator.log  # type: ignore[attr-defined]
    c.install(FakeCluster.KEDA_HTTP)
    hso = wait_for(lambda: c.get(HSO_API, "httpscaledobjects", NS, BASE), 30, "the HTTPScaledObject",
                   on_timeout=log)
    uid = c.get(API, "basemodeldeployments", NS, BASE)["metadata"]["uid"]
    assert [o["uid"] for o in hso["metadata"]["ownerReferences"] if o.get("controller")] == [uid]
    _, errors = admit_foreign(keda_crd(), {k: v for k, v in hso.items() if k != "status"})
    assert errors == [], errors
    assert hso["spec"]["scaleTargetRef"] == {"name": BASE, "kind": "Deployment", "apiVersion": "apps/v1",
                                             "service": BASE, "port": 80}
    assert hso["spec"]["replicas"] == {"min": 0, "max": 2}
    wake = c.get("v1", "services", NS, f"{BASE}-wake")
    assert wake["spec"]["type"] == "ExternalName" and wake["metadata"]["ownerReferences"][0]["uid"] == uid
    assert k8s_errors({"apiVersion": wake["apiVersion"], "kind": wake["kind"], "spec": wake["spec"],
                       "metadata": {"name": wake["metadata"]["name"], "namespace": NS}}) == []
    wait_for(lambda: backend(c) == {"name": f"{BASE}-wake", "port": {"number": 8080}}, 20,
             "the Ingress to the interceptor", on_timeout=log)
    st = wait_for(lambda: cond(c, "ScaleToZero").get("status") == "True" and base_status(c), 20, "ScaleToZero=True",
                  on_timeout=log)
    assert cond(c, "ScaleToZero")["reason"] == "HandedToKEDA"
    assert st["endpoint"] == "http://sleepy.example.com"
    wait_for(lambda: [e for e in c.list("v1", "events", NS) if e["reason"] == "ScaleToZero"
                      and e["type"] == "Normal"], 10, "a Normal Event when it became True", on_timeout=log)

    # KEDA takes the base to zero: the operator leaves the replicas alone, pass after pass.
    c.patch("apps/v1", "deployments", NS, BASE, {"spec": {"replicas": 0}})
    wait_for(lambda: base_status(c).get("desiredReplicas") == 0 and base_status(c).get("phase") == "Ready", 20,
             "the base at zero, on purpose", on_timeout=log)
    mark = len(c.requests())
    wait_for(lambda: len(operator_requests(c, mark, "GET", f"/deployments/{BASE}")) >= 6, 30,
             "a few passes over the Deployment", on_timeout=log)
    assert operator_requests(c, mark, "PATCH", "/deployments/") == [], "the operator wrote the replicas KEDA owns"
    assert replicas(c) == 0

    # KEDA scales it up for a held request; the pod comes up and turns Ready.
    c.patch("apps/v1", "deployments", NS, BASE, {"spec": {"replicas": 1}})
    wait_for(lambda: base_status(c).get("desiredReplicas") == 1, 20, "the scale-up seen", on_timeout=log)
    c.create(pod_from_deployment(c.get("apps/v1", "deployments", NS, BASE), f"{BASE}-0", "127.0.0.9", ready=False))
    wait_for(lambda: base_status(c).get("replicas") == 1, 20, "the pod seen, not Ready", on_timeout=log)
    assert "lastScaleFromZeroSeconds" not in base_status(c)
    c.patch("v1", "pods", NS, f"{BASE}-0", {"status": pod_status("127.0.0.9", True)}, sub="status")
    st = wait_for(lambda: "lastScaleFromZeroSeconds" in (s := base_status(c)) and s, 20,
                  "status.lastScaleFromZeroSeconds", on_timeout=log)
    assert st["lastScaleFromZeroSeconds"] > 0 and st["readyReplicas"] == 1
    wait_for(lambda: [e for e in c.list("v1", "events", NS) if e["reason"] == "ScaledFromZero"], 10,
             "a ScaledFromZero Event", on_timeout=log)
    assert operator_requests(c, mark, "PATCH", "/deployments/") == []


def test_asking_for_one_replica_again_takes_keda_out(cluster: FakeCluster):
    c, log = cluster, cluster.operator.log  # type: ignore[attr-defined]
    c.patch("apps/v1", "deployments", NS, BASE, {"spec": {"replicas": 0}})  # KEDA's last word
    c.update_spec(API, "basemodeldeployments", NS, BASE, {"autoscaling": {"minReplicas": 1}})
    wait_for(lambda: c.get(HSO_API, "httpscaledobjects", NS, BASE) is None, 30, "the HTTPScaledObject deleted",
             on_timeout=log)
    wait_for(lambda: c.get("v1", "services", NS, f"{BASE}-wake") is None, 10, "the wake Service deleted",
             on_timeout=log)
    wait_for(lambda: replicas(c) == 1, 20, "the operator's replicas again", on_timeout=log)
    wait_for(lambda: backend(c) == {"name": BASE, "port": {"number": 80}} and not cond(c, "ScaleToZero"), 20,
             "the Ingress to the engines, no ScaleToZero condition", on_timeout=log)


def test_rbac_covers_every_request(cluster: FakeCluster):
    from .rbac import assert_chart_grants_operator_requests

    assert_chart_grants_operator_requests(cluster)
