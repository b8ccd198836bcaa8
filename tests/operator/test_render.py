"""Rendering of the owned objects and the create-or-patch planning (pure functions)."""
from __future__ import annotations

import base64
import json

import pytest

from loraplex.manifest import AdapterManifest, parse_manifest_list
from loraplex.operator import apply, render
from loraplex.operator import constants as C


def bmd(spec: dict | None = None, name: str = "llama", ns: str = "team-a") -> dict:
    return {"apiVersion": C.API_VERSION, "kind": C.BMD_KIND,
            "metadata": {"name": name, "namespace": ns, "uid": "uid-1", "generation": 3},
            "spec": {"model": {"id": "meta-llama/Llama-3.1-8B"}, **(spec or {})}}


def test_engine_args_follow_the_engine_cli():
    spec = {"model": {"id": "org/m", "revision": "v2", "dtype": "bfloat16"},
            "engine": {"port": 9000, "maxActiveAdapters": 4, "maxCpuAdapters": 16, "maxLoraRank": 32,
                       "args": ["--max-num-seqs", "64"]}}
    args = render.engine_args(spec)
    pairs = dict(zip(args[::2], args[1::2]))
    assert pairs["--model-id"] == "org/m"
    assert pairs["--revision"] == "v2"
    assert pairs["--dtype"] == "bfloat16"
    assert pairs["--port"] == "9000" and pairs["--host"] == "0.0.0.0"
    assert pairs["--max-active-adapters"] == "4"
    assert pairs["--max-cpu-adapters"] == "16"
    assert pairs["--max-lora-rank"] == "32"
    assert pairs["--adapter-manifest-file"] == C.MANIFEST_PATH
    assert args[-2:] == ["--max-num-seqs", "64"], "user args come last, so they can override"


def test_engines_know_their_pod_name_and_their_warm_start_budget():
    """Warm start (issue 24): the engine asks the catalog which adapters are placed on its own pod
    (POD_NAME, from the downward API) and loads them for at most the budget before it is Ready."""
    dep = render.render_deployment(bmd({"engine": {"env": [{"name": "HF_TOKEN", "value": "x"}]}}), 1)
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}} \
        in c["env"]
    assert c["args"][c["args"].index("--warm-start-budget-seconds") + 1] == "60"
    off = render.engine_args({"model": {"id": "m"}, "warmStart": {"budgetSeconds": 0}})
    assert off[off.index("--warm-start-budget-seconds") + 1] == "0", "0 turns it off"
    own = render.render_deployment(bmd({"engine": {"env": [{"name": "POD_NAME", "value": "fixed"}]}}), 1)
    env = own["spec"]["template"]["spec"]["containers"][0]["env"]
    assert [e for e in env if e["name"] == "POD_NAME"] == [{"name": "POD_NAME", "value": "fixed"}], "the user's wins"


def test_engine_args_leave_out_unset_limits():
    args = render.engine_args({"model": {"id": "m"}})
    assert "--revision" not in args and "--max-lora-rank" not in args
    assert args[args.index("--dtype") + 1] == "auto"


def test_engines_get_their_bases_catalog_url():
    plain = render.render_deployment(bmd(), 1)
    assert "--adapter-catalog-url" not in plain["spec"]["template"]["spec"]["containers"][0]["args"]
    dep = render.render_deployment(bmd(), 1, "http://lp-loraplex.loraplex-system.svc:9091/")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--adapter-catalog-url") + 1] == \
        "http://lp-loraplex.loraplex-system.svc:9091/catalog/v1/team-a/llama"
    # It authenticates with the admin token the engine already mounts.
    assert args[args.index("--admin-token-file") + 1] == C.ADMIN_TOKEN_PATH


def test_deployment_shape():
    body = bmd({"engine": {"port": 8123, "resources": {"limits": {"nvidia.com/gpu": 1}},
                           "nodeSelector": {"gpu": "a100"}, "tolerations": [{"key": "gpu", "operator": "Exists"}],
                           "env": [{"name": "HF_TOKEN", "value": "x"}]}})
    dep = render.render_deployment(body, 2)
    assert dep["metadata"]["ownerReferences"] == [{
        "apiVersion": "loraplex.dev/v1alpha1", "kind": "BaseModelDeployment", "name": "llama", "uid": "uid-1",
        "controller": True, "blockOwnerDeletion": True}]
    spec = dep["spec"]
    assert spec["replicas"] == 2
    assert spec["selector"]["matchLabels"] == C.selector_labels("llama")
    labels = spec["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in C.selector_labels("llama").items())
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    assert c["name"] == C.ENGINE_CONTAINER and c["command"] == ["loraplex-engine"]
    assert c["ports"] == [{"name": "http", "containerPort": 8123, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    assert {"name": "HF_TOKEN", "value": "x"} in c["env"]
    assert pod["nodeSelector"] == {"gpu": "a100"} and pod["tolerations"][0]["key"] == "gpu"
    cm_vol = [v for v in pod["volumes"] if "configMap" in v][0]
    assert cm_vol["configMap"]["name"] == "llama-adapters"
    mount = [m for m in c["volumeMounts"] if m["name"] == cm_vol["name"]][0]
    assert C.MANIFEST_PATH.startswith(mount["mountPath"] + "/")


def test_deployment_replicas_and_autoscaling_bounds():
    assert render.deployment_replicas({"replicas": 3}, observed=7) == 3
    auto = {"replicas": 1, "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 5}}
    assert render.deployment_replicas(auto, observed=None) == 2
    assert render.deployment_replicas(auto, observed=4) == 4
    assert render.deployment_replicas(auto, observed=9) == 5
    zero = {"replicas": 1, "autoscaling": {"enabled": True, "minReplicas": 0, "maxReplicas": 5}}
    assert render.deployment_replicas(zero, observed=0) == 1, "nothing holds requests: at least 1"
    assert render.deployment_replicas(zero, observed=0, floor=0) == 0, "KEDA's interceptor holds them"
    assert "replicas" not in render.render_deployment(bmd(auto), None)["spec"]


def test_service_and_endpoint():
    svc = render.render_service(bmd({"service": {"type": "LoadBalancer", "port": 8000}}))
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    assert svc["spec"]["selector"] == C.selector_labels("llama")
    assert render.endpoint(bmd({"service": {"port": 8000}})) == "http://llama.team-a.svc:8000"
    assert render.endpoint(bmd()) == "http://llama.team-a.svc"


def test_ingress():
    assert render.render_ingress(bmd()) is None
    ing = render.render_ingress(bmd({"ingress": {"enabled": True, "host": "llm.example.com", "className": "nginx",
                                                 "tls": {"secretName": "tls"}}}))
    assert ing["spec"]["ingressClassName"] == "nginx"
    rule = ing["spec"]["rules"][0]
    assert rule["host"] == "llm.example.com"
    assert rule["http"]["paths"][0]["backend"]["service"] == {"name": "llama", "port": {"number": 80}}
    assert ing["spec"]["tls"] == [{"hosts": ["llm.example.com"], "secretName": "tls"}]
    assert render.endpoint(bmd({"ingress": {"enabled": True, "host": "llm.example.com",
                                            "tls": {"secretName": "tls"}}})) == "https://llm.example.com"
    with pytest.raises(ValueError, match="host"):
        render.render_ingress(bmd({"ingress": {"enabled": True}}))
    # Scaled to zero through KEDA: the Ingress goes to the interceptor's Service instead.
    via = render.render_ingress(bmd({"ingress": {"enabled": True, "host": "llm.example.com"}}), ("llama-wake", 8080))
    assert via["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"] == \
        {"name": "llama-wake", "port": {"number": 8080}}
    assert render.endpoint(bmd(), ("llama-wake", 8080)) == "http://llama-wake.team-a.svc:8080"


def test_configmap_holds_the_canonical_manifest_list():
    ms = [AdapterManifest(name="b", source="hub", uri="org/b"), AdapterManifest(name="a", uri="/x")]
    cm = render.render_configmap(bmd(), ms)
    assert cm["metadata"]["name"] == "llama-adapters"
    text = cm["data"][C.MANIFEST_KEY]
    assert [m.name for m in parse_manifest_list(text)] == ["a", "b"]
    assert text == render.render_configmap(bmd(), list(reversed(ms)))["data"][C.MANIFEST_KEY]


# --- apply planning ----------------------------------------------------------------------------

def test_plan_create_then_unchanged_with_server_defaults():
    desired = render.render_service(bmd())
    action, body = apply.plan(None, desired)
    assert action == "create" and C.ANN_LAST_APPLIED in body["metadata"]["annotations"]
    live = json.loads(json.dumps(body))
    live["spec"]["clusterIP"] = "10.0.0.7"          # server-side defaults and extra fields
    live["metadata"]["resourceVersion"] = "42"
    assert apply.plan(live, desired) == ("unchanged", None)


def test_plan_patch_on_change_and_nulls_dropped_keys():
    before = render.render_deployment(bmd({"engine": {"nodeSelector": {"gpu": "a100"}}}), 1)
    _, live = apply.plan(None, before)
    after = render.render_deployment(bmd({"engine": {"image": "ghcr.io/loraplex/img:2"}}), 1)
    action, patch = apply.plan(live, after)
    assert action == "patch"
    pod = patch["spec"]["template"]["spec"]
    assert pod["nodeSelector"] is None, "a key the operator set and no longer wants is removed"
    assert pod["containers"][0]["image"] == "ghcr.io/loraplex/img:2"
    assert "name" not in patch["metadata"] and "namespace" not in patch["metadata"]


def test_plan_repairs_drift():
    desired = render.render_service(bmd())
    _, live = apply.plan(None, desired)
    live["spec"]["selector"] = {"app": "something-else"}
    action, patch = apply.plan(live, desired)
    assert action == "patch" and patch["spec"]["selector"] == C.selector_labels("llama")


def test_plan_ignores_quantity_normalisation_but_not_changes():
    desired = render.render_deployment(bmd({"engine": {"resources": {"limits": {"cpu": "1000m"}}}}), 1)
    _, live = apply.plan(None, desired)
    live["spec"]["template"]["spec"]["containers"][0]["resources"] = {"limits": {"cpu": "1"}}
    assert apply.plan(live, desired)[0] == "unchanged"
    changed = render.render_deployment(bmd({"engine": {"resources": {"limits": {"cpu": "2"}}}}), 1)
    assert apply.plan(live, changed)[0] == "patch", "the last-applied record catches it"


def test_plan_keeps_replicas_owned_by_the_autoscaler():
    spec = {"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 9}}
    first = render.render_deployment(bmd({"replicas": 2}), 2)   # autoscaling was off
    _, live = apply.plan(None, first)
    live["spec"]["replicas"] = 6                                 # the autoscaler moved it
    desired = render.render_deployment(bmd(spec), None)
    action, patch = apply.plan(live, desired, keep=frozenset({("spec", "replicas")}))
    assert action == "patch" and "replicas" not in patch["spec"]
    action, body = apply.plan(None, desired, on_create={"spec": {"replicas": 3}})
    assert action == "create" and body["spec"]["replicas"] == 3


def test_defaults_are_idempotent():
    spec = render.with_defaults({"model": {"id": "m"}, "autoscaling": {"enabled": True}})
    assert spec["autoscaling"]["enabled"] is True and spec["autoscaling"]["maxReplicas"] == 4
    assert render.with_defaults(spec) == spec


def test_admin_token_is_mounted_and_passed():
    dep = render.render_deployment(bmd({"engine": {"adminTokenSecretRef": {"name": "engine-admin"}}}), 1)
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"][c["args"].index("--admin-token-file") + 1] == C.ADMIN_TOKEN_PATH
    vol = [v for v in pod["volumes"] if v["name"] == "admin-token"][0]
    assert vol["secret"] == {"secretName": "engine-admin", "items": [{"key": "token", "path": "token"}]}
    mount = [m for m in c["volumeMounts"] if m["name"] == "admin-token"][0]
    assert C.ADMIN_TOKEN_PATH == mount["mountPath"] + "/token" and mount["readOnly"]
    # Secure by default: without a named Secret, the operator's own one (created by it).
    dflt = render.render_deployment(bmd(), 1)["spec"]["template"]["spec"]
    assert "--admin-token-file" in dflt["containers"][0]["args"]
    vol = [v for v in dflt["volumes"] if v["name"] == "admin-token"][0]
    assert vol["secret"]["secretName"] == "llama-admin-token"
    secret = render.render_admin_secret(bmd(), "t0k3n")
    assert secret["metadata"]["name"] == "llama-admin-token" and secret["metadata"]["ownerReferences"]
    assert base64.b64decode(secret["data"]["token"]) == b"t0k3n"


def test_inference_pool_v1():
    pool = render.render_inference_pool(bmd({"engine": {"port": 9000}}))
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1" and pool["kind"] == "InferencePool"
    assert pool["spec"] == {
        "selector": {"matchLabels": C.selector_labels("llama")},
        "targetPorts": [{"number": 9000}],
        "endpointPickerRef": {"kind": "Service", "name": "llama-epp", "port": {"number": 9002}},
    }
    assert pool["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    custom = render.render_inference_pool(bmd({"inferencePool": {"endpointPickerRef": {
        "name": "shared-epp", "port": 9100, "failureMode": "FailOpen"}}}))
    assert custom["spec"]["endpointPickerRef"] == {"kind": "Service", "name": "shared-epp",
                                                   "port": {"number": 9100}, "failureMode": "FailOpen"}
    assert render.render_inference_pool(bmd({"inferencePool": {"enabled": False}})) is None


def test_cli_passes_flags_through_to_kopf_run():
    from loraplex.operator.cli import HANDLERS, kopf_argv

    assert kopf_argv(["-A", "--standalone", "--verbose"]) == ["run", "-m", HANDLERS, "-A", "--standalone", "--verbose"]
    assert kopf_argv(["run", "--namespace", "team-a"]) == ["run", "-m", HANDLERS, "--namespace", "team-a"]
    assert kopf_argv(["--help"]) == ["run", "--help"]
    assert HANDLERS == "loraplex.operator.handlers"


def test_tensor_parallel_pods_get_the_flag_and_a_shared_memory_volume():
    one = render.render_deployment(bmd({"engine": {"tensorParallelSize": 1}}), 1)
    pod = one["spec"]["template"]["spec"]
    assert "--tensor-parallel-size" in pod["containers"][0]["args"]
    assert not any(v["name"] == "dshm" for v in pod["volumes"]), "one rank needs no NCCL shared memory"

    two = render.render_deployment(bmd({"engine": {"tensorParallelSize": 2,
                                                   "resources": {"limits": {"nvidia.com/gpu": 2}}}}), 1)
    pod = two["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": C.TP_SHM_SIZE}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]


# --- the engine pod policy (issue 20, finding 8; podpolicy.py) ---------------------------------

@pytest.mark.parametrize("volume", [
    {"name": "v", "hostPath": {"path": "/var/run/docker.sock"}},
    {"name": "v", "nfs": {"server": "10.0.0.1", "path": "/"}},
    {"name": "v", "csi": {"driver": "any.csi.example.com"}},
    {"name": "v", "projected": {"sources": [{"serviceAccountToken": {"path": "t"}}]}},
    {"name": "v", "iscsi": {"targetPortal": "10.0.0.1", "iqn": "iqn.x", "lun": 0}},
    {"name": "v"},  # no type at all
])
def test_a_volume_outside_the_allow_list_is_refused(volume):
    from loraplex.operator.podpolicy import PolicyViolation

    with pytest.raises(PolicyViolation, match=r"spec.engine.volumes\[1\] \('v'\): volume type .* is not allowed"):
        render.render_deployment(bmd({"engine": {"volumes": [{"name": "ok", "emptyDir": {}}, volume]}}), 1)


@pytest.mark.parametrize("kind", [{"configMap": {"name": "c"}}, {"secret": {"secretName": "s"}}, {"emptyDir": {}},
                                  {"persistentVolumeClaim": {"claimName": "p"}}, {"downwardAPI": {"items": []}},
                                  {"ephemeral": {"volumeClaimTemplate": {"spec": {}}}}])
def test_volumes_of_the_allow_list_are_rendered(kind):
    pod = render.render_deployment(bmd({"engine": {"volumes": [{"name": "v", **kind}]}}), 1)["spec"]["template"]["spec"]
    assert {"name": "v", **kind} in pod["volumes"]


@pytest.mark.parametrize("image, prefixes, allowed", [
    ("ghcr.io/loraplex/loraplex-engine:0.1.0", ("ghcr.io/loraplex/",), True),
    ("ghcr.io/loraplex/loraplex-engine-demo@sha256:" + "a" * 64, ("ghcr.io/loraplex/",), True),
    ("ghcr.io/loraplex-evil/loraplex-engine:0.1.0", ("ghcr.io/loraplex/",), False),
    ("ghcr.io/loraplex", ("ghcr.io/loraplex/",), False),
    ("docker.io/library/ubuntu:24.04", ("ghcr.io/loraplex/",), False),
    ("registry.example.com/ml/engine:2", ("registry.example.com/ml/engine",), True),   # a repository: any tag
    ("registry.example.com/ml/engine-evil:2", ("registry.example.com/ml/engine",), False),
    ("registry.example.com/ml/engine/sub:2", ("registry.example.com/ml/engine",), False),
    ("anything:1", ("*",), True),
    ("ghcr.io/loraplex/loraplex-engine:0.1.0", (), False),
])
def test_engine_image_allow_list(image, prefixes, allowed):
    from loraplex.operator.podpolicy import PolicyViolation

    body = bmd({"engine": {"image": image}})
    if allowed:
        assert render.render_deployment(body, 1, None, prefixes)["spec"]["template"]["spec"]["containers"][0][
            "image"] == image
    else:
        with pytest.raises(PolicyViolation, match="not from an allowed registry or repository"):
            render.render_deployment(body, 1, None, prefixes)


def test_engine_image_prefixes_come_from_the_environment(monkeypatch):
    from loraplex.operator.config import DEFAULT_ENGINE_IMAGE_PREFIXES, engine_image_prefixes_from_env

    monkeypatch.delenv("LORAPLEX_ENGINE_IMAGE_PREFIXES", raising=False)
    assert engine_image_prefixes_from_env() == DEFAULT_ENGINE_IMAGE_PREFIXES == ("ghcr.io/loraplex/",)
    assert C.DEFAULT_ENGINE_IMAGE.startswith(DEFAULT_ENGINE_IMAGE_PREFIXES[0]), "the default image is allowed"
    monkeypatch.setenv("LORAPLEX_ENGINE_IMAGE_PREFIXES", " mirror.example.com/loraplex/ ,ghcr.io/loraplex/,")
    assert engine_image_prefixes_from_env() == ("mirror.example.com/loraplex/", "ghcr.io/loraplex/")


def test_adapter_downloads_have_a_disk_budget_and_a_matching_size_limit():
    """The disk tier had no default --adapter-disk-bytes and its emptyDir no sizeLimit: tenants'
    Hub/S3 adapters could fill the node's disk. Now 10 GiB by default (spec.engine.adapterDiskBytes),
    and the emptyDir's sizeLimit is that plus a quarter (a download lands before the LRU eviction)."""
    for spec, budget, limit in (({}, 10 * 2**30, "12800Mi"), ({"engine": {"adapterDiskBytes": 2**30}}, 2**30, "1280Mi")):
        pod = render.render_deployment(bmd(spec), 1)["spec"]["template"]["spec"]
        args = pod["containers"][0]["args"]
        assert args[args.index("--adapter-disk-bytes") + 1] == str(budget)
        assert args[args.index("--adapter-cache-dir") + 1] == C.ADAPTER_CACHE_DIR
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == C.ADAPTER_CACHE_DIR)
        assert {"name": mount["name"], "emptyDir": {"sizeLimit": limit}} in pod["volumes"]
