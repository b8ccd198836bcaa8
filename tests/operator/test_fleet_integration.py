"""The fleet at catalog scale: the real operator against kmock, with real engine processes as pods.

One base, a catalog of LoraAdapters with tenant keys (LORAPLEX_FLEET_ADAPTERS, default 1,000;
10,000 go through the same reconcile pass in test_fleet_scale.py, against an in-memory API:
kmock's matching scans its request log per request, which the harness keeps short, but it also
scans every object it holds per request, so creating 2,000 took 60 s here), placement 2 of N
pods, through kopf. In order:
- every adapter Ready on its placed pods within a bound; every object the operator wrote within
  the API server's limits (measured); the operator's RSS and engine calls per settled pass;
- secure by default: the operator created the admin-token Secret, the engines require it;
- InferencePool rendered (its CRD is installed here) and valid against the v1 schema;
- scaling 2 -> 4 pods spreads warm adapters onto the new pods; scaling down moves them off;
- an unplaced pod serves a tenant-restricted adapter just in time through the operator's catalog,
  with the adapter's tenant rules;
- an engine that stops answering (SIGSTOP: timeouts) then recovers: its adapters come back Ready;
- an engine whose admin API answers 500 for a while (a fault-injecting proxy in front of it): the
  operator retries with backoff, never marks anything Failed, and the adapters come back Ready;
- a pod restart (new boot id) gets its placed adapters back;
- a wrong sha256 ends Failed with the engine's message at first use, the others keep serving;
- the operator killed mid-push: a new one finishes the job;
- two operators: exactly one acts; killing the leader hands over;
- every API request the operators made is granted by the chart's RBAC.
"""
from __future__ import annotations

import base64
import json
import os
import signal
import time

import httpx
import pytest

from loraplex.manifest import salted_key_hash
from loraplex.operator.adapters import tenant_salt

from .harness import FakeCluster, Kubelet, OperatorProcess, free_port, wait_for
from .sizes import assert_within_limits
from .test_integration import Steps, _engine_missing

pytestmark = pytest.mark.slow

_missing = _engine_missing()
if _missing:
    print(f"\nSKIP fleet integration tests: {_missing}")
    pytest.skip(_missing, allow_module_level=True)

NS, BASE = "fleet", "cat"
API = "loraplex.dev/v1alpha1"
N = int(os.environ.get("LORAPLEX_FLEET_ADAPTERS", "1000"))
KEYS_PER_SECRET = 5
IPS = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
HIDDEN = "127.0.0.6"  # where the engine of the pod behind a FaultProxy listens
ENV = {
    "LORAPLEX_RESYNC_INTERVAL": "3",
    "LORAPLEX_POLL_INTERVAL": "0.5",
    "LORAPLEX_BACKOFF_BASE": "0.3",
    "LORAPLEX_BACKOFF_MAX": "1",
    "LORAPLEX_MAX_FAILURES": "2",
    "LORAPLEX_ENGINE_TIMEOUT": "2",
    "LORAPLEX_ENGINE_CONNECT_TIMEOUT": "1",
}
# Measured at 1,000: created in 12-20 s, all Ready 27-38 s after the first create (load average 6).
READY_BOUND_S = 60 + N * 0.12

# The v1 InferencePool's required shape (Gateway API Inference Extension API reference).
POOL_SCHEMA = {
    "type": "object", "required": ["spec"],
    "properties": {"spec": {
        "type": "object", "required": ["selector", "targetPorts", "endpointPickerRef"],
        "properties": {
            "selector": {"type": "object", "required": ["matchLabels"],
                         "properties": {"matchLabels": {"type": "object", "minProperties": 1,
                                                        "additionalProperties": {"type": "string"}}}},
            "targetPorts": {"type": "array", "minItems": 1, "maxItems": 8, "items": {
                "type": "object", "required": ["number"], "additionalProperties": False,
                "properties": {"number": {"type": "integer", "minimum": 1, "maximum": 65535}}}},
            "endpointPickerRef": {"type": "object", "required": ["name", "port"], "additionalProperties": False,
                                  "properties": {
                                      "group": {"type": "string"}, "kind": {"type": "string", "pattern": "^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"},
                                      "name": {"type": "string", "minLength": 1, "maxLength": 253},
                                      "port": {"type": "object", "required": ["number"],
                                               "properties": {"number": {"type": "integer", "minimum": 1, "maximum": 65535}}},
                                      "failureMode": {"enum": ["FailOpen", "FailClose"]}}},
        }}},
}


def adapter(i: int) -> str:
    return f"t{i:05d}"


class Fleet:
    def __init__(self, cluster: FakeCluster, tmp, assets):
        self.cluster, self.tmp, self.assets = cluster, tmp, assets
        self.kubeconfig = cluster.write_kubeconfig(tmp / "kubeconfig")
        self.operators: list[OperatorProcess] = []
        self.kubelet: Kubelet | None = None
        self.steps = Steps()
        self.http = httpx.Client(timeout=30, trust_env=False)
        self.token = ""
        self.port = free_port(IPS + [HIDDEN])
        self.catalog_url = ""

    def operator(self, name: str) -> OperatorProcess:
        # Each operator serves the catalog on its own port; all render the first one's URL into the
        # engines, as all replicas render the one Service's (so no operator sees drift in another's
        # Deployment).
        port = free_port(["127.0.0.1"])
        self.catalog_url = self.catalog_url or f"http://127.0.0.1:{port}"
        env = {**ENV, "LORAPLEX_CATALOG_PORT": str(port), "LORAPLEX_CATALOG_ADDR": "127.0.0.1",
               "LORAPLEX_CATALOG_URL": self.catalog_url, "LORAPLEX_CATALOG_REFRESH_INTERVAL": "0.5"}
        op = OperatorProcess(self.kubeconfig, self.tmp / f"{name}.log", env=env, name=name).start()
        self.operators.append(op)
        return op

    def adapters(self) -> list[dict]:
        return self.cluster.list(API, "loraadapters", NS)

    def phases(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for a in self.adapters():
            p = (a.get("status") or {}).get("phase", "None")
            out[p] = out.get(p, 0) + 1
        return out

    def listing(self, pod) -> set[str]:
        r = self.http.get(pod.url("/v1/adapters"), headers={"Authorization": f"Bearer {self.token}"})
        r.raise_for_status()
        return {a["name"] for a in r.json()["data"]}

    def all_ready_on_placement(self) -> bool:
        items = self.adapters()
        live = {p.name for p in self.kubelet.pods.values() if p.proc and p.proc.poll() is None}
        for a in items:
            st = a.get("status") or {}
            if a["metadata"]["name"].startswith("t") and not (
                    st.get("phase") == "Ready" and len(st.get("placement") or []) == 2
                    and set(st["placement"]) <= live and st.get("readyReplicas") == 2):
                return False
        return len(items) >= N

    def log(self) -> str:
        return "\n".join(f"--- {op.name} ---\n{op.log()[-5000:]}" for op in self.operators) + f"\nphases: {self.phases()}"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, assets):
    tmp = tmp_path_factory.mktemp("fleet")
    with FakeCluster(extra_resources=FakeCluster.INFERENCE_POOL) as cluster:
        f = Fleet(cluster, tmp, assets)
        try:
            yield f
        finally:
            for op in f.operators:
                op.stop()
            if f.kubelet is not None:
                f.kubelet.close()
            f.http.close()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from bench.tiny import make_tiny_adapter, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("fleet-tiny")
    base = make_tiny_checkpoint(root / "base", family="llama")
    make_tiny_adapter(base, root / "adapters" / "shared", rank=4, target_modules=["q_proj", "v_proj"])
    return {"base": base, "adapters": root / "adapters"}


def lora(name: str, **spec) -> dict:
    return {"apiVersion": API, "kind": "LoraAdapter", "metadata": {"name": name, "namespace": NS},
            "spec": {"baseModel": BASE, "source": {"type": "local", "uri": "shared"}, **spec}}


def test_catalog_ready_within_limits(fleet: Fleet):
    with fleet.steps("catalog"):
        c = fleet.cluster
        c.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "namespace": NS}})
        for s in range((N + KEYS_PER_SECRET - 1) // KEYS_PER_SECRET):
            c.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"keys-{s}", "namespace": NS},
                      "data": {f"k{i}": base64.b64encode(f"sk-tenant-{i}".encode()).decode()
                               for i in range(s * KEYS_PER_SECRET, min(N, (s + 1) * KEYS_PER_SECRET))}})
        leader = fleet.operator("operator-a")
        c.create({"apiVersion": API, "kind": "BaseModelDeployment", "metadata": {"name": BASE, "namespace": NS},
                  "spec": {"model": {"id": str(fleet.assets["base"]), "dtype": "float32"}, "replicas": 2,
                           "engine": {"port": fleet.port, "maxLoraRank": 16, "maxActiveAdapters": 4,
                                      "args": ["--adapter-dir", str(fleet.assets["adapters"]),
                                               "--num-kv-blocks", "64", "--log-level", "warning"]}}})
        # Secure by default: the operator made an admin token, the engines mount and require it.
        secret = wait_for(lambda: c.get("v1", "secrets", NS, f"{BASE}-admin-token"), 30, "the admin Secret",
                          on_timeout=fleet.log)
        fleet.token = base64.b64decode(secret["data"]["token"]).decode()
        assert len(fleet.token) >= 32
        wait_for(lambda: c.get("apps/v1", "deployments", NS, BASE), 30, "the Deployment", on_timeout=fleet.log)
        fleet.kubelet = Kubelet(c, NS, BASE, fleet.port, fleet.tmp / "pods")
        for i in range(2):
            fleet.kubelet.add_pod(f"{BASE}-{i}", IPS[i])
        fleet.kubelet.wait_ready(timeout=120)
        pod0 = fleet.kubelet.pods[f"{BASE}-0"]
        assert fleet.http.get(pod0.url("/v1/adapters")).status_code == 401

        t0 = time.monotonic()
        for i in range(N):
            c.create(lora(adapter(i), access={"apiKeySecretRefs": [
                {"name": f"keys-{i // KEYS_PER_SECRET}", "key": f"k{i}"}]}))
        created = time.monotonic() - t0
        wait_for(fleet.all_ready_on_placement, READY_BOUND_S, f"{N} adapters Ready on their placed pods",
                 interval=2, on_timeout=fleet.log)
        ready = time.monotonic() - t0
        # Settled: a pass costs one listing per pod (the gauge of the last pass says 2).
        def engine_calls() -> float | None:
            lines = [line for line in leader.metrics().splitlines()
                     if line.startswith("loraplex_operator_engine_calls_last_pass{")]
            return float(lines[0].split()[-1]) if lines else None
        wait_for(lambda: engine_calls() == 2.0, 30, "a settled pass of 2 engine calls", interval=1,
                 on_timeout=lambda: f"last: {engine_calls()}\n{fleet.log()}")
        rss = leader.rss_bytes()
        sizes = {}
        for api, plural in (("v1", "configmaps"), ("apps/v1", "deployments"), ("v1", "services"),
                            ("v1", "secrets"), ("coordination.k8s.io/v1", "leases"), (API, "basemodeldeployments"),
                            (API, "loraadapters"), ("inference.networking.k8s.io/v1", "inferencepools"),
                            ("v1", "events")):
            for obj in c.list(api, plural, NS if plural != "leases" else "loraplex-system"):
                s = assert_within_limits(obj)
                key = obj.get("kind") or plural
                sizes[key] = max(sizes.get(key, 0), s["object"])
        print(f"\nFLEET N={N}: created in {created:.1f}s, all Ready in {ready:.1f}s (bound {READY_BOUND_S:.0f}s); "
              f"operator RSS {rss / 2**20:.0f} MiB; engine calls per settled pass 2 (2 pods); "
              f"largest objects (bytes): {json.dumps(sizes, sort_keys=True)}")
        assert rss < 400 * 2**20
        # The tenant keys reached the engines as hashes only, on the placed pods only.
        for pod in fleet.kubelet.pods.values():
            assert len(fleet.listing(pod)) == N
        # InferencePool: rendered (its CRD is installed here), valid, selecting the engine pods.
        import jsonschema
        pool = c.get("inference.networking.k8s.io/v1", "inferencepools", NS, BASE)
        jsonschema.validate(pool, POOL_SCHEMA)
        assert pool["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "loraplex-engine",
                                                           "loraplex.dev/base-model": BASE}
        assert pool["spec"]["targetPorts"] == [{"number": fleet.port}]
        cond = {x["type"]: x for x in c.get(API, "basemodeldeployments", NS, BASE)["status"]["conditions"]}
        assert cond["InferencePool"]["status"] == "True" and cond["InferencePool"]["reason"] == "Rendered"


def test_unplaced_pod_serves_a_tenant_adapter_through_the_catalog(fleet: Fleet):
    """Placed on one pod of two; the other gets the request (a gateway may send any request
    anywhere): it fetches the manifest from the operator's catalog and applies its tenants."""
    with fleet.steps("catalog jit"):
        c = fleet.cluster
        c.create(lora("solo", placement={"replicas": 1},
                      access={"apiKeySecretRefs": [{"name": "keys-0", "key": "k0"}]}))
        st = wait_for(lambda: (s := c.get(API, "loraadapters", NS, "solo").get("status") or {}).get("phase") == "Ready"
                      and len(s.get("placement") or []) == 1 and s, 60, "solo Ready on 1 pod", on_timeout=fleet.log)
        (placed,) = st["placement"]
        (other,) = [p for p in fleet.kubelet.pods.values() if p.name != placed]
        assert "solo" not in fleet.listing(other)

        def ask(key: str | None) -> httpx.Response:
            return fleet.http.post(other.url("/v1/completions"), json={"model": "solo", "prompt": "x", "max_tokens": 2},
                                   headers={"Authorization": f"Bearer {key}"} if key else {})
        # to a caller its tenants do not list, the adapter does not exist (docs/api.md)
        assert ask(None).status_code == 404
        assert ask("sk-tenant-1").status_code == 404  # a key of another tenant
        t0 = time.monotonic()
        r = ask("sk-tenant-0")
        cold = time.monotonic() - t0
        assert r.status_code == 200, r.text
        t0 = time.monotonic()  # its first use there too (registered, not preloaded): the same load
        placed_first = fleet.http.post(fleet.kubelet.pods[placed].url("/v1/completions"), headers={
            "Authorization": "Bearer sk-tenant-0"}, json={"model": "solo", "prompt": "x", "max_tokens": 2})
        assert placed_first.status_code == 200, placed_first.text
        print(f"\ncatalog: first request on the unplaced pod {cold * 1000:.0f} ms (lookup + load + 2 tokens), "
              f"on the placed pod {(time.monotonic() - t0) * 1000:.0f} ms (load + 2 tokens)")
        entry = fleet.http.get(other.url("/v1/adapters/solo"), headers={"Authorization": f"Bearer {fleet.token}"}).json()
        assert entry["dynamic"] is True and entry["manifest"]["tenants"] == [salted_key_hash("sk-tenant-0", tenant_salt(NS, BASE))]
        assert "sk-tenant-0" not in json.dumps(entry)
        # The operator leaves a just-in-time entry alone (it is not placed there), and placement holds.
        time.sleep(2)
        assert c.get(API, "loraadapters", NS, "solo")["status"]["placement"] == [placed]
        assert "solo" in fleet.listing(other)
        # Deleted: the operator's finalizer unloads it from every pod, the just-in-time copy too.
        c.delete(API, "loraadapters", NS, "solo")
        wait_for(lambda: all("solo" not in fleet.listing(p) for p in fleet.kubelet.pods.values()), 60,
                 "solo gone from both pods", on_timeout=fleet.log)
        assert ask("sk-tenant-0").status_code == 404


def test_scaling_spreads_warm_adapters_and_moves_them_off(fleet: Fleet):
    with fleet.steps("scaling"):
        c = fleet.cluster
        c.update_spec(API, "basemodeldeployments", NS, BASE, {"replicas": 4})
        wait_for(lambda: c.get("apps/v1", "deployments", NS, BASE)["spec"]["replicas"] == 4, 20, "Deployment 4")
        fleet.kubelet.add_pod(f"{BASE}-2", IPS[2])
        fleet.kubelet.add_pod(f"{BASE}-3", IPS[3], behind_proxy=HIDDEN)  # for the 500s below
        fleet.kubelet.wait_ready(timeout=120)
        wait_for(fleet.all_ready_on_placement, 60 + N * 0.02, "placements spread over 4 pods", interval=2,
                 on_timeout=fleet.log)
        # Make-before-break: a moved adapter leaves its old pod in the pass after its new pods serve it.
        counts = wait_for(lambda: (n := {p.name: len(fleet.listing(p)) for p in fleet.kubelet.pods.values()})
                          and sum(n.values()) == 2 * N and n, 60, "the old copies of moved adapters removed",
                          interval=1, on_timeout=fleet.log)
        assert min(counts.values()) >= 1, counts  # 2 of 4 pods each
        # Scale down to 2: pods 0 and 1 go; their adapters move to pods 2 and 3.
        c.update_spec(API, "basemodeldeployments", NS, BASE, {"replicas": 2})
        for name in (f"{BASE}-0", f"{BASE}-1"):
            pod = fleet.kubelet.pods.pop(name)
            c.delete("v1", "pods", NS, name)
            pod.stop()
        wait_for(fleet.all_ready_on_placement, 60 + N * 0.02, "placements back on 2 pods", interval=2,
                 on_timeout=fleet.log)
        wait_for(lambda: {p.name: len(fleet.listing(p)) for p in fleet.kubelet.pods.values()} == {
            f"{BASE}-2": N, f"{BASE}-3": N}, 60, "every adapter on pods 2 and 3", interval=1, on_timeout=fleet.log)


def test_engine_timing_out_for_a_while_then_recovering(fleet: Fleet):
    with fleet.steps("timeouts"):
        pod = fleet.kubelet.pods[f"{BASE}-2"]
        os.kill(pod.proc.pid, signal.SIGSTOP)  # accepts connections, answers nothing: timeouts
        try:
            # Which is seen first is a race, both right: the operator's calls time out (the pod is
            # `unreachable`), or the kubelet's readiness probe marks the Pod NotReady first (the
            # operator then reports it `unknown`, "engine pod not ready").
            def unreachable() -> bool:
                a = fleet.cluster.get(API, "loraadapters", NS, adapter(0))["status"]
                return any(p["state"] in ("unreachable", "unknown") for p in a["pods"]) and a["phase"] == "Degraded"
            wait_for(unreachable, 30, "an unreachable pod seen", on_timeout=fleet.log)
        finally:
            os.kill(pod.proc.pid, signal.SIGCONT)
        wait_for(fleet.all_ready_on_placement, 60, "Ready again after the engine recovered", interval=1,
                 on_timeout=fleet.log)
        ev = [e for e in fleet.cluster.list("v1", "events", NS) if e["involvedObject"]["name"] == adapter(0)]
        assert not [e for e in ev if e["reason"] in ("EngineUnreachable", "Degraded")], "aggregated on the base"


def attempts_of(failed_at: list[tuple[float, str]]) -> list[float]:
    """When the operator tried a pod again: its failed calls, those of one pass taken together."""
    times = [t for t, _ in failed_at]
    return [t for i, t in enumerate(times) if i == 0 or t - times[i - 1] > 0.1]


def test_engine_answering_500_for_a_while_then_recovering(fleet: Fleet):
    with fleet.steps("500s"):
        c = fleet.cluster
        pod = fleet.kubelet.pods[f"{BASE}-3"]
        proxy = pod.proxy
        assert proxy is not None

        def phases_seen() -> set[str]:
            return {(a.get("status") or {}).get("phase") for a in fleet.adapters()}
        proxy.failing = True  # /info and /v1/adapters answer 500; /ready still 200: the Pod stays Ready
        try:
            def degraded() -> bool:
                a = c.get(API, "loraadapters", NS, adapter(0))["status"]
                mine = [p for p in a["pods"] if p["name"] == pod.name]
                return bool(mine) and mine[0]["state"] == "unreachable" and mine[0].get("message") == proxy.MESSAGE \
                    and a["phase"] == "Degraded"
            wait_for(degraded, 30, "the 500s seen as a transient engine fault", on_timeout=fleet.log)
            seen: set[str] = set()

            def retried() -> bool:  # a while of 500s: retried again and again, never Failed
                seen.update(phases_seen())
                return len(attempts_of(proxy.failed_at)) >= 4
            wait_for(retried, 60, "4 attempts against the failing engine", interval=0.5,
                     on_timeout=lambda: f"{proxy.failed_at}\n{fleet.log()}")
            assert "Failed" not in seen, seen
        finally:
            proxy.failing = False
        attempts = attempts_of(proxy.failed_at)
        gaps = [round(b - a, 2) for a, b in zip(attempts, attempts[1:])]
        window = attempts[-1] - attempts[0]
        print(f"\n500s: {len(proxy.failed_at)} failed calls in {len(attempts)} attempts over {window:.1f}s; "
              f"gaps {gaps}")
        # Retried with backoff (LORAPLEX_BACKOFF_BASE 0.3, _MAX 1; a pass here takes seconds of
        # kmock status writes): never faster than the first backoff step, one call per attempt
        # (the boot id read that fails; the listing is not tried after it).
        assert len(attempts) <= window / 0.3 + 2, gaps
        assert len(proxy.failed_at) <= 2 * len(attempts)
        wait_for(fleet.all_ready_on_placement, 60, "Ready again after the 500s stopped", interval=1,
                 on_timeout=fleet.log)
        assert "Failed" not in phases_seen()


def test_pod_restart_gets_its_placed_adapters_back(fleet: Fleet):
    with fleet.steps("pod restart"):
        pod = fleet.kubelet.pods[f"{BASE}-3"]
        old = fleet.http.get(pod.url("/info")).json()["boot_id"]
        fleet.kubelet.restart(pod.name)
        fleet.kubelet.wait_ready(timeout=90)
        assert fleet.http.get(pod.url("/info")).json()["boot_id"] != old
        wait_for(lambda: len(fleet.listing(pod)) == N, 60, "placed adapters back", on_timeout=fleet.log)
        wait_for(fleet.all_ready_on_placement, 60, "all Ready", interval=1, on_timeout=fleet.log)


def test_wrong_sha256_fails_at_first_use_while_others_serve(fleet: Fleet):
    with fleet.steps("sha256"):
        c = fleet.cluster
        c.create(lora("wrong-sha", source={"type": "local", "uri": "shared", "sha256": "0" * 64}))
        wait_for(lambda: (c.get(API, "loraadapters", NS, "wrong-sha").get("status") or {}).get("phase") == "Ready",
                 90, "registered (not validated before its first use)", on_timeout=fleet.log)
        pods = list(fleet.kubelet.pods.values())

        def failed() -> bool:
            for p in pods:  # requests are the first uses that find the checkpoint bad
                r = fleet.http.post(p.url("/v1/completions"), json={"model": "wrong-sha", "prompt": "x", "max_tokens": 1})
                assert r.status_code != 200
            st = c.get(API, "loraadapters", NS, "wrong-sha")["status"]
            assert st["phase"] != "Ready" or all(e["failures"] == 0 for e in st["pods"]), \
                "never Ready while its loads fail"
            return st["phase"] == "Failed"
        wait_for(failed, 120, "Failed after max failures", interval=1, on_timeout=fleet.log)
        st = c.get(API, "loraadapters", NS, "wrong-sha")["status"]
        ready = [x for x in st["conditions"] if x["type"] == "Ready"][0]
        assert "sha256 mismatch" in ready["message"] and ready["reason"] == "LoadFailed"
        r = fleet.http.post(pods[0].url("/v1/completions"), json={"model": adapter(1), "prompt": "x", "max_tokens": 1},
                            headers={"Authorization": "Bearer sk-tenant-1"})
        assert r.status_code == 200, r.text
        assert fleet.phases().get("Ready") == N


def test_operator_killed_mid_push_then_two_operators_one_leader(fleet: Fleet):
    with fleet.steps("operators"):
        c = fleet.cluster
        a = fleet.operators[0]
        b = fleet.operator("operator-b")  # a candidate: waits for the Lease
        wait_for(lambda: "waiting for Lease" in b.log(), 30, "B waiting", on_timeout=fleet.log)
        extra = [f"late-{i:03d}" for i in range(6)]
        for name in extra:
            c.create(lora(name))
        a.kill()  # mid-push, without releasing the Lease
        lease = wait_for(lambda: (l := c.get("coordination.k8s.io/v1", "leases", "loraplex-system", "loraplex-operator"))
                         and l["spec"]["holderIdentity"] == "operator-b" and l, 30, "B takes the Lease over",
                         on_timeout=fleet.log)
        assert lease["spec"]["leaseTransitions"] >= 1
        assert "status of" not in b.log().split("now holds Lease")[0], "B acted before it led"

        def done() -> bool:
            return all((c.get(API, "loraadapters", NS, n).get("status") or {}).get("phase") == "Ready" for n in extra)
        wait_for(done, 90, "the new leader finished the push", interval=1, on_timeout=fleet.log)


def test_rbac_covers_every_request_of_the_fleet(fleet: Fleet):
    """Every API request the operators made over the whole fleet run (placement, leader election,
    the catalog's reads) is allowed by the chart's RBAC (tests/operator/rbac.py)."""
    from .rbac import assert_chart_grants_operator_requests

    checked = assert_chart_grants_operator_requests(fleet.cluster)
    print(f"\nRBAC: {checked} operator requests checked against the chart")
