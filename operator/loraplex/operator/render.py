"""Desired objects from a BaseModelDeployment: pure functions, no I/O.

Everything the operator creates for a base carries the same labels (constants.common_labels) and
an ownerReference to the BaseModelDeployment (controller=true), so that deleting the base lets the
garbage collector remove the Deployment, Service, Ingress and the adapters ConfigMap.
"""
from __future__ import annotations

import base64
import copy
import math
from typing import Any

from loraplex.manifest import AdapterManifest, dump_manifest_list

from . import constants as C
from .adapters import admin_token_ref
from .config import DEFAULT_ENGINE_IMAGE_PREFIXES
from .podpolicy import check_engine, container_security_context, pod_security_context

# The defaults, mirrored from the CRD's OpenAPI `default:` values (a unit test keeps the two
# equal). They are applied here too because the operator must behave the same when the API
# server did not default a field (an object created before a CRD upgrade, an emulator).
BMD_DEFAULTS: dict[str, Any] = {
    "model": {"dtype": "auto"},
    "engine": {
        "image": C.DEFAULT_ENGINE_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "port": C.DEFAULT_ENGINE_PORT,
        "adapterDiskBytes": C.DEFAULT_ADAPTER_DISK_BYTES,
    },
    "replicas": 1,
    "autoscaling": {
        "enabled": False,
        "minReplicas": 1,
        "maxReplicas": 4,
        "metric": "num_requests_running",
        "target": 8,
        "scaleUpStabilizationSeconds": 0,
        "scaleDownStabilizationSeconds": 300,
        "scaleToZero": {
            "targetConcurrency": 8,
            "wakeTimeoutSeconds": 600,
            "interceptor": {"namespace": "keda", "service": "keda-add-ons-http-interceptor-proxy", "port": 8080},
        },
    },
    "service": {"type": "ClusterIP", "port": 80},
    "ingress": {"enabled": False, "path": "/"},
    "placement": {"replicas": 2, "policy": "spread", "min": 1, "max": 8, "targetRequestsPerPod": 1,
                  "rateWindowSeconds": 60, "scaleDownDelaySeconds": 120},
    "warmStart": {"budgetSeconds": 60},
    "inferencePool": {"enabled": True},
}


def _fill(defaults: dict, value: dict) -> dict:
    out = copy.deepcopy(value)
    for k, d in defaults.items():
        if k not in out or out[k] is None:
            out[k] = copy.deepcopy(d)
        elif isinstance(d, dict) and isinstance(out[k], dict):
            out[k] = _fill(d, out[k])
    return out


def with_defaults(spec: dict | None) -> dict:
    return _fill(BMD_DEFAULTS, dict(spec or {}))


def owner_reference(bmd: dict) -> dict:
    meta = bmd["metadata"]
    return {
        "apiVersion": C.API_VERSION,
        "kind": C.BMD_KIND,
        "name": meta["name"],
        "uid": meta.get("uid", ""),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(bmd: dict, name: str) -> dict:
    meta = bmd["metadata"]
    return {
        "name": name,
        "namespace": meta["namespace"],
        "labels": C.common_labels(meta["name"]),
        "ownerReferences": [owner_reference(bmd)],
    }


# --- ConfigMap ---------------------------------------------------------------------------------

def render_configmap(bmd: dict, manifests: list[AdapterManifest]) -> dict:
    """The `<base>-adapters` ConfigMap: the manifest list the engine reads and watches.

    It holds the `preload` adapters only: those every pod must have resident before it is Ready,
    so they must be there when a pod starts, before the operator can push anything. Their
    number is bounded by the device slots of a pod (the engine refuses more), so the ConfigMap
    stays far below its 1 MiB limit. Every other adapter is pushed by the operator to the pods
    it is placed on (docs/operator.md, "Where manifests live")."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(bmd, C.configmap_name(bmd["metadata"]["name"])),
        "data": {C.MANIFEST_KEY: dump_manifest_list(manifests)},
    }


# --- Deployment --------------------------------------------------------------------------------

def render_admin_secret(bmd: dict, token: str) -> dict:
    """The admin-token Secret the operator creates when the base names none (created once,
    never rewritten: the token stays stable for the engines that mounted it)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _metadata(bmd, C.admin_secret_name(bmd["metadata"]["name"])),
        "data": {C.DEFAULT_ADMIN_TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }


def has_tenants(spec: dict | None) -> bool:
    """Whether the base declares tenants: then its engines run with --api-keys-file."""
    return bool((spec or {}).get("tenants"))


def render_api_keys_secret(bmd: dict, keys_file: str, divisor: int) -> dict:
    """The `<base>-api-keys` Secret: the engines' API keys file (tenants.keys_file: salted key
    hashes, weights and per-pod limits), and the ready-pod count those limits were divided by."""
    meta = _metadata(bmd, C.api_keys_secret_name(bmd["metadata"]["name"]))
    meta["annotations"] = {C.ANN_TENANT_DIVISOR: str(int(divisor))}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": meta,
        "data": {C.API_KEYS_KEY: base64.b64encode(keys_file.encode()).decode()},
    }


def catalog_url(base_url: str, namespace: str, base: str) -> str:
    """The --adapter-catalog-url of one base's engines (catalog.py serves it)."""
    return f"{base_url.rstrip('/')}{C.CATALOG_PREFIX}/{namespace}/{base}"


def engine_args(spec: dict, catalog: str | None = None) -> list[str]:
    """The `loraplex-engine` command line (flag names from ARCHITECTURE.md's engine CLI).
    `catalog`: the base's catalog URL, where the engine looks up adapters it was not given."""
    spec = with_defaults(spec)
    model, engine = spec["model"], spec["engine"]
    args = ["--model-id", str(model["id"])]
    if model.get("revision"):
        args += ["--revision", str(model["revision"])]
    args += ["--dtype", str(model["dtype"])]
    args += ["--host", "0.0.0.0", "--port", str(engine["port"]), "--device", "auto"]
    for key, flag in (("maxActiveAdapters", "--max-active-adapters"),
                      ("maxCpuAdapters", "--max-cpu-adapters"),
                      ("maxLoraRank", "--max-lora-rank"),
                      ("tensorParallelSize", "--tensor-parallel-size")):
        if engine.get(key) is not None:
            args += [flag, str(engine[key])]
    args += ["--adapter-manifest-file", C.MANIFEST_PATH,
             "--adapter-cache-dir", C.ADAPTER_CACHE_DIR, "--adapter-disk-bytes", str(int(engine["adapterDiskBytes"]))]
    args += ["--admin-token-file", C.ADMIN_TOKEN_PATH]  # always: the admin routes are never open
    # A new pod loads the adapters placed on it (the catalog answers for its POD_NAME, hottest
    # first) within this many seconds before it reports Ready; 0: off.
    args += ["--warm-start-budget-seconds", str(int(spec["warmStart"]["budgetSeconds"]))]
    if has_tenants(spec):
        args += ["--api-keys-file", C.API_KEYS_PATH]  # the tenants' keys, weights and per-pod limits
    if catalog:
        # Unplaced adapters load just in time with their own manifest (tenants, sha256, source);
        # names the catalog does not know are 404, never looked up in a default source.
        args += ["--adapter-catalog-url", catalog]
    args += [str(a) for a in engine.get("args") or []]
    return args


def _engine_env(engine: dict) -> list[dict]:
    # The root file system is read-only: every cache goes to the cache emptyDir.
    env = [{"name": "HF_HOME", "value": f"{C.CACHE_DIR}/hf"},
           {"name": "TRITON_CACHE_DIR", "value": f"{C.CACHE_DIR}/triton"},
           {"name": "XDG_CACHE_HOME", "value": f"{C.CACHE_DIR}/xdg"},
           # The pod's own name (downward API): the engine asks the catalog what is placed on it.
           {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}]
    user = list(engine.get("env") or [])
    names = {e.get("name") for e in user}
    return [e for e in env if e["name"] not in names] + user


def check_spec(spec: dict | None, image_prefixes: tuple[str, ...] = DEFAULT_ENGINE_IMAGE_PREFIXES) -> None:
    """Raise podpolicy.PolicyViolation when the base's engine pod would not be allowed."""
    check_engine(with_defaults(spec), image_prefixes)


def adapter_cache_size(engine: dict) -> str:
    """The sizeLimit of the adapter downloads' emptyDir: the disk budget and a quarter more."""
    return f"{math.ceil(int(engine['adapterDiskBytes']) * 1.25 / 2**20)}Mi"


def render_deployment(bmd: dict, replicas: int | None, catalog_base_url: str | None = None,
                      image_prefixes: tuple[str, ...] = DEFAULT_ENGINE_IMAGE_PREFIXES) -> dict:
    """The engine Deployment, hardened (podpolicy.py). `replicas=None` leaves the replica count
    out (the autoscaler owns it); the caller then sets it only when creating. `catalog_base_url`:
    the operator's catalog (LORAPLEX_CATALOG_URL), rendered as the engines' --adapter-catalog-url.
    Raises podpolicy.PolicyViolation for an image or a volume `image_prefixes` and the policy
    do not allow."""
    name = bmd["metadata"]["name"]
    check_spec(bmd.get("spec"), image_prefixes)
    spec = with_defaults(bmd.get("spec"))
    engine = spec["engine"]
    port = int(engine["port"])
    http_get = lambda path: {"path": path, "port": C.ENGINE_PORT_NAME}  # noqa: E731
    container = {
        "name": C.ENGINE_CONTAINER,
        "image": engine["image"],
        "imagePullPolicy": engine["imagePullPolicy"],
        "command": ["loraplex-engine"],
        "args": engine_args(spec, catalog_url(catalog_base_url, bmd["metadata"]["namespace"], name)
                            if catalog_base_url else None),
        "ports": [{"name": C.ENGINE_PORT_NAME, "containerPort": port, "protocol": "TCP"}],
        "env": _engine_env(engine),
        "resources": copy.deepcopy(engine.get("resources") or {}),
        # A model download can take long: the startup probe holds off liveness until the
        # process serves; readiness follows /ready (model loaded, preload adapters resident).
        "startupProbe": {"httpGet": http_get("/health"), "periodSeconds": 10, "failureThreshold": 180},
        "livenessProbe": {"httpGet": http_get("/health"), "periodSeconds": 10, "failureThreshold": 3},
        "readinessProbe": {"httpGet": http_get("/ready"), "periodSeconds": 5, "failureThreshold": 3},
        "securityContext": container_security_context(),
        "volumeMounts": [
            {"name": "adapters-manifest", "mountPath": C.MANIFEST_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "cache", "mountPath": C.CACHE_DIR},  # the model (HF_HOME) and compiler caches
            {"name": "adapter-cache", "mountPath": C.ADAPTER_CACHE_DIR},
        ] + list(engine.get("volumeMounts") or []),
    }
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,  # the engine never calls the Kubernetes API
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": [
            {"name": "adapters-manifest", "configMap": {"name": C.configmap_name(name)}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "cache", "emptyDir": {}},
            {"name": "adapter-cache", "emptyDir": {"sizeLimit": adapter_cache_size(engine)}},
        ] + list(engine.get("volumes") or []),
    }
    # The admin routes (adapter pushes) need this token; the operator reads the same Secret.
    token_ref = admin_token_ref(spec, name)
    pod_spec["volumes"].append({"name": "admin-token", "secret": {
        "secretName": token_ref.name, "items": [{"key": token_ref.key, "path": "token"}]}})
    container["volumeMounts"].append({"name": "admin-token", "mountPath": C.ADMIN_TOKEN_DIR, "readOnly": True})
    if has_tenants(spec):
        # Re-read by the engine when the kubelet syncs a change (limits re-divided, keys rotated).
        pod_spec["volumes"].append({"name": "api-keys", "secret": {
            "secretName": C.api_keys_secret_name(name), "items": [{"key": C.API_KEYS_KEY, "path": C.API_KEYS_KEY}]}})
        container["volumeMounts"].append({"name": "api-keys", "mountPath": C.API_KEYS_DIR, "readOnly": True})
    if int(engine.get("tensorParallelSize") or 1) > 1:
        # The ranks' collectives (NCCL) use shared memory; a container's default /dev/shm is 64 MiB,
        # which NCCL outgrows. A memory-backed emptyDir counts against the pod's memory limit.
        pod_spec["volumes"].append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": C.TP_SHM_SIZE}})
        container["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"})
    if engine.get("nodeSelector"):
        pod_spec["nodeSelector"] = dict(engine["nodeSelector"])
    if engine.get("tolerations"):
        pod_spec["tolerations"] = list(engine["tolerations"])
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(bmd, name),
        "spec": {
            **({"replicas": int(replicas)} if replicas is not None else {}),
            "selector": {"matchLabels": C.selector_labels(name)},
            "template": {
                "metadata": {"labels": C.common_labels(name)},
                "spec": pod_spec,
            },
        },
    }


def deployment_replicas(spec: dict, observed: int | None, floor: int = 1) -> int:
    """Replicas to render: the spec's, or under autoscaling the autoscaler's (the observed
    Deployment's), held inside [max(minReplicas, floor), maxReplicas]. `floor` is 0 only where
    KEDA holds requests while the base scales from zero (scaletozero.py)."""
    spec = with_defaults(spec)
    auto = spec["autoscaling"]
    if not auto["enabled"]:
        return int(spec["replicas"])
    lo, hi = max(int(auto["minReplicas"]), floor), int(auto["maxReplicas"])
    start = observed if observed is not None else int(spec["replicas"])
    return max(lo, min(hi, int(start)))


# --- Service and Ingress -----------------------------------------------------------------------

def render_service(bmd: dict) -> dict:
    name = bmd["metadata"]["name"]
    svc = with_defaults(bmd.get("spec"))["service"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(bmd, name),
        "spec": {
            "type": svc["type"],
            "selector": C.selector_labels(name),
            "ports": [{"name": "http", "port": int(svc["port"]), "targetPort": C.ENGINE_PORT_NAME,
                       "protocol": "TCP"}],
        },
    }


def render_ingress(bmd: dict, backend: tuple[str, int] | None = None) -> dict | None:
    """The Ingress to the base's Service, or to `backend` (service, port): the interceptor's
    Service when the base scales to zero (scaletozero.py)."""
    name = bmd["metadata"]["name"]
    spec = with_defaults(bmd.get("spec"))
    svc_name, svc_port = backend or (name, int(spec["service"]["port"]))
    ing = spec["ingress"]
    if not ing.get("enabled"):
        return None
    if not ing.get("host"):
        raise ValueError("spec.ingress.host is required when the ingress is enabled")
    body: dict[str, Any] = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": _metadata(bmd, name),
        "spec": {
            "rules": [{
                "host": ing["host"],
                "http": {"paths": [{
                    "path": ing.get("path") or "/",
                    "pathType": "Prefix",
                    "backend": {"service": {"name": svc_name, "port": {"number": svc_port}}},
                }]},
            }],
        },
    }
    if ing.get("className"):
        body["spec"]["ingressClassName"] = ing["className"]
    if (ing.get("tls") or {}).get("secretName"):
        body["spec"]["tls"] = [{"hosts": [ing["host"]], "secretName": ing["tls"]["secretName"]}]
    if ing.get("annotations"):
        body["metadata"]["annotations"] = dict(ing["annotations"])
    return body


INFERENCE_POOL_API = "inference.networking.k8s.io/v1"
DEFAULT_EPP_PORT = 9002


def render_inference_pool(bmd: dict) -> dict | None:
    """The InferencePool (Gateway API Inference Extension v1) over the base's engine pods, for
    an inference gateway whose endpoint picker routes by queue, KV usage and LoRA affinity.
    None when the spec turns it off."""
    name = bmd["metadata"]["name"]
    spec = with_defaults(bmd.get("spec"))
    pool = spec["inferencePool"]
    if not pool.get("enabled", True):
        return None
    epp = pool.get("endpointPickerRef") or {}
    ref: dict[str, Any] = {"kind": "Service", "name": epp.get("name") or f"{name}-epp",
                           "port": {"number": int(epp.get("port") or DEFAULT_EPP_PORT)}}
    if epp.get("failureMode"):
        ref["failureMode"] = epp["failureMode"]
    return {
        "apiVersion": INFERENCE_POOL_API,
        "kind": "InferencePool",
        "metadata": _metadata(bmd, name),
        "spec": {
            "selector": {"matchLabels": C.selector_labels(name)},
            "targetPorts": [{"number": int(spec["engine"]["port"])}],
            "endpointPickerRef": ref,
        },
    }


def endpoint(bmd: dict, service: tuple[str, int] | None = None) -> str:
    """Where tenants reach the base: the Ingress host when there is one, else the Service (or
    `service` (name, port): the interceptor's when the base scales to zero)."""
    meta = bmd["metadata"]
    spec = with_defaults(bmd.get("spec"))
    ing = spec["ingress"]
    if ing.get("enabled") and ing.get("host"):
        scheme = "https" if (ing.get("tls") or {}).get("secretName") else "http"
        return f"{scheme}://{ing['host']}"
    name, port = service or (meta["name"], int(spec["service"]["port"]))
    host = f"{name}.{meta['namespace']}.svc"
    return f"http://{host}" if port == 80 else f"http://{host}:{port}"

