"""kopf handlers: thin, one per concern. The work is in reconcile.py (the base pass) and the
modules of each concern (owned.py, sync.py, placement.py, scaling.py, publish.py).

- leader election: kopf's startup blocks until this process holds the Lease (lease.py), so
  exactly one operator watches and acts;
- indexes: engine pods, BaseModelDeployments and LoraAdapters by (namespace, base), in memory;
- BaseModelDeployment: one daemon per base is THE reconciler of the base and of all its
  adapters, and the only writer of the base's owned objects: each pass applies the owned
  objects (when their inputs changed, after a Deployment event, once per resync interval),
  places the adapters, brings every pod to its placed set (one listing per pod, pushes only
  for the difference) and writes the statuses that changed. Spec changes (the create/update
  handler), pod, Deployment and adapter events wake it; a timer reads the engines' metrics for
  the autoscaler and the adapters' request rates (load-following placement);
- LoraAdapter: no daemon (10,000 of them would be 10,000 loops): an event wakes its base's
  loop; an adapter without a base is marked Pending at once; on deletion a finalizer handler
  unloads it from the pods (bounded retries, never stuck when the pods or the base are gone).

kopf keeps its own bookkeeping (handler progress, the diff base) in `status.kopf` of the custom
resources, never in annotations: the operator writes only `status` and its finalizer.
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import Any

import kopf

from . import backoff
from . import catalog
from . import constants as C
from . import kube
from . import lease
from . import metrics
from . import podpolicy
from . import publish
from . import reconcile as R
from . import render
from . import scaling
from . import status as S
from . import sync
from .config import OperatorConfig
from .constants import Key
from .runtime import Runtime, Wake

CONFIG = OperatorConfig.from_env()
BMD = dict(group=C.GROUP, version=C.VERSION, plural=C.BMD_PLURAL)
LORA = dict(group=C.GROUP, version=C.VERSION, plural=C.LORA_PLURAL)
ENGINE_POD_LABELS = {C.LABEL_NAME: C.ENGINE_APP, C.LABEL_BASE: kopf.PRESENT}


def plain(value: Any) -> Any:
    """A detached deep copy of a kopf body view (those are live and change under our feet)."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def runtime(memo: kopf.Memo) -> Runtime:
    if getattr(memo, "runtime", None) is None:
        memo.runtime = Runtime(CONFIG)
    return memo.runtime


def _store(index: kopf.Index, key: tuple) -> list:
    store = index.get(key)
    return list(store) if store is not None else []


def _base(base_models: kopf.Index, namespace: str, name: str | None) -> dict | None:
    found = _store(base_models, (namespace, name)) if name else []
    return found[0] if found else None


# --- operator lifecycle ------------------------------------------------------------------------

@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # kopf's state goes to status.kopf, never to annotations of the users' objects (GitOps tools
    # would see every annotation write as drift).
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf.progress")
    settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage(
        field="status.kopf.lastHandledConfiguration")
    settings.persistence.finalizer = C.FINALIZER
    # The operator posts its own Events for transitions and failures; kopf's only for errors.
    settings.posting.level = logging.WARNING
    # The HTTP clients' own debug lines would drown the operator's in --verbose/--debug.
    for noisy in ("httpx", "httpcore", "kubernetes_asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    rt = runtime(memo)
    if getattr(memo, "metrics_port", None) is None:
        memo.metrics_port = metrics.serve() or 0


@kopf.on.startup()
async def serve_catalog(memo: kopf.Memo, **_: Any) -> None:
    """The adapter catalog (catalog.py) starts before the leader election: standbys answer too."""
    if getattr(memo, "catalog", None) is None:
        memo.catalog = await catalog.serve(runtime(memo))


@kopf.on.startup()
async def elect_leader(memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Block kopf's start until this process holds the Lease: before that it watches nothing
    and changes nothing. Losing the Lease later ends the process (its pod restarts as a
    candidate), as client-go's leader election does."""
    who = lease.identity_from_env()
    if who is None:
        logger.warning("leader election off (no POD_NAMESPACE): run one operator only")
        return
    try:
        configuration = await kube.load_configuration()
    except kube.ConfigException as e:
        raise kopf.PermanentError(f"leader election: no credentials: {e}") from e
    # A standby reads for the adapter catalog (catalog.py) with a client of its own until kopf's
    # login (after the election) replaces it.
    runtime(memo).set_client(kube.KubeClient(configuration))
    cfg = runtime(memo).config
    election = lease.Election(kube.KubeClient(configuration), who[0], who[1], cfg.lease_duration,
                              cfg.lease_renew_deadline, cfg.lease_retry_period)
    await election.acquire()
    memo.election = election

    def lost() -> None:
        logger.error("leader election: lost the Lease; exiting so that exactly one operator acts")
        logging.shutdown()
        os._exit(1)
    memo.election_task = asyncio.get_running_loop().create_task(election.keep(lost))


@kopf.on.login()
async def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """One set of credentials for kopf's watches and the operator's own calls, loaded by
    kubernetes_asyncio (service account, else kubeconfig with exec plugins and client
    certificates). kopf logs in again on a 401; the operator's client is then made afresh too."""
    try:
        configuration = await kube.load_configuration()
    except kube.ConfigException as e:
        raise kopf.LoginError(f"no in-cluster service account and no usable kubeconfig: {e}") from e
    runtime(memo).set_client(kube.KubeClient(configuration))
    return await connection_info(configuration)


async def connection_info(configuration: Any) -> kopf.ConnectionInfo:
    """kopf's view of a kubernetes_asyncio Configuration: what kopf.login_via_async_client does,
    from our own Configuration rather than the library's process-wide default."""
    header = await configuration.get_api_key_with_prefix("BearerToken") or ""
    scheme, _, token = header.partition(" ")  # "Bearer <token>", or "Basic <user:password>"
    return kopf.ConnectionInfo(
        server=configuration.host, ca_path=configuration.ssl_ca_cert, insecure=not configuration.verify_ssl,
        scheme=scheme if token else None, token=token or scheme or None,
        certificate_path=configuration.cert_file, private_key_path=configuration.key_file)


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    election = getattr(memo, "election", None)
    if election is not None:
        memo.election_task.cancel()
        await election.release()
        await election.kube.aclose()
    if getattr(memo, "catalog", None) is not None:
        await memo.catalog.cleanup()
    await runtime(memo).aclose()


# --- indexes -----------------------------------------------------------------------------------

@kopf.index("pods", labels=ENGINE_POD_LABELS)
def engine_pods(namespace: str, labels: Mapping, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels[C.LABEL_BASE]): S.pod_view(plain(body))}


@kopf.index(**BMD)
def base_models(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict:
    b = plain(body)
    return {(namespace, name): {"metadata": b["metadata"], "spec": b.get("spec") or {}}}


@kopf.index(**LORA)
def lora_adapters(namespace: str, name: str, spec: Mapping, meta: Mapping, status: Mapping, **_: Any) -> dict:
    st = {k: plain(v) for k, v in status.items() if k != "kopf"}
    return {(namespace, spec.get("baseModel")): {
        "name": name,
        "uid": meta.get("uid"),
        "spec": plain(spec),
        "deleting": bool(meta.get("deletionTimestamp")),
        "generation": meta.get("generation"),
        "status": st,
    }}


# --- wake-ups ----------------------------------------------------------------------------------

@kopf.on.event("pods", labels=ENGINE_POD_LABELS)
def engine_pod_changed(namespace: str, labels: Mapping, memo: kopf.Memo, **_: Any) -> None:
    runtime(memo).wakers.wake(Wake("pods", namespace, labels[C.LABEL_BASE]))


@kopf.on.event("apps", "v1", "deployments", labels={C.LABEL_MANAGED_BY: C.MANAGED_BY, C.LABEL_BASE: kopf.PRESENT})
def engine_deployment_changed(namespace: str, labels: Mapping, memo: kopf.Memo, **_: Any) -> None:
    rt = runtime(memo)
    rt.owned.stale.add(Key(namespace, labels[C.LABEL_BASE]))  # re-read (and repair) it next pass
    rt.wakers.wake(Wake("base", namespace, labels[C.LABEL_BASE]))


@kopf.on.event(**LORA)
async def adapter_changed(event: Mapping, body: kopf.Body, namespace: str, spec: Mapping, memo: kopf.Memo,
                          base_models: kopf.Index, **_: Any) -> None:
    rt = runtime(memo)
    base = spec.get("baseModel")
    rt.wakers.wake(Wake("base", namespace, base))
    if event.get("type") != "DELETED" and _base(base_models, namespace, base) is None:
        await R.reconcile_orphan(rt, plain(body))


@kopf.on.event(**BMD)
async def base_changed(event: Mapping, namespace: str, name: str, memo: kopf.Memo,
                       lora_adapters: kopf.Index, **_: Any) -> None:
    rt = runtime(memo)
    rt.wakers.wake(Wake("base", namespace, name))
    if event.get("type") == "DELETED":
        rt.adapter_rates.forget(namespace, name)
        rt.revision_counters.forget(namespace, name)
        # Its adapters wait for a base again (GitOps may re-create it).
        for a in _store(lora_adapters, (namespace, name)):
            if not a.get("deleting"):
                await R.reconcile_orphan(rt, publish.adapter_body(namespace, a) | {"spec": a["spec"]}
                                         | {"metadata": {"name": a["name"], "namespace": namespace,
                                                         "uid": a.get("uid"), "generation": a.get("generation")}})


# --- BaseModelDeployment -----------------------------------------------------------------------

def _allowed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> bool:
    """Whether the pod policy (podpolicy.py) accepts the base. A refused one is reported by its
    loop (reconcile_base: phase Failed, nothing applied)."""
    try:
        render.check_spec(plain(body.get("spec")), runtime(memo).engine_images)
        return True
    except podpolicy.PolicyViolation:
        return False


@kopf.on.create(**BMD, when=_allowed)
@kopf.on.update(**BMD, when=_allowed)
async def spec_changed(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    """A new or changed base: its loop applies the owned objects now (the spec is part of what
    owned.ensure_owned compares). The owned objects have one writer, that loop: applying them
    here too would race it with a second view of the same base. (A change handler rather than
    an event handler, so that kopf's bookkeeping in status.kopf stays what it was.)"""
    runtime(memo).wakers.wake(Wake("base", namespace, name))


@kopf.daemon(**BMD, id="reconcile", cancellation_timeout=5.0)
async def base_loop(body: kopf.Body, namespace: str, name: str, memo: kopf.Memo, logger: logging.Logger,
                    engine_pods: kopf.Index, lora_adapters: kopf.Index, **_: Any) -> None:
    rt = runtime(memo)
    ev = rt.wakers.register([Wake("base", namespace, name), Wake("pods", namespace, name)])
    try:
        while True:
            delay = rt.config.resync_interval
            try:
                delay = await R.reconcile_base(rt, plain(body), _store(engine_pods, (namespace, name)),
                                               _store(lora_adapters, (namespace, name)))
                metrics.RECONCILES.labels(kind="BaseModelDeployment", result="ok").inc()
            except Exception as e:  # noqa: BLE001 - keep the loop alive; the next pass retries
                metrics.RECONCILES.labels(kind="BaseModelDeployment", result="error").inc()
                logger.warning(f"reconcile of {namespace}/{name} failed: {e!r}")
                delay = backoff.exponential(1, max(rt.config.backoff_base, 1.0), rt.config.resync_interval)
            pause = min(rt.config.min_pass_interval, delay)
            await asyncio.sleep(pause)
            await rt.wakers.sleep(ev, max(delay - pause, 0.0))
    finally:
        rt.wakers.unregister(ev)


@kopf.timer(**BMD, id="autoscale", interval=CONFIG.autoscale_interval)
async def observe(body: kopf.Body, namespace: str, name: str, memo: kopf.Memo,
                  engine_pods: kopf.Index, lora_adapters: kopf.Index, **_: Any) -> None:
    """Every base, each autoscale interval: the engines' /metrics read once, for the autoscaler
    (when enabled and KEDA does not own the replicas) and the adapters' request rates; a changed
    warm count of a `replicas: auto` adapter wakes the base's pass to place it (scaling.py)."""
    rt = runtime(memo)
    if await scaling.observe_base(rt, plain(body), _store(engine_pods, (namespace, name)),
                                  _store(lora_adapters, (namespace, name))):
        rt.wakers.wake(Wake("base", namespace, name))


# --- LoraAdapter -------------------------------------------------------------------------------

@kopf.on.delete(**LORA)
async def unload(body: kopf.Body, spec: kopf.Spec, namespace: str, name: str, retry: int, memo: kopf.Memo,
                 base_models: kopf.Index, engine_pods: kopf.Index, logger: logging.Logger, **_: Any) -> None:
    rt = runtime(memo)
    base_name = spec.get("baseModel")
    snapshot = plain(body)
    failed = await sync.unload_adapter(rt, snapshot, _base(base_models, namespace, base_name),
                                    _store(engine_pods, (namespace, base_name)))
    rt.wakers.wake(Wake("base", namespace, base_name))
    metrics.RECONCILES.labels(kind="LoraAdapter", result="error" if failed else "ok").inc()
    if failed and retry + 1 < rt.config.unload_attempts:
        raise kopf.TemporaryError(f"could not unload from {failed}", delay=rt.config.unload_retry_delay)
    if failed:
        # Never block the deletion forever: a pod that cannot be reached now has the adapter
        # until its engine restarts (the ConfigMap and the operator no longer list it).
        await publish.post_events(rt.kube, snapshot, [("Warning", "UnloadIncomplete",
                                                       f"gave up after {retry + 1} attempts: {'; '.join(failed)}")])
        logger.warning(f"adapter {namespace}/{name}: unload incomplete on {failed}")
