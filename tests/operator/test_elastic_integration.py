"""An elastic fleet (issue 24), through kopf: the real operator against kmock, real engine processes
as the pods (harness.py), request traffic sent to them as a gateway with LoRA affinity would.

- one bad object fails alone: adapters whose placement the operator cannot use are Failed with
  Accepted=False (InvalidPlacement) and a Warning Event, and the base's other adapters go on;
- an adapter with `placement.replicas: auto` that turns hot gains warm pods within a few
  autoscale intervals, with the reason in its status, and loses them after it cools;
- no adapter is ever cold on every pod during a change: a watcher reads every engine's listing
  all along (several times per pass) and finds each adapter registered somewhere at every read,
  through the hot adapter's growth and shrink and through a move onto a pod that joins
  (make-before-break: the old pod keeps it until the new one serves it).
"""
from __future__ import annotations

import base64
import threading
import time

import httpx
import pytest

from loraplex.operator import placement as P

from .harness import FakeCluster, Kubelet, OperatorProcess, free_port, wait_for
from .test_integration import Steps, _engine_missing

pytestmark = pytest.mark.slow

_missing = _engine_missing()
if _missing:
    print(f"\nSKIP elastic integration tests: {_missing}")
    pytest.skip(_missing, allow_module_level=True)

NS, BASE = "elastic", "tiny"
API = "loraplex.dev/v1alpha1"
ADMIN_TOKEN = "admin-token-of-the-elastic-engines"
IPS = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
AUTOSCALE_INTERVAL = 0.5
ENV = {
    "LORAPLEX_RESYNC_INTERVAL": "1",
    "LORAPLEX_POLL_INTERVAL": "0.2",
    "LORAPLEX_BACKOFF_BASE": "0.2",
    "LORAPLEX_BACKOFF_MAX": "1",
    "LORAPLEX_ENGINE_TIMEOUT": "10",
    "LORAPLEX_AUTOSCALE_INTERVAL": str(AUTOSCALE_INTERVAL),
    "LORAPLEX_CATALOG_PORT": "0",  # no catalog: nothing here asks it, and 9091 may be taken
}
# The hot adapter: 1 to 3 warm pods, one per request a second, measured over 4 s; back down 2 s
# after its rate fell below the band.
HOT = {"replicas": "auto", "min": 1, "max": 3, "targetRequestsPerPod": 1, "rateWindowSeconds": 5,
       "scaleDownDelaySeconds": 2}
# Within a few autoscale intervals once the window has seen the traffic (the window, then a few
# intervals for the decision, the pass and the push), with room for this shared 2-core box.
GROW_BOUND_S = HOT["rateWindowSeconds"] + 40 * AUTOSCALE_INTERVAL
SHRINK_BOUND_S = HOT["rateWindowSeconds"] + HOT["scaleDownDelaySeconds"] + 40 * AUTOSCALE_INTERVAL
SERVABLE = ("registered", "host", "device")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from bench.tiny import make_tiny_adapter, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("elastic-tiny")
    base = make_tiny_checkpoint(root / "base", family="llama")
    make_tiny_adapter(base, root / "adapters" / "shared", rank=4, target_modules=["q_proj", "v_proj"])
    return {"base": base, "adapters": root / "adapters"}


class Watcher:
    """Reads every engine's adapter listing over and over (a thread); notes each read where a
    watched adapter was registered on no pod at all."""

    def __init__(self, kubelet: Kubelet):
        self.kubelet = kubelet
        self.watched: set[str] = set()
        self.reads = 0
        self.cold: list[tuple[float, str, dict]] = []
        self.latest: dict[str, set[str]] = {}  # adapter -> the pods holding it, at the last read
        self._stop = threading.Event()
        self._http = httpx.Client(timeout=5, trust_env=False, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        self._thread = threading.Thread(target=self._run, name="listing-watcher", daemon=True)

    def start(self, *names: str) -> None:
        self.watched |= set(names)
        if not self._thread.is_alive():
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            where: dict[str, set[str]] = {}
            listings: dict[str, dict] = {}
            for pod in list(self.kubelet.pods.values()):
                if not pod.ready:
                    continue
                try:
                    rows = self._http.get(pod.url("/v1/adapters?view=compact")).json()["data"]
                except (httpx.HTTPError, ValueError, KeyError):
                    continue
                listings[pod.name] = {a["name"]: a.get("state") for a in rows}
                for a in rows:
                    if a.get("state") in SERVABLE and not a.get("dynamic"):
                        where.setdefault(a["name"], set()).add(pod.name)
            if listings:
                self.reads += 1
                self.latest = where
                for name in self.watched:
                    if not where.get(name):
                        self.cold.append((time.monotonic(), name, listings))
            self._stop.wait(0.1)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._http.close()


class Traffic:
    """Completions for one adapter, sent (a thread) to the pods it is warm on, as a gateway's LoRA
    affinity would: about `rate` requests a second."""

    def __init__(self, env: "Env", model: str, rate: float):
        self.env, self.model, self.period = env, model, 1.0 / rate
        self.sent = self.ok = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        http = httpx.Client(timeout=30, trust_env=False)
        i = 0
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                pods = sorted(self.env.watcher.latest.get(self.model, ()))
                if pods:
                    pod = self.env.kubelet.pods[pods[i % len(pods)]]
                    i += 1
                    try:
                        r = http.post(pod.url("/v1/completions"),
                                      json={"model": self.model, "prompt": "hello", "max_tokens": 1})
                        self.ok += r.status_code == 200
                    except httpx.HTTPError:
                        pass
                    self.sent += 1
                self._stop.wait(max(self.period - (time.monotonic() - started), 0.0))
        finally:
            http.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


class Env:
    def __init__(self, cluster: FakeCluster, tmp, assets):
        self.cluster, self.tmp, self.assets = cluster, tmp, assets
        self.steps = Steps()
        self.port = free_port(IPS)
        self.operator = OperatorProcess(cluster.write_kubeconfig(tmp / "kubeconfig"), tmp / "operator.log",
                                        env=ENV).start()
        self.kubelet = Kubelet(cluster, NS, BASE, self.port, tmp / "pods")
        self.watcher = Watcher(self.kubelet)

    def lora(self, name: str) -> dict:
        return self.cluster.get(API, "loraadapters", NS, name) or {}

    def status(self, name: str) -> dict:
        return self.lora(name).get("status") or {}

    def log(self) -> str:
        names = ("hot", "mover", "steady", "bad-count", "bad-bounds")
        statuses = {n: {k: self.status(n).get(k) for k in ("phase", "placement", "placementReason")} for n in names}
        return f"statuses: {statuses}\nwatcher: {self.watcher.latest}\n--- operator ---\n{self.operator.log()[-6000:]}"


@pytest.fixture(scope="module")
def env(tmp_path_factory, assets):
    tmp = tmp_path_factory.mktemp("elastic")
    with FakeCluster() as cluster:
        e = Env(cluster, tmp, assets)
        try:
            yield e
        finally:
            e.watcher.stop()
            e.operator.stop()
            e.kubelet.close()


def lora(name: str, placement: dict | None = None) -> dict:
    spec = {"baseModel": BASE, "source": {"type": "local", "uri": "shared"}}
    if placement is not None:
        spec["placement"] = placement
    return {"apiVersion": API, "kind": "LoraAdapter", "metadata": {"name": name, "namespace": NS}, "spec": spec}


def mover_name(pods: list[str], new_pod: str) -> str:
    """An adapter name whose first choice among `pods` + `new_pod` is `new_pod` (spread, 1 replica):
    when that pod joins, the adapter moves onto it."""
    for i in range(10_000):
        name = f"mover-{i}"
        if P.ranked(name, pods + [new_pod])[0] == new_pod:
            return name
    raise AssertionError("no such name")


def test_bad_placements_fail_alone(env: Env):
    with env.steps("bad placements"):
        c = env.cluster
        c.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "namespace": NS}})
        c.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "admin", "namespace": NS},
                  "data": {"token": base64.b64encode(ADMIN_TOKEN.encode()).decode()}})
        c.create({"apiVersion": API, "kind": "BaseModelDeployment", "metadata": {"name": BASE, "namespace": NS},
                  "spec": {"model": {"id": str(env.assets["base"]), "dtype": "float32"}, "replicas": 3,
                           "placement": {"replicas": 1},
                           "engine": {"port": env.port, "maxLoraRank": 16, "maxActiveAdapters": 4,
                                      "adminTokenSecretRef": {"name": "admin"},
                                      "args": ["--adapter-dir", str(env.assets["adapters"]),
                                               "--num-kv-blocks", "64", "--log-level", "warning"]}}})
        wait_for(lambda: c.get("apps/v1", "deployments", NS, BASE), 30, "the Deployment", on_timeout=env.log)
        for i in range(3):
            env.kubelet.add_pod(f"{BASE}-{i}", IPS[i])
        env.kubelet.wait_ready(timeout=120)
        # kmock checks no schema (nor does an API server without CEL, or an object from before a
        # CRD upgrade): the operator meets placements it cannot use.
        c.create(lora("bad-count", {"replicas": "most"}))
        c.create(lora("bad-bounds", {"replicas": "auto", "min": 5, "max": 2}))
        c.create(lora("steady"))
        c.create(lora("hot", HOT))
        for name, words in (("bad-count", "placement.replicas must be a whole number"),
                            ("bad-bounds", "placement.min (5) must be <= placement.max (2)")):
            st = wait_for(lambda n=name: (s := env.status(n)).get("phase") == "Failed" and s, 30, f"{name} Failed",
                          on_timeout=env.log)
            accepted = next(x for x in st["conditions"] if x["type"] == "Accepted")
            assert (accepted["status"], accepted["reason"]) == ("False", "InvalidPlacement") and \
                words in accepted["message"], accepted
            assert st["placement"] == []
            wait_for(lambda n=name, w=words: [e for e in c.list("v1", "events", NS)
                                             if e["involvedObject"].get("name") == n and e["type"] == "Warning"
                                             and e["reason"] == "InvalidPlacement" and w in e["message"]],
                     10, f"a Warning Event on {name}", on_timeout=env.log)
        # The base's other adapters go on.
        for name in ("steady", "hot"):
            st = wait_for(lambda n=name: (s := env.status(n)).get("phase") == "Ready" and s, 60, f"{name} Ready",
                          on_timeout=env.log)
            assert len(st["placement"]) == 1, st
        assert "no request rate measured yet" in env.status("hot")["placementReason"] or \
            "req/s" in env.status("hot")["placementReason"]
        assert "placementReason" not in env.status("steady"), "only auto placements say why"
        assert "Traceback" not in env.operator.log()


def test_a_hot_adapter_gains_warm_pods_and_loses_them_when_it_cools(env: Env):
    with env.steps("hot adapter"):
        env.watcher.start("hot", "steady")
        wait_for(lambda: env.watcher.reads >= 3 and env.watcher.latest.get("hot"), 30, "the watcher reading",
                 on_timeout=env.log)
        traffic = Traffic(env, "hot", rate=5)
        try:
            st = wait_for(lambda: len((s := env.status("hot")).get("placement") or []) == 3 and s, GROW_BOUND_S,
                          "hot warm on 3 pods", on_timeout=env.log)
            assert st["placementReason"].startswith("3 pods: ") and "req/s over 5 s, target 1/pod" in \
                st["placementReason"], st["placementReason"]
            wait_for(lambda: (s := env.status("hot")).get("phase") == "Ready" and s.get("readyReplicas") == 3, 30,
                     "hot Ready on its 3 pods", on_timeout=env.log)
            wait_for(lambda: len(env.watcher.latest.get("hot", ())) == 3, 10, "hot in 3 engines' listings",
                     on_timeout=env.log)
        finally:
            traffic.stop()
        assert traffic.ok >= 3 and traffic.ok == traffic.sent, ("requests sent, served", traffic.sent, traffic.ok)
        st = wait_for(lambda: len((s := env.status("hot")).get("placement") or []) == 1 and s, SHRINK_BOUND_S,
                      "hot back on 1 pod once cool", on_timeout=env.log)
        assert st["placementReason"].startswith("1 pod: "), st["placementReason"]
        # The pods it left unregister it (a later pass than the one that placed it anew).
        wait_for(lambda: env.watcher.latest.get("hot") == set(st["placement"]), 30, "hot only on its 1 pod",
                 on_timeout=env.log)
        assert len(env.status("steady")["placement"]) == 1, "the other adapters stay as they were"
        assert not env.watcher.cold, f"cold on every pod at {len(env.watcher.cold)} reads: {env.watcher.cold[:3]}"


def test_a_move_onto_a_new_pod_is_make_before_break(env: Env):
    with env.steps("move"):
        c = env.cluster
        pods = [f"{BASE}-{i}" for i in range(3)]
        new = f"{BASE}-3"
        name = mover_name(pods, new)
        c.create(lora(name))
        st = wait_for(lambda: (s := env.status(name)).get("phase") == "Ready" and s, 60, f"{name} Ready",
                      on_timeout=env.log)
        (before,) = st["placement"]
        assert before != new
        env.watcher.start(name)
        reads = env.watcher.reads
        wait_for(lambda: env.watcher.reads >= reads + 3, 30, "the watcher reading", on_timeout=env.log)
        c.update_spec(API, "basemodeldeployments", NS, BASE, {"replicas": 4})
        env.kubelet.add_pod(new, IPS[3])
        env.kubelet.wait_ready(timeout=120)
        wait_for(lambda: (s := env.status(name)).get("placement") == [new] and s.get("phase") == "Ready", 60,
                 f"{name} moved to {new}", on_timeout=env.log)
        wait_for(lambda: env.watcher.latest.get(name) == {new}, 30, f"{name} gone from {before}", on_timeout=env.log)
        cold = [x for x in env.watcher.cold if x[1] == name]
        assert not cold, f"{name} cold on every pod during its move: {cold[:3]}"
        assert not env.watcher.cold, env.watcher.cold[:3]
        print(f"\nelastic: the listing watcher read every engine {env.watcher.reads} times; no adapter was "
              "ever cold on every pod")


def test_rbac_covers_every_request(env: Env):
    from .rbac import assert_chart_grants_operator_requests

    assert_chart_grants_operator_requests(env.cluster)
