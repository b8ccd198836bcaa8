"""The real operator (`loraplex-operator -A --standalone`, a subprocess) against kmock's Kubernetes
emulation over HTTP, with real `loraplex-engine` processes as the engine pods.

The test plays the controllers kmock lacks: it creates the Pods from the operator's Deployment
(a ReplicaSet), runs each Pod's container command line, as the operator rendered it, on its own
127.0.0.x address, and probes /ready to write the Pods' Ready condition (a kubelet). The adapters
ConfigMap is deliberately not synced into the engines (a kubelet may take a minute), so what the
engines serve reached them through the operator's pushes.

The steps share one cluster, one operator and two engines and run in order; a step whose
predecessor failed is skipped with that reason.
"""
from __future__ import annotations

import base64
import importlib.util
import json
import time
from pathlib import Path

import httpx
import pytest

from loraplex.manifest import parse_manifest_list, salted_key_hash
from loraplex.operator.adapters import tenant_salt

from .harness import BIN, FakeCluster, Kubelet, OperatorProcess, free_port, from_operator, wait_for

pytestmark = pytest.mark.slow

NS, BASE = "team-a", "tiny"
LORA_API = "loraplex.dev/v1alpha1"
TENANT_KEY = "sk-tenant-acme-123"
ADMIN_TOKEN = "admin-token-for-the-engines"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
IPS = ["127.0.0.2", "127.0.0.3"]
OPERATOR_ENV = {
    "LORAPLEX_RESYNC_INTERVAL": "1",
    "LORAPLEX_POLL_INTERVAL": "0.2",
    "LORAPLEX_BACKOFF_BASE": "0.2",
    "LORAPLEX_BACKOFF_MAX": "1",
    "LORAPLEX_MAX_FAILURES": "2",
    "LORAPLEX_ENGINE_TIMEOUT": "10",
    "LORAPLEX_UNLOAD_ATTEMPTS": "2",
    "LORAPLEX_UNLOAD_RETRY_DELAY": "0.5",
    "LORAPLEX_AUTOSCALE_INTERVAL": "0.5",
}


def _engine_missing() -> str | None:
    if importlib.util.find_spec("loraplex.engine.api.cli") is None:
        return "loraplex.engine.api.cli (the engine's HTTP server) does not exist yet"
    if not (BIN / "loraplex-engine").exists():
        return f"{BIN / 'loraplex-engine'} is not installed"
    for mod in ("torch", "peft", "transformers"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed: the tiny model and adapters cannot be made"
    return None


_missing = _engine_missing()
if _missing:
    print(f"\nSKIP operator integration tests: {_missing}")
    pytest.skip(_missing, allow_module_level=True)


class Steps:
    """Ordered steps over shared state: a failed step skips the ones after it."""

    def __init__(self) -> None:
        self.failed: str | None = None

    def __call__(self, name: str):
        if self.failed:
            pytest.skip(f"step {self.failed!r} failed before this one")
        return _StepGuard(self, name)


class _StepGuard:
    def __init__(self, steps: Steps, name: str):
        self.steps, self.name = steps, name

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and exc_type is not pytest.skip.Exception:
            self.steps.failed = self.name
        return False


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from bench.tiny import make_tiny_adapter, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    base = make_tiny_checkpoint(root / "base", family="llama")
    adapters = root / "adapters"
    make_tiny_adapter(base, adapters / "a1", rank=8, target_modules=["q_proj", "v_proj"])
    make_tiny_adapter(base, adapters / "a2", rank=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], seed=2)
    make_tiny_adapter(base, adapters / "bad", rank=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    return {"base": base, "adapters": adapters}


class Env:
    def __init__(self, cluster: FakeCluster, operator: OperatorProcess, kubelet: Kubelet | None, tmp: Path):
        self.cluster, self.operator, self.kubelet, self.tmp = cluster, operator, kubelet, tmp
        self.steps = Steps()
        self.http = httpx.Client(timeout=60, trust_env=False)

    def lora(self, name: str) -> dict | None:
        return self.cluster.get(LORA_API, "loraadapters", NS, name)

    def bmd(self) -> dict | None:
        return self.cluster.get(LORA_API, "basemodeldeployments", NS, BASE)

    def phase(self, name: str) -> str | None:
        return ((self.lora(name) or {}).get("status") or {}).get("phase")

    def wait(self, fn, what: str, timeout: float = 30):
        def diag() -> str:
            objs = {n: (self.lora(n) or {}).get("status") for n in ("a1", "a2", "bad")}
            return (f"adapters: {json.dumps(objs, indent=1)[:4000]}\nbase: {json.dumps((self.bmd() or {}).get('status'))[:1500]}"
                    f"\n--- operator log (tail) ---\n{self.operator.log()[-6000:]}")
        return wait_for(fn, timeout, what, on_timeout=diag)

    def events(self, name: str) -> list[dict]:
        return [e for e in self.cluster.list("v1", "events", NS) if e["involvedObject"].get("name") == name]

    def pods(self):
        assert self.kubelet is not None
        return list(self.kubelet.pods.values())


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("operator")
    with FakeCluster() as cluster:
        kubeconfig = cluster.write_kubeconfig(tmp / "kubeconfig")
        operator = OperatorProcess(kubeconfig, tmp / "operator.log", env=OPERATOR_ENV).start()
        e = Env(cluster, operator, None, tmp)
        try:
            yield e
        finally:
            e.operator.stop()
            if e.kubelet is not None:
                e.kubelet.close()
            e.http.close()


def lora_body(name: str, uri: str, **spec) -> dict:
    return {"apiVersion": LORA_API, "kind": "LoraAdapter", "metadata": {"name": name, "namespace": NS},
            "spec": {"baseModel": BASE, "source": {"type": "local", "uri": uri}, **spec}}


def test_base_renders_owned_objects_and_pods_come_up(env: Env, assets):
    with env.steps("base"):
        c = env.cluster
        c.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "namespace": NS}})
        c.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "acme-keys", "namespace": NS},
                  "data": {"api-key": base64.b64encode(TENANT_KEY.encode()).decode()}})
        c.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "engine-admin", "namespace": NS},
                  "data": {"token": base64.b64encode(ADMIN_TOKEN.encode()).decode()}})
        port = free_port(IPS)
        bmd = c.create({"apiVersion": LORA_API, "kind": "BaseModelDeployment",
                        "metadata": {"name": BASE, "namespace": NS},
                        "spec": {"model": {"id": str(assets["base"]), "dtype": "float32"},
                                 "engine": {"port": port, "maxLoraRank": 16, "maxActiveAdapters": 4,
                                            "adminTokenSecretRef": {"name": "engine-admin"},
                                            "args": ["--adapter-dir", str(assets["adapters"]),
                                                     "--num-kv-blocks", "128", "--log-level", "warning"]},
                                 "replicas": 2}})
        uid = bmd["metadata"]["uid"]
        dep = env.wait(lambda: c.get("apps/v1", "deployments", NS, BASE), "the Deployment")
        for kind, plural, name in (("v1", "services", BASE), ("v1", "configmaps", f"{BASE}-adapters")):
            obj = env.wait(lambda: c.get(kind, plural, NS, name), f"{plural}/{name}")
            assert obj["metadata"]["ownerReferences"][0]["uid"] == uid
        assert dep["metadata"]["ownerReferences"][0] == {
            "apiVersion": LORA_API, "kind": "BaseModelDeployment", "name": BASE, "uid": uid,
            "controller": True, "blockOwnerDeletion": True}
        assert dep["spec"]["replicas"] == 2
        assert c.get("networking.k8s.io/v1", "ingresses", NS, BASE) is None

        env.kubelet = Kubelet(c, NS, BASE, port, env.tmp / "pods")
        for i, ip in enumerate(IPS):
            env.kubelet.add_pod(f"{BASE}-{i}", ip)
        env.kubelet.wait_ready(timeout=120)
        st = env.wait(lambda: (s := (env.bmd() or {}).get("status", {})).get("phase") == "Ready" and s, "base Ready")
        assert st["readyReplicas"] == 2 and st["observedGeneration"] == 1
        assert st["endpoint"] == f"http://{BASE}.{NS}.svc"
        assert st["selector"] == "app.kubernetes.io/name=loraplex-engine,loraplex.dev/base-model=tiny"


def test_adapters_become_servable(env: Env):
    with env.steps("adapters"):
        env.cluster.create(lora_body("a1", "a1"))
        env.cluster.create(lora_body("a2", "a2", access={"apiKeySecretRefs": [{"name": "acme-keys"}]}))
        for name in ("a1", "a2"):
            env.wait(lambda n=name: env.phase(n) == "Ready", f"{name} Ready")
            st = env.lora(name)["status"]
            assert (st["readyReplicas"], st["totalReplicas"]) == (2, 2)
            assert sorted(p["name"] for p in st["pods"]) == [f"{BASE}-0", f"{BASE}-1"]
            assert all(p["state"] in ("registered", "host", "device") and p["bootId"] for p in st["pods"])
        for pod in env.pods():
            r = env.http.post(pod.url("/v1/completions"),
                              json={"model": "a1", "prompt": "The quick brown", "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] is not None and r.json()["model"] == "a1"
            # a2 is restricted to the tenant's key, which reached the engine only as a hash
            denied = env.http.post(pod.url("/v1/completions"), json={"model": "a2", "prompt": "x", "max_tokens": 2})
            assert denied.status_code in (401, 403, 404), denied.text
            ok = env.http.post(pod.url("/v1/completions"), json={"model": "a2", "prompt": "x", "max_tokens": 2},
                               headers={"Authorization": f"Bearer {TENANT_KEY}"})
            assert ok.status_code == 200, ok.text
            models = {m["id"]: m for m in env.http.get(pod.url("/v1/models")).json()["data"]}
            assert "a1" in models
        # The ConfigMap holds only preload adapters; the others reached the engines by push,
        # the tenant's key only as its hash.
        cm = env.cluster.get("v1", "configmaps", NS, f"{BASE}-adapters")
        assert parse_manifest_list(cm["data"]["adapters.json"]) == []
        for pod in env.pods():
            pushed = env.http.get(pod.url("/v1/adapters/a2"), headers=ADMIN).json()["manifest"]
            assert pushed["tenants"] == [salted_key_hash(TENANT_KEY, tenant_salt(NS, BASE))]
            assert TENANT_KEY not in json.dumps(pushed)
        # Transitions that concern many adapters are aggregated into one Event on the base.
        ev = env.wait(lambda: [e for e in env.events(BASE) if e["reason"] == "AdaptersReady"], "an aggregated Event")
        assert any("a1" in e["message"] for e in ev)
        assert not [e for e in env.events("a1") if e["reason"] == "Ready"], "no Event per adapter for a Ready"


def test_bad_adapter_fails_with_the_engines_message_and_blocks_nothing(env: Env):
    with env.steps("bad adapter"):
        env.cluster.create(lora_body("bad", "bad", preload=True))
        env.wait(lambda: env.phase("bad") == "Failed", "bad Failed", timeout=45)
        st = env.lora("bad")["status"]
        ready = [c for c in st["conditions"] if c["type"] == "Ready"][0]
        engine_messages = {p["message"] for p in st["pods"]}
        assert all("dora" in m.lower() for m in engine_messages), engine_messages
        assert "dora" in ready["message"].lower() and ready["reason"] == "LoadFailed"
        assert all(p["state"] == "failed" and p["failures"] == 2 for p in st["pods"])
        # Events are posted right after the status write they describe
        warnings = env.wait(lambda: (w := [e for e in env.events("bad") if e["type"] == "Warning"])
                            and {"LoadFailed", "Failed"} <= {e["reason"] for e in w} and w, "Warning Events")
        assert any("dora" in e["message"].lower() for e in warnings)
        # the others are untouched, and the pods' readiness does not wait on the failed preload
        assert env.phase("a1") == "Ready" and env.phase("a2") == "Ready"
        env.kubelet.wait_ready(timeout=30)
        for pod in env.pods():
            assert env.http.get(pod.url("/v1/adapters/bad"), headers=ADMIN).status_code == 404
        env.wait(lambda: (env.bmd() or {}).get("status", {}).get("readyReplicas") == 2, "both pods Ready")
        # Withdrawn from the ConfigMap by the pass after the one that wrote Failed.
        env.wait(lambda: "bad" not in {m.name for m in parse_manifest_list(
            env.cluster.get("v1", "configmaps", NS, f"{BASE}-adapters")["data"]["adapters.json"])},
            "the failed preload adapter out of the ConfigMap")


def test_restarted_engine_gets_its_adapters_back(env: Env):
    with env.steps("engine restart"):
        pod = env.pods()[0]
        before = {p["name"]: p["bootId"] for p in env.lora("a1")["status"]["pods"]}
        old_boot = env.http.get(pod.url("/info")).json()["boot_id"]
        assert before[pod.name] == old_boot
        env.kubelet.restart(pod.name)
        env.kubelet.wait_ready(timeout=90)
        new_boot = env.http.get(pod.url("/info")).json()["boot_id"]
        assert new_boot != old_boot
        assert env.http.get(pod.url("/v1/adapters")).status_code == 401, "admin routes need the token"
        assert env.http.get(pod.url("/v1/adapters"), headers=ADMIN).status_code == 200
        for name in ("a1", "a2"):
            env.wait(lambda n=name: any(p["name"] == pod.name and p["bootId"] == new_boot
                                        and p["state"] in ("registered", "host", "device")
                                        for p in (env.lora(n) or {}).get("status", {}).get("pods", [])),
                     f"{name} pushed again to the restarted engine")
            r = env.http.get(pod.url(f"/v1/adapters/{name}"), headers=ADMIN)
            assert r.status_code == 200 and r.json()["state"] in ("registered", "host", "device")
        r = env.http.post(pod.url("/v1/completions"), json={"model": "a1", "prompt": "Paris is", "max_tokens": 3})
        assert r.status_code == 200, r.text
        env.wait(lambda: [e for e in env.events(BASE) if e["reason"] == "PodRestarted" and pod.name in e["message"]],
                 "a PodRestarted Event on the base")
        other = env.pods()[1]
        assert {p["name"]: p["bootId"] for p in env.lora("a1")["status"]["pods"]}[other.name] == before[other.name]


def test_operator_restart_makes_no_writes(env: Env):
    with env.steps("operator restart"):
        # Settled: the restarted engine went through the bad adapter's attempts again (a new
        # engine process gets a fresh, bounded set) and both pods are Ready.
        boots = {p.name: env.http.get(p.url("/info")).json()["boot_id"] for p in env.pods()}

        def settled() -> bool:
            bad = (env.lora("bad") or {}).get("status", {})
            return (env.phase("a1") == "Ready" and env.phase("a2") == "Ready" and bad.get("phase") == "Failed"
                    and {p["name"]: p["bootId"] for p in bad.get("pods", [])} == boots
                    and all(p["failures"] == 2 for p in bad["pods"])
                    and (env.bmd() or {}).get("status", {}).get("phase") == "Ready")
        env.wait(settled, "everything settled", timeout=45)
        time.sleep(2)
        env.operator.stop()
        mark = len(env.cluster.requests())
        env.operator = OperatorProcess(env.operator.kubeconfig, env.tmp / "operator-2.log", env=OPERATOR_ENV).start()
        # Let it list, index, run every daemon and resync a few times (resync interval: 1 s).
        env.wait(lambda: "reconcile" in env.operator.log() and len(env.cluster.requests()) > mark + 20,
                 "the new operator at work")
        time.sleep(4)
        ops = [r for r in env.cluster.requests()[mark:] if from_operator(r)]
        assert ops, "the new operator made no requests at all"
        # The Lease is the one thing a new leader must write (acquire, renew).
        writes = [w for w in env.cluster.writes(mark) if "/leases" not in w]
        detail = [(w, r.data) for w, r in zip(writes, [r for r in env.cluster.requests()[mark:]
                                                        if str(getattr(r.method, "value", r.method)).upper()
                                                        in ("POST", "PATCH", "PUT", "DELETE")
                                                        and "/leases" not in r.url.path])]
        assert writes == [], f"an operator restart must change nothing that is right; wrote: {detail}"
        assert env.phase("a1") == "Ready" and env.phase("bad") == "Failed"


def test_autoscaling_sets_the_deployment_never_the_spec(env: Env):
    with env.steps("autoscaling"):
        c = env.cluster
        c.update_spec(LORA_API, "basemodeldeployments", NS, BASE, {"autoscaling": {
            "enabled": True, "minReplicas": 1, "maxReplicas": 2, "metric": "num_requests_running", "target": 4,
            "scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 0}})
        env.wait(lambda: c.get("apps/v1", "deployments", NS, BASE)["spec"]["replicas"] == 1,
                 "idle engines: scaled down to minReplicas")
        st = env.wait(lambda: (s := env.bmd()["status"]).get("desiredReplicas") == 1 and s.get("lastScaleTime") and s,
                      "status.desiredReplicas")
        assert env.bmd()["spec"]["replicas"] == 2, "the autoscaler never writes the spec"
        env.wait(lambda: [e for e in env.events(BASE) if e["reason"] == "Scaled"], "a Scaled Event")
        assert st["lastScaleTime"].endswith("Z")
        c.update_spec(LORA_API, "basemodeldeployments", NS, BASE, {"autoscaling": {"enabled": False}})
        env.wait(lambda: c.get("apps/v1", "deployments", NS, BASE)["spec"]["replicas"] == 2,
                 "autoscaling off: back to spec.replicas")


def test_deleting_an_adapter_unloads_it(env: Env):
    with env.steps("delete adapter"):
        env.cluster.delete(LORA_API, "loraadapters", NS, "a1")
        env.wait(lambda: env.lora("a1") is None, "a1 gone (finalizer released)")
        for pod in env.pods():
            r = env.http.get(pod.url("/v1/adapters/a1"), headers=ADMIN)
            assert r.status_code == 404, r.text
            assert env.http.get(pod.url("/v1/adapters/a2"), headers=ADMIN).status_code == 200


def test_deleting_the_base_cleans_up(env: Env):
    with env.steps("delete base"):
        uid = env.bmd()["metadata"]["uid"]
        env.cluster.delete(LORA_API, "basemodeldeployments", NS, BASE)
        env.wait(lambda: env.bmd() is None, "the base gone (its finalizer released)")
        # kmock has no garbage collector; Kubernetes' collects every object owned by the base.
        for api, plural, name in (("apps/v1", "deployments", BASE), ("v1", "services", BASE),
                                  ("v1", "configmaps", f"{BASE}-adapters")):
            owners = env.cluster.get(api, plural, NS, name)["metadata"]["ownerReferences"]
            assert [o["uid"] for o in owners if o.get("controller")] == [uid]
        env.wait(lambda: (env.lora("a2") or {}).get("status", {}).get("phase") == "Pending", "a2 Pending")
        accepted = [c for c in env.lora("a2")["status"]["conditions"] if c["type"] == "Accepted"][0]
        assert accepted["reason"] == "BaseNotFound"
        for name in ("a2", "bad"):
            env.cluster.delete(LORA_API, "loraadapters", NS, name)
        env.wait(lambda: env.lora("a2") is None and env.lora("bad") is None, "adapters of a gone base deleted")


def test_operator_writes_only_status_and_finalizers(env: Env):
    """Over the whole run: no PUT, and the users' objects were patched only in status (and
    kopf's finalizer in metadata) - never spec, never annotations or labels."""
    ops = [r for r in env.cluster.requests() if from_operator(r)]
    assert ops
    assert not [r for r in ops if str(r.method.value if hasattr(r.method, "value") else r.method).upper() == "PUT"]
    for r in ops:
        method = str(getattr(r.method, "value", r.method)).upper()
        if method != "PATCH" or r.resource is None or r.resource.group != "loraplex.dev":
            continue
        body = r.data
        if isinstance(body, list):  # a JSON patch (kopf's finalizer edits)
            for op in body:
                if op["op"] == "test":
                    continue
                assert op["path"].startswith(("/metadata/finalizers", "/status")), body
            continue
        if r.subresource == "status":
            assert set(body) <= {"status"}, body
            continue
        assert isinstance(body, dict) and set(body) <= {"metadata", "status"}, body
        assert set(body.get("metadata", {})) <= {"finalizers"}, body


def test_dashboard_and_alerts_query_what_the_operator_serves(env: Env):
    """The operator's side of the chart's dashboard and alerts: every loraplex_operator_* series
    they query is in this operator's live /metrics (LORAPLEX_METRICS_PORT)."""
    from tests.support.promql import exported_names, queried_names

    from .test_deploy_files import ALL_ON, promql_of, render

    served = exported_names(env.http.get(f"http://127.0.0.1:{env.operator.metrics_port}/metrics").text)
    queried = {q for e in promql_of(render(ALL_ON)) for q in queried_names(e) if q.startswith("loraplex_operator_")}
    assert {"loraplex_operator_adapters", "loraplex_operator_reconcile_total",
            "loraplex_operator_reconcile_duration_seconds_bucket"} <= queried
    assert not queried - served, f"not served by the operator: {sorted(queried - served)}"


def test_rbac_covers_every_request(env: Env):
    """Every request the operator made during the run is allowed by the Helm chart's RBAC, as the
    API server's authorizer would decide it for the chart's ServiceAccount (tests/operator/rbac.py;
    test_deploy_files.py proves the check fails on a request the chart does not grant)."""
    from .rbac import assert_chart_grants_operator_requests

    assert_chart_grants_operator_requests(env.cluster)
