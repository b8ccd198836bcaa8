"""Adapter revisions (issue 23), through kopf: the real operator against kmock, two real engine
processes as the pods (harness.py), requests sent to them as a gateway would.

- an update of spec.source makes revision 2 (status.revisions, latestRevision), loaded on both
  pods before any traffic moves to it: its first request on each pod loads nothing (warm);
- spec.traffic 80/20: 500 requests with distinct `user` values split within +-5 points (the
  x-loraplex-adapter-revision header), each user always on one revision, on either pod;
  `name@1` pins, an unknown revision is a 404;
- traffic back to 100/0: every new request goes to revision 1 once the pods hold the change,
  while a stream in flight across it completes on revision 2's weights (its tokens equal
  revision 2's greedy output, taken pinned beforehand);
- spec.rollout: a healthy canary is promoted through its steps while requests flow; a canary
  whose weights fail to load (a sha256 that does not match) rolls back with condition Rollout
  False CanaryFailedToLoad and a Warning Event; a canary made slow on purpose (the engines'
  --inject-delay on its revision, a rollout drill) rolls back with Rollout False CanaryTTFTRatio,
  the measured means in the message, and a Warning Event;
- the printer columns read the status, and the chart's RBAC covers every request made.
"""
from __future__ import annotations

import base64
import json
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .harness import FakeCluster, Kubelet, OperatorProcess, free_port, wait_for
from .test_integration import Steps, _engine_missing

pytestmark = pytest.mark.slow

_missing = _engine_missing()
if _missing:
    print(f"\nSKIP revisions integration tests: {_missing}")
    pytest.skip(_missing, allow_module_level=True)

NS, BASE, NAME = "revs", "tiny", "support"
API = "loraplex.dev/v1alpha1"
ADMIN_TOKEN = "admin-token-of-the-revision-engines"
IPS = ["127.0.0.2", "127.0.0.3"]
ENV = {
    "LORAPLEX_RESYNC_INTERVAL": "1",
    "LORAPLEX_POLL_INTERVAL": "0.2",
    "LORAPLEX_BACKOFF_BASE": "0.2",
    "LORAPLEX_BACKOFF_MAX": "1",
    "LORAPLEX_ENGINE_TIMEOUT": "10",
    "LORAPLEX_AUTOSCALE_INTERVAL": "0.5",  # the engines' metrics (the rollout's analysis) read this often
    "LORAPLEX_CATALOG_PORT": "0",
}
PROMPT = "the quick brown fox"
REV = "x-loraplex-adapter-revision"
# The slow canary's revision: the module's updates make revisions 1 to 4 before it (each test
# asserts its number), so the engines are started with its delay already in their args.
SLOW_REVISION, SLOW_DELAY = 5, 1.0


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from bench.tiny import make_tiny_adapter, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("revisions-tiny")
    base = make_tiny_checkpoint(root / "base", family="llama")
    for i, name in enumerate(("v1", "v2", "v3", "v4", "v5"), start=1):
        make_tiny_adapter(base, root / "adapters" / name, rank=4, seed=i, scale_b=2.0)
    return {"base": base, "adapters": root / "adapters"}


class Env:
    def __init__(self, cluster: FakeCluster, tmp, assets):
        self.cluster, self.tmp, self.assets = cluster, tmp, assets
        self.steps = Steps()
        self.port = free_port(IPS)
        self.operator = OperatorProcess(cluster.write_kubeconfig(tmp / "kubeconfig"), tmp / "operator.log",
                                        env=ENV).start()
        self.kubelet = Kubelet(cluster, NS, BASE, self.port, tmp / "pods")
        self.http = httpx.Client(timeout=60, trust_env=False)
        self.admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def lora(self) -> dict:
        return self.cluster.get(API, "loraadapters", NS, NAME) or {}

    def status(self) -> dict:
        return self.lora().get("status") or {}

    def condition(self, type_: str) -> dict:
        return next((c for c in self.status().get("conditions") or [] if c["type"] == type_), {})

    def events(self, reason: str) -> list[dict]:
        return [e for e in self.cluster.list("v1", "events", NS)
                if e["involvedObject"].get("name") == NAME and e["reason"] == reason]

    def pods(self):
        return [self.kubelet.pods[f"{BASE}-{i}"] for i in range(2)]

    def row(self, pod) -> dict:
        rows = self.http.get(pod.url("/v1/adapters?view=compact"), headers=self.admin).json()["data"]
        return next((r for r in rows if r["name"] == NAME), {})

    def split_on_pods(self) -> list[dict[int, tuple[int, str]]]:
        """Per pod: revision -> (percent, state), from its listing."""
        return [{r["number"]: (r["percent"], r["state"]) for r in self.row(p).get("revisions") or []}
                for p in self.pods()]

    def pods_hold(self, split: dict[int, int]) -> bool:
        digest = self.status().get("manifestDigest")
        return all(self.row(p).get("manifest_digest") == digest for p in self.pods()) and all(
            {n: pct for n, (pct, _) in s.items() if pct} == split for s in self.split_on_pods())

    def complete(self, pod, model: str, user: str | None = None, max_tokens: int = 1, **extra) -> httpx.Response:
        body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, **extra}
        if user is not None:
            body["user"] = user
        return self.http.post(pod.url("/v1/completions"), json=body)

    def loads(self, pod) -> float:
        text = self.http.get(pod.url("/metrics"), headers=self.admin).text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("loraplex_adapter_load_seconds_count"))

    def log(self) -> str:
        st = self.status()
        brief = {k: st.get(k) for k in ("phase", "latestRevision", "traffic", "rollout", "manifestDigest")}
        try:
            pods = self.split_on_pods()
        except Exception as e:  # noqa: BLE001 - diagnostics only
            pods = repr(e)
        return (f"status: {json.dumps(brief)}\nconditions: {st.get('conditions')}\npods: {pods}\n"
                f"--- operator ---\n{self.operator.log()[-6000:]}")


@pytest.fixture(scope="module")
def env(tmp_path_factory, assets):
    tmp = tmp_path_factory.mktemp("revisions")
    with FakeCluster() as cluster:
        e = Env(cluster, tmp, assets)
        try:
            yield e
        finally:
            e.operator.stop()
            e.kubelet.close()
            e.http.close()


class Load:
    """Completions for the adapter's name with fresh `user` values, spread over both pods (a
    thread), until stopped: the traffic a rollout analyses."""

    def __init__(self, env: Env, rate: float = 20):
        self.env, self.period = env, 1.0 / rate
        self.by_revision: dict[str, int] = {}
        self.statuses: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        http = httpx.Client(timeout=30, trust_env=False)
        i = 0
        try:
            while not self._stop.is_set():
                pod = self.env.pods()[i % 2]
                try:
                    r = http.post(pod.url("/v1/completions"), json={"model": NAME, "prompt": PROMPT, "max_tokens": 1,
                                                                    "user": f"load-{i}"})
                    self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1
                    rev = r.headers.get(REV, "?")
                    self.by_revision[rev] = self.by_revision.get(rev, 0) + 1
                except httpx.HTTPError:
                    pass
                i += 1
                self._stop.wait(self.period)
        finally:
            http.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def test_an_update_makes_revision_2_warm_before_any_traffic(env: Env):
    with env.steps("update"):
        c = env.cluster
        c.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "namespace": NS}})
        c.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "admin", "namespace": NS},
                  "data": {"token": base64.b64encode(ADMIN_TOKEN.encode()).decode()}})
        c.create({"apiVersion": API, "kind": "BaseModelDeployment", "metadata": {"name": BASE, "namespace": NS},
                  "spec": {"model": {"id": str(env.assets["base"]), "dtype": "float32"}, "replicas": 2,
                           "placement": {"replicas": "all"},
                           "engine": {"port": env.port, "maxLoraRank": 16, "maxActiveAdapters": 4,
                                      "adminTokenSecretRef": {"name": "admin"},
                                      "args": ["--adapter-dir", str(env.assets["adapters"]),
                                               "--num-kv-blocks", "256", "--log-level", "warning",
                                               "--inject-delay", f"{NAME}@{SLOW_REVISION}={SLOW_DELAY:g}"]}}})
        wait_for(lambda: c.get("apps/v1", "deployments", NS, BASE), 30, "the Deployment", on_timeout=env.log)
        for i in range(2):
            env.kubelet.add_pod(f"{BASE}-{i}", IPS[i])
        env.kubelet.wait_ready(timeout=120)
        c.create({"apiVersion": API, "kind": "LoraAdapter", "metadata": {"name": NAME, "namespace": NS},
                  "spec": {"baseModel": BASE, "source": {"type": "local", "uri": "v1"}}})
        st = wait_for(lambda: (s := env.status()).get("phase") == "Ready" and s.get("traffic") and s, 60,
                      "revision 1 Ready", on_timeout=env.log)
        assert st["latestRevision"] == 1 and [r["revision"] for r in st["revisions"]] == [1]
        assert st["traffic"] == [{"revision": 1, "percent": 100, "latestRevision": True}]
        wait_for(lambda: env.pods_hold({1: 100}), 30, "both pods serving revision 1", on_timeout=env.log)
        for pod in env.pods():  # load revision 1 everywhere (the loads counted below are revision 2's)
            assert env.complete(pod, NAME).headers[REV] == "1"

        # A new fine-tune: revision 2, at 20 % while 80 % stays on revision 1.
        c.update_spec(API, "loraadapters", NS, NAME, {
            "source": {"type": "local", "uri": "v2"},
            "traffic": [{"revision": 1, "percent": 80}, {"latestRevision": True, "percent": 20}]})
        loads = [env.loads(p) for p in env.pods()]
        st = wait_for(lambda: (s := env.status()).get("traffic") == [
            {"revision": 2, "percent": 20, "latestRevision": True}, {"revision": 1, "percent": 80}] and s, 60,
            "status.traffic 80/20", on_timeout=env.log)
        assert st["latestRevision"] == 2 and [r["revision"] for r in st["revisions"]] == [2, 1]
        r2 = st["revisions"][0]
        assert r2["source"] == {"type": "local", "uri": "v2"} and r2["manifestDigest"] and r2["createdAt"]
        wait_for(lambda: env.pods_hold({1: 80, 2: 20}), 30, "both pods splitting 80/20", on_timeout=env.log)
        for s in env.split_on_pods():
            assert s[2][1] in ("host", "device"), f"revision 2 was shifted to before it was loaded: {s}"
        wait_for(lambda: all(r["readyReplicas"] == 2 for r in env.status()["revisions"]), 30,
                 "status.revisions ready on both pods", on_timeout=env.log)
        # Loaded before the shift: its first requests on each pod load nothing more.
        assert [env.loads(p) for p in env.pods()] == [x + 1 for x in loads], "one load of revision 2 per pod"
        for pod in env.pods():
            r = env.complete(pod, f"{NAME}@2")
            assert r.status_code == 200 and r.headers[REV] == "2", r.text
        assert [env.loads(p) for p in env.pods()] == [x + 1 for x in loads], "the first request to revision 2 was cold"


def test_traffic_splits_sticky_by_user_and_pins(env: Env):
    with env.steps("split"):
        pods = env.pods()

        def one(i: int) -> tuple[str, str]:
            r = env.complete(pods[i % 2], NAME, user=f"user-{i}")
            assert r.status_code == 200, r.text
            return f"user-{i}", r.headers[REV]
        with ThreadPoolExecutor(8) as pool:
            first = dict(pool.map(one, range(500)))
        share = sum(1 for v in first.values() if v == "2") / len(first)
        assert 0.15 <= share <= 0.25, f"revision 2 got {share:.1%} of 500 users (20 % asked)"
        # Sticky: the same user again, on the other pod, lands on the same revision.
        for i in range(0, 500, 10):
            again = env.complete(pods[(i + 1) % 2], NAME, user=f"user-{i}").headers[REV]
            assert again == first[f"user-{i}"], (i, again, first[f"user-{i}"])
        sess = {env.http.post(p.url("/v1/completions"), headers={"x-session-id": "one-session"},
                              json={"model": NAME, "prompt": PROMPT, "max_tokens": 1}).headers[REV] for p in pods * 3}
        assert len(sess) == 1
        for pod in pods:
            assert env.complete(pod, f"{NAME}@1", user="user-0").headers[REV] == "1"
            r = env.complete(pod, f"{NAME}@9")
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
        env.first = first
        print(f"\nrevisions: 500 users split {1 - share:.1%} / {share:.1%} over revisions 1 / 2")


def test_rollback_to_100_0_is_immediate_and_a_stream_in_flight_keeps_its_revision(env: Env):
    with env.steps("rollback"):
        pod = env.pods()[0]
        user = next(u for u, rev in env.first.items() if rev == "2")
        params = {"max_tokens": 480, "ignore_eos": True}
        pinned = env.complete(pod, f"{NAME}@2", **params).json()["choices"][0]["text"]
        other = env.complete(pod, f"{NAME}@1", **params).json()["choices"][0]["text"]
        assert pinned != other, "the two revisions' weights give the same greedy output: the check would prove nothing"
        got: dict = {}

        def stream() -> None:
            body = {"model": NAME, "prompt": PROMPT, "temperature": 0, "user": user, "stream": True, **params}
            text = []
            with env.http.stream("POST", pod.url("/v1/completions"), json=body) as r:
                got["revision"] = r.headers.get(REV)
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        text.append(json.loads(line[6:])["choices"][0]["text"])
                        got.setdefault("first", time.monotonic())
            got["end"] = time.monotonic()
            got["text"] = "".join(text)
        t = threading.Thread(target=stream)
        t.start()
        wait_for(lambda: "first" in got, 30, "the stream's first token")
        env.cluster.update_spec(API, "loraadapters", NS, NAME, {"traffic": [{"revision": 1, "percent": 100}]})
        wait_for(lambda: env.pods_hold({1: 100}), 30, "both pods at 100/0", on_timeout=env.log)
        held = time.monotonic()
        # Every new request, whatever its user, goes to revision 1 at once.
        for i in range(0, 500, 5):
            assert env.complete(env.pods()[i % 2], NAME, user=f"user-{i}").headers[REV] == "1"
        t.join(120)
        assert got["revision"] == "2" and got["text"] == pinned, "the stream did not finish on revision 2's weights"
        print(f"\nrevisions: a {params['max_tokens']}-token stream on revision 2 ended "
              f"{got['end'] - held:+.2f} s after both pods held 100/0")
        assert got["end"] > held, "the stream ended before the change reached the pods: it proved nothing"
        assert env.status()["traffic"] == [{"revision": 1, "percent": 100}]
        assert env.events("TrafficShifted")


def test_a_rollout_promotes_a_healthy_canary_through_its_steps(env: Env):
    with env.steps("rollout"):
        c = env.cluster
        load = Load(env)
        try:
            live = env.lora()
            spec = dict(live["spec"])
            spec.pop("traffic", None)
            spec["source"] = {"type": "local", "uri": "v3"}
            spec["rollout"] = {"steps": [25, 100], "stepSeconds": 3, "maxErrorRatio": 1.5, "maxTTFTRatio": 10,
                               "minRequests": 5}
            gen = int(live["metadata"]["generation"]) + 1
            c.patch(API, "loraadapters", NS, NAME, {"metadata": {"generation": gen}, "spec": {"traffic": None}})
            c.patch(API, "loraadapters", NS, NAME, {"spec": spec})
            seen = set()

            def promoted():
                ro = env.status().get("rollout") or {}
                seen.add(ro.get("step"))
                return ro.get("phase") == "Succeeded" and ro
            ro = wait_for(promoted, 90, "the rollout promoted", on_timeout=env.log)
        finally:
            load.stop()
        assert ro["revision"] == 3 and env.status()["latestRevision"] == 3
        assert any(s and s.startswith("1/2") for s in seen), seen
        cond = env.condition("Rollout")
        assert (cond["status"], cond["reason"]) == ("True", "Promoted"), cond
        wait_for(lambda: env.pods_hold({3: 100}), 30, "both pods on revision 3", on_timeout=env.log)
        assert load.statuses.get(200, 0) >= 10 and set(load.statuses) == {200}, load.statuses
        assert "3" in load.by_revision and "1" in load.by_revision, load.by_revision
        print(f"\nrevisions: rollout to revision 3 promoted; requests by revision during it: {load.by_revision}")


def test_a_canary_that_fails_to_load_rolls_back(env: Env):
    with env.steps("failed canary"):
        load = Load(env, rate=5)
        try:
            env.cluster.update_spec(API, "loraadapters", NS, NAME, {
                "source": {"type": "local", "uri": "v4", "sha256": "0" * 64}})
            ro = wait_for(lambda: (r := env.status().get("rollout") or {}).get("phase") == "RolledBack" and r, 60,
                          "the rollout rolled back", on_timeout=env.log)
        finally:
            load.stop()
        assert ro["revision"] == 4 and ro["stableRevision"] == 3, ro
        cond = env.condition("Rollout")
        assert (cond["status"], cond["reason"]) == ("False", "CanaryFailedToLoad"), cond
        assert "sha256" in cond["message"], cond
        wait_for(lambda: [e for e in env.events("CanaryFailedToLoad") if e["type"] == "Warning"], 15,
                 "a Warning Event CanaryFailedToLoad", on_timeout=env.log)
        assert env.status()["traffic"] == [{"revision": 3, "percent": 100}]
        assert load.by_revision.get("4", 0) == 0 and set(load.statuses) == {200}, (load.by_revision, load.statuses)


def test_a_slow_canary_rolls_back_on_its_ttft(env: Env):
    with env.steps("slow canary"):
        # Two senders: a request on the slow canary holds its sender for SLOW_DELAY, and the step
        # needs minRequests on both revisions.
        loads = [Load(env), Load(env)]
        try:
            env.cluster.update_spec(API, "loraadapters", NS, NAME, {
                "source": {"type": "local", "uri": "v5", "sha256": None},  # the failed canary's sha256 goes
                "rollout": {"steps": [50, 100], "stepSeconds": 4, "maxErrorRatio": 1.5, "maxTTFTRatio": 3,
                            "minRequests": 3}})
            ro = wait_for(lambda: (r := env.status().get("rollout") or {}).get("revision") == SLOW_REVISION
                          and r.get("phase") == "RolledBack" and r, 90, "the slow canary rolled back",
                          on_timeout=env.log)
        finally:
            for load in loads:
                load.stop()
        assert ro["stableRevision"] == 3 and ro["step"] == "1/2 rolled back", ro
        cond = env.condition("Rollout")
        assert (cond["status"], cond["reason"]) == ("False", "CanaryTTFTRatio"), cond
        m = re.search(rf"revision {SLOW_REVISION} mean TTFT ([0-9.]+) s .*revision 3 ([0-9.]+) s", cond["message"])
        assert m and float(m[1]) >= SLOW_DELAY and float(m[1]) > 3 * float(m[2]), cond["message"]
        wait_for(lambda: [e for e in env.events("CanaryTTFTRatio") if e["type"] == "Warning"], 15,
                 "a Warning Event CanaryTTFTRatio", on_timeout=env.log)
        assert env.status()["traffic"] == [{"revision": 3, "percent": 100}]
        wait_for(lambda: env.pods_hold({3: 100}), 30, "both pods back on revision 3", on_timeout=env.log)
        for i in range(0, 40, 2):  # every session, the canary's included, is back on the stable revision
            assert env.complete(env.pods()[i % 2], NAME, user=f"load-{i}").headers[REV] == "3"
        by_revision = {k: sum(x.by_revision.get(k, 0) for x in loads) for k in ("3", "5")}
        statuses = set().union(*(x.statuses for x in loads))
        assert by_revision["5"] >= 3 and statuses == {200}, (by_revision, statuses)
        print(f"\nrevisions: slow canary rolled back: {cond['message']}")


def test_a_settled_adapter_writes_nothing(env: Env):
    """Level-triggered and idempotent: passes over an unchanged adapter write no status, post no Event."""
    with env.steps("settled"):
        time.sleep(3)  # the last transitions written
        since = len(env.cluster.requests())
        time.sleep(5)  # several passes (resync 1 s, autoscale timer 0.5 s)
        writes = [w for w in env.cluster.writes(since) if "/loraadapters/" in w or w.endswith("/events")]
        assert writes == [], writes


def test_printer_columns_read_the_status(env: Env):
    from .crd_tools import load_crd

    obj = env.lora()
    cols = {c["name"]: c["jsonPath"] for c in load_crd("loraadapters")["spec"]["versions"][0]["additionalPrinterColumns"]}

    def at(path: str):
        node = obj
        for part in path.strip(".").split("."):
            node = (node or {}).get(part) if isinstance(node, dict) else None
        return node
    assert at(cols["Revision"]) == SLOW_REVISION
    assert at(cols["Rollout"]) == obj["status"]["rollout"]["step"] and at(cols["Rollout"])
    assert at(cols["Traffic"]) == [{"revision": 3, "percent": 100}]


def test_rbac_covers_every_request(env: Env):
    from .rbac import assert_chart_grants_operator_requests

    assert_chart_grants_operator_requests(env.cluster)
