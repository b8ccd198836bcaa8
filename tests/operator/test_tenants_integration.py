"""Tenants through the real operator (`loraplex-operator`, kopf) against kmock over HTTP, no engine
needed: spec.tenants rendered into the Secret `<base>-api-keys` (salted hashes only, limits divided
over the ready engine pods), the engine Deployment's flag and mount, the re-division when pods
become ready, a broken ref (condition, Event, the old keys kept), and what was written validated
against the Kubernetes schemas and the chart's RBAC. kmock enforces no CRD schema: the CRD's
validation of tenants is tested in test_crds.py (OpenAPI, list-map keys and CEL, re-done)."""
from __future__ import annotations

import base64
import json
import time

import pytest

from loraplex.manifest import salted_key_hash
from loraplex.operator.adapters import tenant_salt

from .harness import FakeCluster, free_port, operator_cluster, pod_from_deployment, pod_status, wait_for

pytestmark = pytest.mark.slow

NS, BASE, PLAIN = "team-t", "shared", "plain"
API = "loraplex.dev/v1alpha1"
ENV = {
    "LORAPLEX_RESYNC_INTERVAL": "1",  # also the Secret cache's lifetime: a fixed ref is seen within 1 s
    "LORAPLEX_POLL_INTERVAL": "0.2",
    "LORAPLEX_BACKOFF_BASE": "0.2",
    "LORAPLEX_BACKOFF_MAX": "0.5",
    "LORAPLEX_ENGINE_CONNECT_TIMEOUT": "0.3",
    "LORAPLEX_ENGINE_TIMEOUT": "0.5",
}
KEYS = {"acme": ["sk-acme-0123456789abcdef", "sk-acme-fedcba9876543210"], "globex": ["sk-globex-00112233445566"]}
TENANTS = [
    {"name": "acme", "apiKeySecretRefs": [{"name": "acme-keys"}], "weight": 2,
     "limits": {"requestsPerMinute": 600, "tokensPerMinute": 200000, "maxConcurrent": 16}},
    {"name": "globex", "apiKeySecretRefs": [{"name": "globex-keys", "key": "primary"}],
     "limits": {"requestsPerMinute": 100}},
]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def key_secret(name: str, data: dict[str, str]) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS},
            "data": {k: b64(v) for k, v in data.items()}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with operator_cluster(tmp_path_factory.mktemp("operator-tenants"), ENV) as c:
        yield c


def keys_file(c: FakeCluster) -> dict | None:
    sec = c.get("v1", "secrets", NS, f"{BASE}-api-keys")
    return json.loads(base64.b64decode(sec["data"]["api-keys.json"])) if sec else None


def cond(c: FakeCluster, name: str, type_: str) -> dict:
    st = ((c.get(API, "basemodeldeployments", NS, name) or {}).get("status")) or {}
    return next((x for x in st.get("conditions", []) if x["type"] == type_), {})


def events(c: FakeCluster, reason: str) -> list[dict]:
    return [e for e in c.list("v1", "events", NS) if e["reason"] == reason
            and e["involvedObject"].get("kind") == "BaseModelDeployment" and e["involvedObject"]["name"] == BASE]


def set_ready(c: FakeCluster, pod: str, ready: bool) -> None:
    c.patch("v1", "pods", NS, pod, {"status": pod_status("127.0.0.1", ready)}, sub="status")


def test_tenants_render_rescale_survive_a_broken_ref_and_validate(cluster: FakeCluster):
    c = cluster
    log = c.operator.log  # type: ignore[attr-defined]
    h = lambda key: salted_key_hash(key, tenant_salt(NS, BASE))  # noqa: E731
    c.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "namespace": NS}})
    c.create(key_secret("acme-keys", {"a": KEYS["acme"][0], "b": KEYS["acme"][1]}))
    c.create(key_secret("globex-keys", {"primary": KEYS["globex"][0], "unused": "sk-not-a-globex-key"}))
    port = free_port(["127.0.0.1"])  # no engine listens: the pods are Ready for Kubernetes only
    for name, extra in ((BASE, {"tenants": TENANTS}), (PLAIN, {})):
        c.create({"apiVersion": API, "kind": "BaseModelDeployment", "metadata": {"name": name, "namespace": NS},
                  "spec": {"model": {"id": "org/model"}, "engine": {"port": port}, **extra}})

    # 1. Declared, rendered: salted hashes only, no ready pod yet (the whole limit per pod).
    file = wait_for(lambda: keys_file(c), 30, "the API keys Secret", on_timeout=log)
    assert file == {
        "acme": {"keys": sorted(h(k) for k in KEYS["acme"]), "weight": 2,
                 "limits": {"requests_per_minute": 600, "tokens_per_minute": 200000, "max_concurrent": 16}},
        "globex": {"keys": [h(KEYS["globex"][0])], "limits": {"requests_per_minute": 100}}}
    secret = c.get("v1", "secrets", NS, f"{BASE}-api-keys")
    raw = json.dumps(secret) + base64.b64decode(secret["data"]["api-keys.json"]).decode()
    assert not [k for ks in KEYS.values() for k in ks if k in raw], "never a raw key in the rendered Secret"
    owner = c.get(API, "basemodeldeployments", NS, BASE)["metadata"]["uid"]
    assert [(o["kind"], o["uid"], o["controller"]) for o in secret["metadata"]["ownerReferences"]] == \
        [("BaseModelDeployment", owner, True)]
    dep = wait_for(lambda: c.get("apps/v1", "deployments", NS, BASE), 20, "the Deployment", on_timeout=log)
    pod = dep["spec"]["template"]["spec"]
    (engine,) = pod["containers"]
    assert engine["args"][engine["args"].index("--api-keys-file") + 1] == "/etc/loraplex/tenants/api-keys.json"
    assert {"name": "api-keys", "secret": {"secretName": f"{BASE}-api-keys", "items": [
        {"key": "api-keys.json", "path": "api-keys.json"}]}} in pod["volumes"]
    assert {"name": "api-keys", "mountPath": "/etc/loraplex/tenants", "readOnly": True} in engine["volumeMounts"]
    ready = wait_for(lambda: cond(c, BASE, "TenantsReady").get("status") == "True" and cond(c, BASE, "TenantsReady"),
                     20, "TenantsReady", on_timeout=log)
    assert ready["reason"] == "Rendered" and "2 tenant(s)" in ready["message"]
    # Without tenants nothing changes: no Secret, no flag, no condition.
    plain = wait_for(lambda: c.get("apps/v1", "deployments", NS, PLAIN), 20, "the plain Deployment", on_timeout=log)
    assert "--api-keys-file" not in plain["spec"]["template"]["spec"]["containers"][0]["args"]
    assert c.get("v1", "secrets", NS, f"{PLAIN}-api-keys") is None and cond(c, PLAIN, "TenantsReady") == {}

    # 2. One ready pod, then three: the limits are divided again, level-triggered.
    for i in range(3):
        c.create(pod_from_deployment(dep, f"{BASE}-{i}", "127.0.0.1", ready=i == 0))
    wait_for(lambda: "1 ready" in cond(c, BASE, "TenantsReady").get("message", ""), 20, "one ready pod", on_timeout=log)
    assert keys_file(c)["acme"]["limits"]["requests_per_minute"] == 600
    set_ready(c, f"{BASE}-1", True)
    set_ready(c, f"{BASE}-2", True)
    want = {"requests_per_minute": 200, "tokens_per_minute": 66667, "max_concurrent": 6}
    wait_for(lambda: keys_file(c)["acme"]["limits"] == want, 20, "limits divided by 3", on_timeout=log)
    assert keys_file(c)["globex"]["limits"] == {"requests_per_minute": 34}
    assert c.get("v1", "secrets", NS, f"{BASE}-api-keys")["metadata"]["annotations"][
        "loraplex.dev/tenant-limits-divisor"] == "3"
    secret_writes = lambda: [w for w in c.writes() if w.endswith(f"/secrets/{BASE}-api-keys")]  # noqa: E731
    settled = secret_writes()
    assert [e for e in events(c, "Updated") if f"Secret {BASE}-api-keys" in e["message"]]
    time.sleep(2.5)  # two resync intervals: the same inputs write nothing
    assert secret_writes() == settled and len(settled) == 1, settled  # 0 and 1 ready: the same file

    # 3. A broken ref: globex's Secret deleted. Condition and Warning Event; globex keeps its keys,
    #    and the rest keeps reconciling (a pod leaving re-divides the limits of both).
    before = keys_file(c)
    c.delete("v1", "secrets", NS, "globex-keys")
    broken = wait_for(lambda: cond(c, BASE, "TenantsReady").get("status") == "False" and cond(c, BASE, "TenantsReady"),
                      20, "TenantsReady=False", on_timeout=log)
    assert broken["reason"] == "SecretNotFound" and "'globex'" in broken["message"], broken
    assert "Kept their previous keys: globex" in broken["message"]
    (warning,) = wait_for(lambda: events(c, "SecretNotFound"), 10, "a Warning Event", on_timeout=log)
    assert warning["type"] == "Warning" and "globex" in warning["message"]
    assert keys_file(c) == before, "the previous file is kept, not emptied"
    set_ready(c, f"{BASE}-2", False)
    wait_for(lambda: keys_file(c)["acme"]["limits"]["requests_per_minute"] == 300, 20, "re-divided by 2",
             on_timeout=log)
    assert keys_file(c)["globex"] == {"keys": [h(KEYS["globex"][0])], "limits": {"requests_per_minute": 50}}
    # Fixed (a rotated key): rendered from the Secret again, and a Normal Event says so.
    c.create(key_secret("globex-keys", {"primary": "sk-globex-rotated-998877"}))
    wait_for(lambda: cond(c, BASE, "TenantsReady").get("status") == "True", 20, "TenantsReady again", on_timeout=log)
    assert keys_file(c)["globex"]["keys"] == [h("sk-globex-rotated-998877")]
    wait_for(lambda: events(c, "TenantsReady"), 10, "a Normal Event", on_timeout=log)

    # 4. What the operator wrote validates against the Kubernetes schemas, and the chart's RBAC
    #    grants every request it made (the Secret's patches included).
    from .rbac import assert_chart_grants_operator_requests
    from .test_deploy_files import schema_errors

    written = [c.get("v1", "secrets", NS, f"{BASE}-api-keys"), c.get("apps/v1", "deployments", NS, BASE)]
    for body in written:
        body.pop("status", None)
    assert not schema_errors(written), schema_errors(written)
    assert_chart_grants_operator_requests(c)

    # 5. Tenants removed: the engines run without --api-keys-file again.
    c.update_spec(API, "basemodeldeployments", NS, BASE, {"tenants": None})
    wait_for(lambda: "--api-keys-file" not in c.get("apps/v1", "deployments", NS, BASE)["spec"]["template"]["spec"]
             ["containers"][0]["args"], 20, "the flag gone", on_timeout=log)
    wait_for(lambda: cond(c, BASE, "TenantsReady") == {}, 20, "the condition gone", on_timeout=log)
