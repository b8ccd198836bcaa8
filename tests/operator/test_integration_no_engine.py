"""The real operator against kmock where no engine answers: the paths that must not hang.

- an adapter applied before its base (GitOps applies in any order) waits as Pending, then is
  accepted when the base appears;
- a Ready pod whose engine does not answer is reported as such, not as servable;
- deleting an adapter whose pods cannot be reached finishes after a bounded number of tries;
- kopf keeps its state in status, never in annotations of the users' objects.
No engine process is needed, so these run even where the engine cannot.
"""
from __future__ import annotations

import pytest

from .harness import FakeCluster, free_port, operator_cluster, pod_from_deployment, wait_for

pytestmark = pytest.mark.slow

NS = "team-b"
API = "loraplex.dev/v1alpha1"
ENV = {
    "LORAPLEX_RESYNC_INTERVAL": "1",
    "LORAPLEX_POLL_INTERVAL": "0.2",
    "LORAPLEX_BACKOFF_BASE": "0.2",
    "LORAPLEX_BACKOFF_MAX": "0.5",
    "LORAPLEX_ENGINE_CONNECT_TIMEOUT": "0.5",
    "LORAPLEX_ENGINE_TIMEOUT": "1",
    "LORAPLEX_UNLOAD_ATTEMPTS": "2",
    "LORAPLEX_UNLOAD_RETRY_DELAY": "0.3",
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with operator_cluster(tmp_path_factory.mktemp("operator-no-engine"), ENV) as c:
        yield c


def status(c: FakeCluster, plural: str, name: str) -> dict:
    return ((c.get(API, plural, NS, name) or {}).get("status")) or {}


def cond(st: dict, type_: str) -> dict:
    return next((x for x in st.get("conditions", []) if x["type"] == type_), {})


def test_adapter_before_base_then_unreachable_pod_then_bounded_deletion(cluster: FakeCluster):
    c = cluster
    log = c.operator.log  # type: ignore[attr-defined]
    c.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "namespace": NS}})
    c.create({"apiVersion": API, "kind": "LoraAdapter", "metadata": {"name": "early", "namespace": NS},
              "spec": {"baseModel": "later", "source": {"type": "hub", "uri": "org/early-lora"}}})
    st = wait_for(lambda: (s := status(c, "loraadapters", "early")).get("phase") == "Pending" and s, 20,
                  "Pending without a base", on_timeout=log)
    assert cond(st, "Accepted")["reason"] == "BaseNotFound" and cond(st, "Accepted")["status"] == "False"
    wait_for(lambda: [e for e in c.list("v1", "events", NS) if e["reason"] == "BaseNotFound"], 10,
             "a Warning Event", on_timeout=log)

    port = free_port(["127.0.0.1"])  # nothing listens there
    c.create({"apiVersion": API, "kind": "BaseModelDeployment", "metadata": {"name": "later", "namespace": NS},
              "spec": {"model": {"id": "org/model"}, "engine": {"port": port}}})
    wait_for(lambda: cond(status(c, "loraadapters", "early"), "Accepted").get("status") == "True", 20,
             "accepted once the base exists", on_timeout=log)
    cm = wait_for(lambda: c.get("v1", "configmaps", NS, "later-adapters"), 10, "the ConfigMap", on_timeout=log)
    assert '"early"' not in cm["data"]["adapters.json"], "only preload adapters travel in the ConfigMap"
    st = status(c, "loraadapters", "early")
    assert st["phase"] == "Pending" and cond(st, "Ready")["reason"] == "NoReadyPods"
    # No InferencePool CRD in this cluster: skipped, and the base says so.
    pool = wait_for(lambda: cond(status(c, "basemodeldeployments", "later"), "InferencePool"), 20,
                    "the InferencePool condition", on_timeout=log)
    assert pool["status"] == "False" and pool["reason"] == "CRDNotInstalled", pool
    # Secure by default: no adminTokenSecretRef, so the operator made one and the pods mount it.
    assert c.get("v1", "secrets", NS, "later-admin-token")["data"]["token"]
    assert status(c, "basemodeldeployments", "later")["adminTokenSecret"] == "later-admin-token"

    # A pod that Kubernetes calls Ready but whose engine never answers.
    dep = c.get("apps/v1", "deployments", NS, "later")
    c.create(pod_from_deployment(dep, "later-0", "127.0.0.1", ready=True))
    st = wait_for(lambda: (s := status(c, "loraadapters", "early")).get("pods") and s, 20, "the pod tracked",
                  on_timeout=log)
    (p,) = st["pods"]
    assert p["name"] == "later-0" and p["state"] == "unreachable" and p["message"]
    assert st["phase"] == "Loading" and cond(st, "Ready")["reason"] == "EngineUnreachable"
    assert st["readyReplicas"] == 0 and st["totalReplicas"] == 1

    # Deleting it cannot unload anything, and still finishes.
    c.delete(API, "loraadapters", NS, "early")
    wait_for(lambda: c.get(API, "loraadapters", NS, "early") is None, 30, "deletion not blocked forever",
             on_timeout=log)
    assert [e for e in c.list("v1", "events", NS) if e["reason"] == "UnloadIncomplete"]
    cm = c.get("v1", "configmaps", NS, "later-adapters")
    assert '"early"' not in cm["data"]["adapters.json"]

    # kopf's bookkeeping is in status.kopf; the users' objects carry no annotation of ours.
    base = c.get(API, "basemodeldeployments", NS, "later")
    assert not base["metadata"].get("annotations")
    assert base["status"]["kopf"]["lastHandledConfiguration"]
    assert base["metadata"]["finalizers"] == ["loraplex.dev/operator"]


def test_a_base_asking_for_a_host_path_or_a_foreign_image_is_failed_and_gets_nothing(cluster: FakeCluster):
    """Issue 20, finding 8: a BaseModelDeployment was as strong as a pod (any volume, any image).
    Now a volume type outside the allow-list or an image outside the allowed prefixes makes it
    Failed with the reason in its conditions and a Warning Event, and the operator creates none
    of its objects; fixing the spec brings them."""
    c = cluster
    log = c.operator.log  # type: ignore[attr-defined]
    bad = {"node": {"engine": {"volumes": [{"name": "root", "hostPath": {"path": "/"}}],
                               "volumeMounts": [{"name": "root", "mountPath": "/host"}]}},
           "foreign": {"engine": {"image": "evil.example.com/miner:latest"}},
           "lookalike": {"engine": {"image": "ghcr.io/loraplex-evil/loraplex-engine:0.1.0"}}}
    for name, spec in bad.items():
        c.create({"apiVersion": API, "kind": "BaseModelDeployment", "metadata": {"name": name, "namespace": NS},
                  "spec": {"model": {"id": "org/model"}, **spec}})
    expected = {"node": "volume type hostPath is not allowed", "foreign": "spec.engine.image 'evil.example.com",
                "lookalike": "not from an allowed registry"}
    for name, words in expected.items():
        st = wait_for(lambda: (s := status(c, "basemodeldeployments", name)).get("phase") == "Failed" and s, 30,
                      f"{name} Failed", on_timeout=log)
        assert cond(st, "Progressing")["reason"] == "InvalidSpec" and words in cond(st, "Progressing")["message"]
        assert words in cond(st, "Degraded")["message"]
        wait_for(lambda: [e for e in c.list("v1", "events", NS) if e["reason"] == "Failed"
                          and e["involvedObject"]["name"] == name and words in e["message"]], 10,
                 f"a Warning Event on {name}", on_timeout=log)
    for name in bad:
        assert c.get("apps/v1", "deployments", NS, name) is None, f"{name}: no Deployment"
        assert c.get("v1", "services", NS, name) is None, f"{name}: no Service"
        assert c.get("v1", "configmaps", NS, f"{name}-adapters") is None, f"{name}: no ConfigMap"
        assert c.get("v1", "secrets", NS, f"{name}-admin-token") is None, f"{name}: no admin Secret"
    # The same base with a volume from the allow-list is rendered.
    c.update_spec(API, "basemodeldeployments", NS, "node", {"engine": {
        "volumes": [{"name": "root", "emptyDir": {}}], "volumeMounts": [{"name": "root", "mountPath": "/host"}]}})
    dep = wait_for(lambda: c.get("apps/v1", "deployments", NS, "node"), 30, "the Deployment", on_timeout=log)
    assert {"name": "root", "emptyDir": {}} in dep["spec"]["template"]["spec"]["volumes"]


def test_an_adapter_whose_uri_walks_up_is_failed_and_never_pushed(cluster: FakeCluster):
    """An API server without CEL (or an object from before the rule) lets `s3://b/../../x` through:
    the operator's own check (loraplex.manifest) fails the adapter with the reason, and no engine
    or ConfigMap ever gets its manifest."""
    c = cluster
    log = c.operator.log  # type: ignore[attr-defined]
    if c.get("v1", "namespaces", NS, NS) is None:
        c.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "namespace": NS}})
    c.create({"apiVersion": API, "kind": "BaseModelDeployment", "metadata": {"name": "walker", "namespace": NS},
              "spec": {"model": {"id": "org/model"}, "engine": {"port": free_port(["127.0.0.1"])}}})
    c.create({"apiVersion": API, "kind": "LoraAdapter", "metadata": {"name": "walk-up", "namespace": NS},
              "spec": {"baseModel": "walker", "preload": True,
                       "source": {"type": "s3", "uri": "s3://bucket/../../../x"}}})
    st = wait_for(lambda: (s := status(c, "loraadapters", "walk-up")).get("phase") == "Failed" and s, 20,
                  "Failed", on_timeout=log)
    accepted = cond(st, "Accepted")
    assert accepted["status"] == "False" and accepted["reason"] == "InvalidSource", accepted
    assert "'..' path segment" in accepted["message"], accepted
    cm = wait_for(lambda: c.get("v1", "configmaps", NS, "walker-adapters"), 10, "the ConfigMap", on_timeout=log)
    assert "walk-up" not in cm["data"]["adapters.json"], "a refused adapter is never pushed, even as a preload"


def test_an_adapter_whose_placement_cannot_be_used_fails_alone(cluster: FakeCluster):
    """Issue 24: `placement.replicas: auto` used to raise in the placement step and fail the whole
    base's pass (no adapter of the base got a status). Now a placement the operator cannot use (kmock,
    like an API server without CEL, checks no schema) is that adapter's problem: Failed,
    Accepted=False InvalidPlacement, a Warning Event; the base's other adapters are accepted."""
    c = cluster
    log = c.operator.log  # type: ignore[attr-defined]
    if c.get("v1", "namespaces", NS, NS) is None:
        c.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "namespace": NS}})
    c.create({"apiVersion": API, "kind": "BaseModelDeployment", "metadata": {"name": "mixed", "namespace": NS},
              "spec": {"model": {"id": "org/model"}, "engine": {"port": free_port(["127.0.0.1"])}}})
    for name, placement in (("fine", {"replicas": 1}), ("auto-fine", {"replicas": "auto", "max": 3}),
                            ("nonsense", {"replicas": "most"}), ("upside-down", {"replicas": "auto", "min": 4, "max": 2})):
        c.create({"apiVersion": API, "kind": "LoraAdapter", "metadata": {"name": name, "namespace": NS},
                  "spec": {"baseModel": "mixed", "source": {"type": "hub", "uri": f"org/{name}"},
                           "placement": placement}})
    for name in ("nonsense", "upside-down"):
        st = wait_for(lambda n=name: (s := status(c, "loraadapters", n)).get("phase") == "Failed" and s, 20,
                      f"{name} Failed", on_timeout=log)
        assert cond(st, "Accepted")["reason"] == "InvalidPlacement", st
        wait_for(lambda n=name: [e for e in c.list("v1", "events", NS) if e["involvedObject"].get("name") == n
                                 and e["reason"] == "InvalidPlacement"], 10, f"a Warning Event on {name}",
                 on_timeout=log)
    for name in ("fine", "auto-fine"):
        st = wait_for(lambda n=name: cond(status(c, "loraadapters", n), "Accepted").get("status") == "True"
                      and status(c, "loraadapters", n), 20, f"{name} accepted", on_timeout=log)
        assert st["phase"] == "Pending" and cond(st, "Ready")["reason"] == "NoReadyPods"
    assert "no request rate measured yet" in status(c, "loraadapters", "auto-fine")["placementReason"]
