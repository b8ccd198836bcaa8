"""The CRDs: structure, defaults, OpenAPI validation (jsonschema) and CEL rules (cel-python),
against good and bad objects."""
from __future__ import annotations

import copy
import subprocess

import pytest
import yaml

from loraplex.operator import render

from .crd_tools import CRD_DIR, REPO, admit, apply_defaults, cel_rules, load_crd, schema_of

BMD = "basemodeldeployments"
LORA = "loraadapters"


def bmd(spec: dict | None = None, name: str = "llama") -> dict:
    return {"apiVersion": "loraplex.dev/v1alpha1", "kind": "BaseModelDeployment",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"model": {"id": "meta-llama/Llama-3.1-8B"}, **(spec or {})}}


def tenant(**fields) -> dict:
    return {"name": "acme", "apiKeySecretRefs": [{"name": "acme-keys"}], **fields}


def revised(spec: dict | None = None, latest: int = 4) -> dict:
    """A LoraAdapter whose status says `latest` revisions were made."""
    return {**lora(spec), "status": {"latestRevision": latest}}


def lora(spec: dict | None = None, name: str = "support-acme") -> dict:
    base = {"baseModel": "llama", "source": {"type": "hub", "uri": "acme/support-lora"}}
    base.update(spec or {})
    return {"apiVersion": "loraplex.dev/v1alpha1", "kind": "LoraAdapter",
            "metadata": {"name": name, "namespace": "default"}, "spec": base}


# --- structure ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, kind, short", [(BMD, "BaseModelDeployment", "bmd"), (LORA, "LoraAdapter", "lora")])
def test_crd_basics(name, kind, short):
    crd = load_crd(name)
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == f"{name}.loraplex.dev"
    spec = crd["spec"]
    assert (spec["group"], spec["scope"], spec["names"]["kind"]) == ("loraplex.dev", "Namespaced", kind)
    assert short in spec["names"]["shortNames"]
    (v,) = spec["versions"]
    assert v["name"] == "v1alpha1" and v["served"] and v["storage"]
    assert "status" in v["subresources"]
    cols = {c["name"].lower(): c["jsonPath"] for c in v["additionalPrinterColumns"]}
    assert {"phase", "ready", "age"} <= set(cols)
    schema = schema_of(crd)
    assert "x-kubernetes-preserve-unknown-fields" in schema["properties"]["status"]["properties"]["kopf"], \
        "kopf keeps its progress in status.kopf: the schema must not prune it"
    for col, path in cols.items():  # every printer column points at a field of the schema
        if path.startswith(".metadata"):
            continue
        node = schema
        for part in path.strip(".").split("."):
            node = node["properties"][part]


def test_bmd_scale_subresource_and_adapter_column():
    (v,) = load_crd(BMD)["spec"]["versions"]
    assert v["subresources"]["scale"] == {"specReplicasPath": ".spec.replicas",
                                          "statusReplicasPath": ".status.replicas",
                                          "labelSelectorPath": ".status.selector"}
    assert any(c["name"] == "Adapters" for c in v["additionalPrinterColumns"])


def _structural(schema: dict, path: str = "") -> list[str]:
    """Kubernetes' structural-schema rule: every node has a type, unless it preserves unknown
    fields (then only `type: object` is required at that node)."""
    problems = []
    if "type" not in schema and not schema.get("x-kubernetes-int-or-string"):
        problems.append(path or "<root>")
    for k, sub in (schema.get("properties") or {}).items():
        problems += _structural(sub, f"{path}.{k}")
    if isinstance(schema.get("items"), dict):
        problems += _structural(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        problems += _structural(schema["additionalProperties"], f"{path}{{}}")
    return problems


@pytest.mark.parametrize("name", [BMD, LORA])
def test_schemas_are_structural(name):
    assert _structural(schema_of(load_crd(name))) == []


def test_crd_defaults_match_the_operators_defaults():
    """The operator applies the same defaults in code (render.BMD_DEFAULTS) for objects an API
    server did not default; the two must never drift apart."""
    defaulted = apply_defaults(bmd(), schema_of(load_crd(BMD)))["spec"]
    def pick(d: dict, like: dict) -> dict:
        return {k: pick(d[k], v) if isinstance(v, dict) else d.get(k) for k, v in like.items()}
    assert pick(defaulted, render.BMD_DEFAULTS) == render.BMD_DEFAULTS


def test_chart_carries_identical_crds():
    for f in CRD_DIR.glob("*.yaml"):
        if f.name == "kustomization.yaml":
            continue
        assert (REPO / "charts/loraplex/crds" / f.name).read_bytes() == f.read_bytes(), f.name


# --- good objects ------------------------------------------------------------------------------

def _examples() -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(REPO / "manifests/overlays/production")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d and d["apiVersion"].startswith("loraplex.dev/")]


def test_example_manifests_are_admitted():
    docs = _examples()
    assert {d["kind"] for d in docs} == {"BaseModelDeployment", "LoraAdapter"}
    for d in docs:
        _, errors = admit(BMD if d["kind"] == "BaseModelDeployment" else LORA, d)
        assert errors == [], (d["metadata"]["name"], errors)


@pytest.mark.parametrize("obj", [
    bmd(),
    bmd({"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 2}}),
    bmd({"autoscaling": {"enabled": True, "metric": "kv_cache_usage_ratio", "target": 0.8}}),
    bmd({"ingress": {"enabled": True, "host": "llm.example.com"}}),
    bmd({"engine": {"resources": {"limits": {"nvidia.com/gpu": 1}}, "maxLoraRank": 64}}),
    bmd({"tenants": [{"name": "acme", "apiKeySecretRefs": [{"name": "acme-keys"}, {"name": "more", "key": "k"}],
                      "weight": 2, "limits": {"requestsPerMinute": 600, "tokensPerMinute": 200000,
                                              "maxConcurrent": 16}},
                     {"name": "globex", "apiKeySecretRefs": [{"name": "globex-keys"}]}]}),
    bmd({"tenants": []}),
    bmd({"autoscaling": {"enabled": True, "minReplicas": 0, "maxReplicas": 3,
                         "scaleToZero": {"targetConcurrency": 4, "interceptor": {"namespace": "keda-system"}}}}),
    bmd({"placement": {"replicas": "auto", "min": 2, "max": 6, "targetRequestsPerPod": 0.5},
         "warmStart": {"budgetSeconds": 0}}),
], ids=["minimal", "min-eq-max", "kv-ratio", "ingress", "gpu", "tenants", "no-tenants", "scale-to-zero",
        "auto-placement"])
def test_good_bmds(obj):
    defaulted, errors = admit(BMD, obj)
    assert errors == []
    assert defaulted["spec"]["autoscaling"]["scaleDownStabilizationSeconds"] == 300


@pytest.mark.parametrize("obj", [
    lora(),
    lora({"source": {"type": "s3", "uri": "s3://bucket/prefix/a"}}),
    lora({"source": {"type": "local", "uri": "/adapters/a"}}),
    lora({"source": {"type": "hub", "uri": "org/name", "revision": "v2", "sha256": "a" * 64,
                     "configSha256": "b" * 64}, "rank": 8}),
    lora({"source": {"type": "hub", "uri": "org/name", "revision": "refs/pr/1"}}),
    lora({"source": {"type": "s3", "uri": "s3://bucket/prefix/a/"}}),
    lora({"source": {"type": "s3", "uri": "s3://bucket"}}),
    lora({"access": {"apiKeySecretRefs": [{"name": "keys"}, {"name": "more", "key": "k"}]}}),
    lora(name="a"),
    lora({"placement": {"replicas": "all"}}),
    lora({"placement": {"replicas": 3, "policy": "least-loaded"}}),
    lora({"placement": {"replicas": "auto", "min": 1, "max": 8, "targetRequestsPerPod": 1.5,
                        "rateWindowSeconds": 30, "scaleDownDelaySeconds": 0}}),
    lora({"placement": {"replicas": "auto", "max": 2}}),
    lora({"traffic": [{"latestRevision": True, "percent": 100}]}),
    lora({"traffic": [{"revision": 1, "percent": 100}]}),  # a create: revision 1 is the first one made
    revised({"traffic": [{"revision": 3, "percent": 90}, {"latestRevision": True, "percent": 10}]}),
    revised({"traffic": [{"revision": 1, "percent": 0}, {"revision": 2, "percent": 60},
                         {"revision": 4, "percent": 40}]}),
    lora({"rollout": {}, "revisionHistoryLimit": 10}),
    lora({"rollout": {"steps": [5, 20, 60, 100], "stepSeconds": 3, "maxErrorRatio": 2, "maxTTFTRatio": 1.2,
                      "minRequests": 5}}),
], ids=["hub", "s3", "local", "hub-full", "hub-pr-ref", "s3-trailing-slash", "s3-bucket-root", "tenants",
        "one-char-name", "placement-all", "placement-3", "placement-auto", "placement-auto-max-only",
        "traffic-latest", "traffic-first-revision", "traffic-split", "traffic-zero-percent", "rollout-defaults",
        "rollout-full"])
def test_good_adapters(obj):
    defaulted, errors = admit(LORA, obj)
    assert errors == []
    assert defaulted["spec"]["preload"] is False
    assert defaulted["spec"]["revisionHistoryLimit"] >= 1


def test_rollout_defaults():
    defaulted, errors = admit(LORA, lora({"rollout": {}}))
    assert errors == []
    assert defaulted["spec"]["rollout"] == {"steps": [10, 50, 100], "stepSeconds": 300, "maxErrorRatio": 1.5,
                                            "maxTTFTRatio": 1.5, "minRequests": 20}
    assert defaulted["spec"]["revisionHistoryLimit"] == 5


# --- bad objects: OpenAPI ----------------------------------------------------------------------

@pytest.mark.parametrize("crd, obj, fragment", [
    (BMD, bmd({"model": {}}), "'id' is a required property"),
    (BMD, bmd({"model": {"id": "m", "dtype": "int8"}}), "is not one of"),
    (BMD, bmd({"replicas": -1}), "less than the minimum"),
    (BMD, bmd({"service": {"type": "ExternalName"}}), "is not one of"),
    (BMD, bmd({"autoscaling": {"target": 0}}), "less than or equal to the minimum"),
    (BMD, bmd({"engine": {"port": 80}}), "less than the minimum"),
    (LORA, lora({"source": {"type": "git", "uri": "x"}}), "is not one of"),
    (LORA, lora({"source": {"type": "hub", "uri": "o/r", "sha256": "xyz"}}), "does not match"),
    (LORA, lora({"source": {"type": "hub", "uri": "o/r", "configSha256": "xyz"}}), "does not match"),
    (LORA, lora({"source": {"type": "s3", "uri": "s3://bucket/%2e%2e/%2e%2e/x"}}), "does not match"),
    (LORA, lora({"source": {"type": "local", "uri": "adapters\\..\\..\\etc"}}), "does not match"),
    (LORA, lora({"source": {"type": "s3", "uri": "s3://bucket/a\nb"}}), "does not match"),
    (LORA, lora({"source": {"type": "hub", "uri": "o/r", "revision": "%2e%2e"}}), "does not match"),
    (LORA, lora({"baseModel": "Not_A_Name"}), "does not match"),
    (LORA, lora({"access": {"apiKeySecretRefs": [{"key": "k"}]}}), "'name' is a required property"),
    (LORA, lora({"placement": {"replicas": 0}}), "is not valid under any of the given schemas"),
    (LORA, lora({"placement": {"replicas": "most"}}), "is not valid under any of the given schemas"),
    (LORA, lora({"placement": {"policy": "random"}}), "is not one of"),
    (BMD, bmd({"inferencePool": {"endpointPickerRef": {"port": 70000}}}), "greater than the maximum"),
    (BMD, bmd({"tenants": [tenant(limits={"requestsPerMinute": -1})]}), "less than the minimum"),
    (BMD, bmd({"tenants": [tenant(limits={"tokensPerMinute": 0})]}), "less than the minimum"),
    (BMD, bmd({"tenants": [tenant(limits={"maxConcurrent": -16})]}), "less than the minimum"),
    (BMD, bmd({"tenants": [tenant(weight=0)]}), "less than the minimum"),
    (BMD, bmd({"tenants": [tenant(weight=1.5)]}), "is not of type 'integer'"),
    (BMD, bmd({"tenants": [tenant(name="Acme_Corp")]}), "does not match"),
    (BMD, bmd({"tenants": [tenant(name="a" * 64)]}), "is too long"),
    (BMD, bmd({"tenants": [tenant(apiKeySecretRefs=[])]}), "should be non-empty"),
    (BMD, bmd({"tenants": [{"name": "acme"}]}), "'apiKeySecretRefs' is a required property"),
    (BMD, bmd({"tenants": [tenant(name="a"), tenant(name="b"), tenant(name="a")]}), "Duplicate value: {'name': 'a'}"),
    (BMD, bmd({"tenants": [tenant(name=f"t{i}") for i in range(257)]}), "is too long"),
    (BMD, bmd({"tenants": [tenant(apiKeySecretRefs=[{"name": f"k{i}"} for i in range(17)])]}), "is too long"),
    (BMD, bmd({"autoscaling": {"minReplicas": -1}}), "less than the minimum"),
    (BMD, bmd({"warmStart": {"budgetSeconds": 601}}), "greater than the maximum"),
    (BMD, bmd({"autoscaling": {"scaleToZero": {"interceptor": {"port": 0}}}}), "less than the minimum"),
    (LORA, lora({"placement": {"replicas": "auto", "min": 0}}), "less than the minimum"),
    (LORA, lora({"placement": {"replicas": "auto", "targetRequestsPerPod": 0}}), "less than or equal to the minimum"),
    (LORA, lora({"placement": {"replicas": "auto", "rateWindowSeconds": 1}}), "less than the minimum"),
    (LORA, lora({"traffic": [{"latestRevision": True, "percent": 101}]}), "greater than the maximum"),
    (LORA, lora({"traffic": [{"revision": 0, "percent": 100}]}), "less than the minimum"),
    (LORA, lora({"traffic": [{"revision": 1}]}), "'percent' is a required property"),
    (LORA, lora({"traffic": [{"revision": 1, "percent": 6}] * 17}), "is too long"),
    (LORA, lora({"rollout": {"steps": [0, 100]}}), "less than the minimum"),
    (LORA, lora({"rollout": {"steps": [10, 110]}}), "greater than the maximum"),
    (LORA, lora({"rollout": {"steps": list(range(1, 12))}}), "is too long"),
    (LORA, lora({"rollout": {"steps": []}}), "should be non-empty"),
    (LORA, lora({"rollout": {"stepSeconds": 0}}), "less than the minimum"),
    (LORA, lora({"rollout": {"maxErrorRatio": 0.5}}), "less than the minimum"),
    (LORA, lora({"rollout": {"minRequests": 0}}), "less than the minimum"),
    (LORA, lora({"revisionHistoryLimit": 0}), "less than the minimum"),
    (LORA, lora({"revisionHistoryLimit": 101}), "greater than the maximum"),
], ids=["no-model-id", "dtype", "replicas", "svc-type", "target-zero", "low-port", "source-type", "sha256",
        "config-sha256", "uri-percent", "uri-backslash", "uri-newline", "revision-percent",
        "base-name", "secret-ref", "placement-zero", "placement-word", "placement-policy", "epp-port", "tenant-negative-rpm",
        "tenant-zero-tpm", "tenant-negative-concurrency", "tenant-zero-weight", "tenant-fractional-weight",
        "tenant-name", "tenant-long-name", "tenant-no-refs", "tenant-refs-missing", "tenant-duplicate-names",
        "tenants-over-cap", "tenant-refs-over-cap", "min-replicas-negative", "warm-start-budget",
        "interceptor-port", "placement-min-zero", "placement-target-zero", "placement-window",
        "traffic-over-100", "traffic-revision-zero", "traffic-no-percent", "traffic-over-cap", "steps-zero",
        "steps-over-100", "steps-over-cap", "steps-empty", "step-seconds", "error-ratio", "min-requests",
        "history-zero", "history-over-cap"])
def test_openapi_rejects(crd, obj, fragment):
    _, errors = admit(crd, obj)
    assert any(fragment in e for e in errors), errors


# --- bad objects: CEL --------------------------------------------------------------------------

@pytest.mark.parametrize("crd, obj, fragment", [
    (BMD, bmd({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}), "minReplicas must be <="),
    (BMD, bmd({"autoscaling": {"metric": "kv_cache_usage_ratio", "target": 8}}), "fraction"),
    (BMD, bmd({"ingress": {"enabled": True}}), "ingress.host is required"),
    (BMD, bmd(name="9llama"), "DNS-1035"),
    (BMD, bmd(name="x" * 53), "DNS-1035"),
    (LORA, lora(name="Support_Acme"), "DNS-1123"),
    (LORA, lora(name="-bad"), "DNS-1123"),
    (LORA, lora(name="a" * 64), "DNS-1123"),
    (LORA, lora({"source": {"type": "s3", "uri": "org/repo"}}), "s3://bucket/prefix"),
    (LORA, lora({"source": {"type": "s3", "uri": "s3://B/x"}}), "s3://bucket/prefix"),
    (LORA, lora({"source": {"type": "hub", "uri": "s3://bucket/x"}}), "repo id like org/name"),
    (LORA, lora({"source": {"type": "hub", "uri": "a/b/c"}}), "repo id like org/name"),
    (LORA, lora({"source": {"type": "s3", "uri": "s3://bucket/x", "revision": "main"}}), "revision applies only"),
    (LORA, lora({"source": {"type": "local", "uri": "http://host/x"}}), "path inside the engine pod"),
    (LORA, lora({"source": {"type": "s3", "uri": "s3://bucket/../../x"}}), "no empty, '.' or '..' path segments"),
    (LORA, lora({"source": {"type": "s3", "uri": "s3://bucket/a/./b"}}), "no empty, '.' or '..' path segments"),
    (LORA, lora({"source": {"type": "s3", "uri": "s3://bucket//x"}}), "no empty, '.' or '..' path segments"),
    (LORA, lora({"source": {"type": "s3", "uri": "s3://bucket/a/.."}}), "no empty, '.' or '..' path segments"),
    (LORA, lora({"source": {"type": "local", "uri": "../etc"}}), "no empty, '.' or '..' path segments"),
    (LORA, lora({"source": {"type": "local", "uri": "/adapters//a"}}), "no empty, '.' or '..' path segments"),
    (LORA, lora({"source": {"type": "hub", "uri": "o/r", "revision": "../../x"}}), "revision may hold no"),
    (LORA, lora({"source": {"type": "hub", "uri": "o/r", "revision": "/etc"}}), "revision may hold no"),
    (LORA, lora({"source": {"type": "hub", "uri": "o/r", "revision": "refs//x"}}), "revision may hold no"),
    (LORA, lora({"placement": {"replicas": "auto", "min": 5, "max": 2}}), "placement.min must be <= placement.max"),
    (BMD, bmd({"placement": {"replicas": "auto", "min": 9}}), "placement.min must be <= placement.max"),
    (LORA, revised({"traffic": [{"revision": 3, "percent": 90}, {"latestRevision": True, "percent": 20}]}),
     "must sum to 100"),
    (LORA, revised({"traffic": [{"revision": 3, "percent": 50}]}), "must sum to 100"),
    (LORA, revised({"traffic": [{"latestRevision": True, "percent": 50}, {"latestRevision": True, "percent": 50}]}),
     "at most one traffic entry may name latestRevision"),
    (LORA, revised({"traffic": [{"revision": 2, "percent": 50}, {"revision": 2, "percent": 50}]}),
     "a revision may appear in traffic only once"),
    (LORA, revised({"traffic": [{"revision": 2, "latestRevision": True, "percent": 100}]}),
     "exactly one of revision or latestRevision"),
    (LORA, revised({"traffic": [{"percent": 100}]}), "exactly one of revision or latestRevision"),
    (LORA, revised({"traffic": [{"revision": 2, "percent": 90}, {"latestRevision": False, "percent": 10}]}),
     "latestRevision, when given, must be true"),
    (LORA, revised({"traffic": [{"revision": 5, "percent": 100}]}), "greater than status.latestRevision"),
    (LORA, lora({"traffic": [{"revision": 2, "percent": 100}]}), "greater than status.latestRevision"),
    (LORA, lora({"traffic": [{"latestRevision": True, "percent": 100}], "rollout": {}}), "mutually exclusive"),
    (LORA, lora({"rollout": {"steps": [10, 50, 50, 100]}}), "strictly increasing"),
    (LORA, lora({"rollout": {"steps": [1, 2, 3, 4, 5, 6, 7, 8, 10, 9]}}), "strictly increasing"),
], ids=["min-gt-max", "kv-target", "ingress-host", "bmd-digit", "bmd-long", "upper", "dash", "long", "s3-uri",
        "s3-bucket", "hub-s3", "hub-3-parts", "revision", "local-url", "s3-dotdot", "s3-dot", "s3-empty",
        "s3-trailing-dotdot", "local-dotdot", "local-empty", "revision-dotdot", "revision-absolute",
        "revision-empty", "placement-min-gt-max", "base-placement-min-over-default-max", "traffic-sum-over",
        "traffic-sum-under", "traffic-two-latest", "traffic-revision-twice", "traffic-both-keys",
        "traffic-no-key", "traffic-latest-false", "traffic-unknown-revision", "traffic-unknown-on-create",
        "traffic-and-rollout", "steps-repeated", "steps-last-pair"])
def test_cel_rejects(crd, obj, fragment):
    _, errors = admit(crd, obj)
    assert any(fragment in e for e in errors), errors


def test_cel_base_model_is_immutable():
    old = lora()
    _, errors = admit(LORA, lora({"baseModel": "other"}), old=old)
    assert any("immutable" in e for e in errors)
    _, errors = admit(LORA, lora({"preload": True}), old=old)
    assert errors == []
    _, errors = admit(LORA, lora({"baseModel": "other"}))  # a create: transition rules do not run
    assert errors == []


def test_every_cel_rule_is_exercised_by_a_bad_object():
    """No rule in the CRDs goes untested: each rule's message appears among the rejections above."""
    fragments = [p[2] for p in test_cel_rejects.pytestmark[0].args[1]] + ["immutable"]
    for name in (BMD, LORA):
        for _, rule in cel_rules(schema_of(load_crd(name))):
            assert any(f in rule["message"] for f in fragments), rule


def test_defaults_do_not_mask_bad_input():
    obj = bmd({"autoscaling": {"minReplicas": 9}})  # maxReplicas defaults to 4
    _, errors = admit(BMD, copy.deepcopy(obj))
    assert any("minReplicas must be <=" in e for e in errors)
