"""Names shared by the operator's modules, the CRDs and the Helm chart, and `Key`, the typed key of
the operator's memory (a namespaced object)."""
from __future__ import annotations

from dataclasses import dataclass

GROUP = "loraplex.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
BMD_PLURAL = "basemodeldeployments"
BMD_KIND = "BaseModelDeployment"
LORA_PLURAL = "loraadapters"
LORA_KIND = "LoraAdapter"

FINALIZER = "loraplex.dev/operator"

# Labels the operator puts on everything it renders; the engine pods are selected by
# SELECTOR_LABELS (a Deployment's selector is immutable, so it holds only stable keys).
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_BASE = "loraplex.dev/base-model"
ENGINE_APP = "loraplex-engine"
MANAGED_BY = "loraplex-operator"

# Annotations on the objects the operator owns (never on the user's custom resources).
ANN_LAST_APPLIED = "loraplex.dev/last-applied"
ANN_SPEC_HASH = "loraplex.dev/spec-hash"

# Inside the engine pod.
ENGINE_CONTAINER = "engine"
ENGINE_PORT_NAME = "http"
DEFAULT_ENGINE_PORT = 8080
DEFAULT_ENGINE_IMAGE = "ghcr.io/loraplex/loraplex-engine:0.1.0"
MANIFEST_KEY = "adapters.json"
MANIFEST_DIR = "/etc/loraplex/adapters"
MANIFEST_PATH = f"{MANIFEST_DIR}/{MANIFEST_KEY}"
CACHE_DIR = "/var/cache/loraplex"
# The disk tier of Hub/S3 adapter downloads: its own emptyDir, bounded by the engine's
# --adapter-disk-bytes (spec.engine.adapterDiskBytes) and a sizeLimit a quarter above it (a
# download lands before the tier evicts the least recently used ones).
ADAPTER_CACHE_DIR = f"{CACHE_DIR}/adapters"
DEFAULT_ADAPTER_DISK_BYTES = 10 * 2**30
ADMIN_TOKEN_DIR = "/etc/loraplex/admin"
ADMIN_TOKEN_PATH = f"{ADMIN_TOKEN_DIR}/token"
# /dev/shm for a tensor-parallel pod: a cap (NCCL buffers use a few hundred MiB), not a reservation.
TP_SHM_SIZE = "4Gi"
DEFAULT_ADMIN_TOKEN_KEY = "token"
# The tenants' API keys file (spec.tenants, tenants.py): the Secret `<base>-api-keys`, key
# api-keys.json, mounted here; the engines run with --api-keys-file API_KEYS_PATH.
API_KEYS_KEY = "api-keys.json"
API_KEYS_DIR = "/etc/loraplex/tenants"
API_KEYS_PATH = f"{API_KEYS_DIR}/{API_KEYS_KEY}"
# On that Secret: the number of ready engine pods its limits were divided by.
ANN_TENANT_DIVISOR = "loraplex.dev/tenant-limits-divisor"

# The operator's adapter catalog (catalog.py): engines look up adapters they were not given.
CATALOG_PREFIX = "/catalog/v1"
DEFAULT_CATALOG_PORT = 9091

# Adapter states: the engine's own are loraplex.manifest.AdapterState; the operator adds one,
# `unreachable` (the pod is Ready for Kubernetes but its engine did not answer).
STATE_UNREACHABLE = "unreachable"


@dataclass(frozen=True)
class Key:
    """A namespaced object (a base or an adapter) as a key of the operator's memory."""

    namespace: str
    name: str


def admin_secret_name(base: str) -> str:
    return f"{base}-admin-token"


def api_keys_secret_name(base: str) -> str:
    return f"{base}-api-keys"


def configmap_name(base: str) -> str:
    return f"{base}-adapters"


def selector_labels(base: str) -> dict[str, str]:
    return {LABEL_NAME: ENGINE_APP, LABEL_BASE: base}


def common_labels(base: str) -> dict[str, str]:
    return {
        LABEL_NAME: ENGINE_APP,
        LABEL_INSTANCE: base,
        LABEL_COMPONENT: "engine",
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_BASE: base,
    }


def selector_string(base: str) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(base).items()))
