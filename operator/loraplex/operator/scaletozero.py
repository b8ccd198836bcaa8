"""Scale to zero through the KEDA HTTP add-on: what the operator renders for it, the ScaleToZero
condition, and the time a base takes to come back from zero. Pure functions; owned.py applies.

A base asks for it with `autoscaling.enabled` and `autoscaling.minReplicas: 0`. Something must
hold the requests that arrive while no engine pod runs, and it is not ours to write: the KEDA
HTTP add-on's interceptor does it (http.keda.sh/v1alpha1; this code follows the HTTPScaledObject
CRD of kedacore/http-add-on v0.15.0, vendored in tests/operator/data/). Where the cluster serves
`httpscaledobjects.http.keda.sh` (API discovery), the operator renders for the base:

- an HTTPScaledObject `<base>`: scaleTargetRef = the base's Deployment and Service, replicas
  {min: 0, max: maxReplicas}, scaling on the requests in flight at the interceptor
  (scaleToZero.targetConcurrency per pod), scaledownPeriod = scaleDownStabilizationSeconds,
  timeouts.conditionWait = scaleToZero.wakeTimeoutSeconds (how long the interceptor holds a
  request for a pod to become Ready), hosts = the names requests arrive under (below);
- a Service `<base>-wake` of type ExternalName: the interceptor's proxy Service
  (scaleToZero.interceptor: keda-add-ons-http-interceptor-proxy in keda, port 8080) under a name
  in the base's namespace. Clients call `http://<base>-wake.<namespace>.svc:8080` (the base's
  status.endpoint says so) and the Ingress, when enabled, points at it: every request must pass
  the interceptor, which counts them for KEDA and holds them while the base wakes.

The replica count then belongs to KEDA: the operator's own autoscaler stands aside and the
Deployment's replicas are never rendered (owned.ensure_deployment). Without the add-on the base
gets ScaleToZero=False (KEDAHTTPAddonNotInstalled) and keeps at least one replica.

`FromZero` follows a base from 0 replicas to its first Ready pod (status.lastScaleFromZeroSeconds).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import render
from . import status as S
from .constants import Key

KEDA_HTTP_API = "http.keda.sh/v1alpha1"
PLURAL = "httpscaledobjects"
KIND = "HTTPScaledObject"
CONDITION = "ScaleToZero"
WAKE_SUFFIX = "-wake"  # a base name has at most 52 characters: the Service name stays a DNS label
CLUSTER_DOMAIN = "cluster.local"
INSTALL = ("install KEDA and its HTTP add-on (helm install keda kedacore/keda --namespace keda; "
           "helm install http-add-on kedacore/keda-add-ons-http --namespace keda)")


def requested(spec: dict | None) -> bool:
    """Whether the base asks to scale to zero (autoscaling on, minReplicas 0)."""
    auto = render.with_defaults(spec)["autoscaling"]
    return bool(auto["enabled"]) and int(auto["minReplicas"]) == 0


def wake_service_name(base: str) -> str:
    return f"{base}{WAKE_SUFFIX}"


def interceptor(spec: dict | None) -> dict:
    return render.with_defaults(spec)["autoscaling"]["scaleToZero"]["interceptor"]


def entry(bmd: dict) -> tuple[str, int]:
    """The Service (name, port) requests must go to while the base scales to zero."""
    return wake_service_name(bmd["metadata"]["name"]), int(interceptor(bmd.get("spec"))["port"])


def hosts(bmd: dict) -> list[str]:
    """The Host headers the interceptor routes to this base: the wake Service's names in the
    cluster, and the Ingress host."""
    meta = bmd["metadata"]
    svc, ns = wake_service_name(meta["name"]), meta["namespace"]
    out = [svc, f"{svc}.{ns}", f"{svc}.{ns}.svc", f"{svc}.{ns}.svc.{CLUSTER_DOMAIN}"]
    ing = render.with_defaults(bmd.get("spec"))["ingress"]
    if ing.get("enabled") and ing.get("host"):
        out.append(str(ing["host"]))
    return out


def render_http_scaled_object(bmd: dict) -> dict:
    """The base's HTTPScaledObject (http.keda.sh/v1alpha1)."""
    name = bmd["metadata"]["name"]
    spec = render.with_defaults(bmd.get("spec"))
    auto, zero = spec["autoscaling"], spec["autoscaling"]["scaleToZero"]
    return {
        "apiVersion": KEDA_HTTP_API,
        "kind": KIND,
        "metadata": render._metadata(bmd, name),  # noqa: SLF001 - the one shape of owned metadata
        "spec": {
            "hosts": hosts(bmd),
            "scaleTargetRef": {"name": name, "kind": "Deployment", "apiVersion": "apps/v1",
                               "service": name, "port": int(spec["service"]["port"])},
            "replicas": {"min": 0, "max": int(auto["maxReplicas"])},
            "scalingMetric": {"concurrency": {"targetValue": int(zero["targetConcurrency"])}},
            "scaledownPeriod": int(auto["scaleDownStabilizationSeconds"]),
            "timeouts": {"conditionWait": f"{int(zero['wakeTimeoutSeconds'])}s"},
        },
    }


def render_wake_service(bmd: dict) -> dict:
    """`<base>-wake`: the interceptor's proxy Service, named in the base's namespace (ExternalName)."""
    name, port = entry(bmd)
    icpt = interceptor(bmd.get("spec"))
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": render._metadata(bmd, name),  # noqa: SLF001
        "spec": {
            "type": "ExternalName",
            "externalName": f"{icpt['service']}.{icpt['namespace']}.svc.{CLUSTER_DOMAIN}",
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        },
    }


def condition(bmd: dict, installed: bool) -> dict | None:
    """The ScaleToZero condition (None when the base does not ask for it)."""
    spec = bmd.get("spec")
    if not requested(spec):
        return None
    if not installed:
        return S.condition(CONDITION, False, "KEDAHTTPAddonNotInstalled",
                           f"autoscaling.minReplicas is 0, but the cluster does not serve {KEDA_HTTP_API} {KIND} "
                           f"(CRD {PLURAL}.http.keda.sh): {INSTALL} to scale to zero; until then the base "
                           "keeps at least 1 replica")
    name = bmd["metadata"]["name"]
    svc, port = entry(bmd)
    icpt = interceptor(spec)
    top = render.with_defaults(spec)["autoscaling"]["maxReplicas"]
    return S.condition(CONDITION, True, "HandedToKEDA",
                       f"{KIND} {name}: KEDA sets the Deployment's replicas (0 to {top}); requests to "
                       f"{svc}:{port} (the interceptor {icpt['service']}.{icpt['namespace']}) are held while "
                       "engine pods start")


# --- the way back from zero --------------------------------------------------------------------


@dataclass(frozen=True)
class FromZero:
    """One base on its way back from zero: seen at 0 replicas (`at_zero`), then scaled up at
    `started` (monotonic seconds) and waiting for its first Ready pod."""

    at_zero: bool = False
    started: float | None = None


def observe(state: FromZero, replicas: int | None, ready: int, now: float) -> tuple[FromZero, float | None]:
    """Fold one look at the base (its Deployment's replicas, its Ready pods) into the state; the
    seconds from the scale-up to the first Ready pod once that pod is there."""
    if replicas is None:
        return state, None
    if replicas == 0:
        return FromZero(at_zero=True), None
    if state.started is not None:
        return (FromZero(), now - state.started) if ready > 0 else (state, None)
    if state.at_zero:
        # Scaled up (by KEDA or the operator). Already Ready at the first look: the start was not
        # seen, so there is nothing true to report.
        return (FromZero(), None) if ready > 0 else (FromZero(started=now), None)
    return state, None


@dataclass
class ZeroState:
    """Per base, its way back from zero."""

    from_zero: dict[Key, FromZero] = field(default_factory=dict)

    def observe(self, key: Key, replicas: int | None, ready: int, now: float) -> float | None:
        state, seconds = observe(self.from_zero.get(key, FromZero()), replicas, ready, now)
        self.from_zero[key] = state
        return seconds
