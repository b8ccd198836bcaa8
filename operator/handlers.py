"""kopf handlers: thin, one per concern. The work is in reconcile.py (and the pure modules).

- indexes: engine pods, BaseModelDeployments and LoraAdapters by (namespace, base), in memory;
- BaseModelDeployment: create/update handlers apply each owned object (ConfigMap, Deployment,
  Service, Ingress); a daemon re-reconciles them and writes status, woken by pod, Deployment and
  adapter events or every resync interval; a timer autoscales when autoscaling is enabled;
- LoraAdapter: create/update handlers put the manifest into the base's ConfigMap; a daemon per
  adapter pushes it to every ready engine pod and tracks each pod; on deletion a finalizer
  handler unloads it (bounded retries, never stuck when the pods or the base are gone).

kopf keeps its own bookkeeping (handler progress, the diff base) in `status.kopf` of the custom
resources, never in annotations: the operator writes only `status` and its finalizer.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf

from . import constants as C
from . import reconcile as R
from . import status as S
from .config import OperatorConfig
from .runtime import Runtime

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
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    runtime(memo)


@kopf.on.login()
def login(memo: kopf.Memo, **kwargs: Any) -> kopf.ConnectionInfo:
    info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    if info is None:
        raise kopf.LoginError("no in-cluster service account and no kubeconfig")
    runtime(memo).set_credentials(info)
    return info


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
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
    return {(namespace, spec.get("baseModel")): {
        "name": name,
        "spec": plain(spec),
        "deleting": bool(meta.get("deletionTimestamp")),
        "generation": meta.get("generation"),
        "phase": status.get("phase"),
        "observedGeneration": status.get("observedGeneration"),
    }}


# --- wake-ups ----------------------------------------------------------------------------------

@kopf.on.event("pods", labels=ENGINE_POD_LABELS)
def engine_pod_changed(namespace: str, labels: Mapping, memo: kopf.Memo, **_: Any) -> None:
    runtime(memo).wakers.wake(("pods", namespace, labels[C.LABEL_BASE]))


@kopf.on.event("apps", "v1", "deployments", labels={C.LABEL_MANAGED_BY: C.MANAGED_BY, C.LABEL_BASE: kopf.PRESENT})
def engine_deployment_changed(namespace: str, labels: Mapping, memo: kopf.Memo, **_: Any) -> None:
    runtime(memo).wakers.wake(("base", namespace, labels[C.LABEL_BASE]))


@kopf.on.event(**LORA)
def adapter_changed(namespace: str, spec: Mapping, memo: kopf.Memo, **_: Any) -> None:
    runtime(memo).wakers.wake(("base", namespace, spec.get("baseModel")))


@kopf.on.event(**BMD)
def base_changed(event: Mapping, namespace: str, name: str, meta: Mapping, memo: kopf.Memo, **_: Any) -> None:
    # A base that appears, goes, or changes its spec: its adapters re-validate now.
    rt = runtime(memo)
    generation = meta.get("generation")
    if event.get("type") != "MODIFIED" or rt.seen_generations.get((namespace, name)) != generation:
        rt.seen_generations[(namespace, name)] = generation
        rt.wakers.wake(("adapters-of", namespace, name))


# --- BaseModelDeployment -----------------------------------------------------------------------

@kopf.on.create(**BMD)
@kopf.on.update(**BMD)
async def apply_configmap(body: kopf.Body, namespace: str, name: str, memo: kopf.Memo,
                          lora_adapters: kopf.Index, **_: Any) -> None:
    await R.ensure_configmap(runtime(memo), plain(body), lambda: _store(lora_adapters, (namespace, name)))


@kopf.on.create(**BMD)
@kopf.on.update(**BMD)
async def apply_deployment(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await R.ensure_deployment(runtime(memo), plain(body))


@kopf.on.create(**BMD)
@kopf.on.update(**BMD)
async def apply_service(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await R.ensure_service(runtime(memo), plain(body))


@kopf.on.create(**BMD)
@kopf.on.update(**BMD)
async def apply_ingress(body: kopf.Body, namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    try:
        await R.ensure_ingress(runtime(memo), plain(body))
    except ValueError as e:
        raise kopf.PermanentError(str(e)) from e
    finally:
        runtime(memo).wakers.wake(("base", namespace, name))


@kopf.daemon(**BMD, id="reconcile", cancellation_timeout=5.0)
async def base_loop(body: kopf.Body, namespace: str, name: str, memo: kopf.Memo, logger: logging.Logger,
                    engine_pods: kopf.Index, lora_adapters: kopf.Index, **_: Any) -> None:
    rt = runtime(memo)
    ev = rt.wakers.register([("base", namespace, name), ("pods", namespace, name)])
    try:
        while True:
            try:
                await R.reconcile_base(rt, plain(body), _store(engine_pods, (namespace, name)),
                                       lambda: _store(lora_adapters, (namespace, name)))
            except Exception as e:  # noqa: BLE001 - keep the loop alive; the next pass retries
                logger.warning(f"reconcile of {namespace}/{name} failed: {e!r}")
            await rt.wakers.sleep(ev, rt.config.resync_interval)
    finally:
        rt.wakers.unregister(ev)


def _autoscaling_enabled(spec: Mapping, **_: Any) -> bool:
    return bool((spec.get("autoscaling") or {}).get("enabled"))


@kopf.timer(**BMD, id="autoscale", interval=CONFIG.autoscale_interval, when=_autoscaling_enabled)
async def autoscale(body: kopf.Body, namespace: str, name: str, memo: kopf.Memo,
                    engine_pods: kopf.Index, **_: Any) -> None:
    await R.autoscale_base(runtime(memo), plain(body), _store(engine_pods, (namespace, name)))


# --- LoraAdapter -------------------------------------------------------------------------------

@kopf.on.create(**LORA)
@kopf.on.update(**LORA)
async def register_manifest(spec: kopf.Spec, namespace: str, name: str, memo: kopf.Memo,
                            base_models: kopf.Index, lora_adapters: kopf.Index, **_: Any) -> None:
    rt = runtime(memo)
    base = _base(base_models, namespace, spec.get("baseModel"))
    if base is not None:
        await R.ensure_configmap(rt, base, lambda: _store(lora_adapters, (namespace, spec.get("baseModel"))))
    rt.wakers.wake(("lora", namespace, name))


@kopf.daemon(**LORA, id="sync", cancellation_timeout=5.0)
async def adapter_loop(body: kopf.Body, namespace: str, name: str, memo: kopf.Memo, logger: logging.Logger,
                       base_models: kopf.Index, engine_pods: kopf.Index, lora_adapters: kopf.Index,
                       **_: Any) -> None:
    rt = runtime(memo)
    ev, keys = None, None
    try:
        while True:
            snapshot = plain(body)
            base_name = (snapshot.get("spec") or {}).get("baseModel")
            wanted = [("lora", namespace, name), ("pods", namespace, base_name), ("adapters-of", namespace, base_name)]
            if wanted != keys:
                if ev is not None:
                    rt.wakers.unregister(ev)
                ev, keys = rt.wakers.register(wanted), wanted
            delay = rt.config.resync_interval
            try:
                delay = await R.reconcile_adapter(
                    rt, snapshot, _base(base_models, namespace, base_name),
                    lambda: _store(lora_adapters, (namespace, base_name)), _store(engine_pods, (namespace, base_name)))
            except Exception as e:  # noqa: BLE001 - keep the loop alive; the next pass retries
                logger.warning(f"sync of adapter {namespace}/{name} failed: {e!r}")
                delay = min(rt.config.resync_interval, max(rt.config.backoff_base, 1.0))
            await rt.wakers.sleep(ev, delay)
    finally:
        if ev is not None:
            rt.wakers.unregister(ev)


@kopf.on.delete(**LORA)
async def unload(body: kopf.Body, spec: kopf.Spec, namespace: str, name: str, retry: int, memo: kopf.Memo,
                 base_models: kopf.Index, engine_pods: kopf.Index, lora_adapters: kopf.Index,
                 logger: logging.Logger, **_: Any) -> None:
    rt = runtime(memo)
    base_name = spec.get("baseModel")
    snapshot = plain(body)
    failed = await R.unload_adapter(rt, snapshot, _base(base_models, namespace, base_name),
                                    lambda: _store(lora_adapters, (namespace, base_name)),
                                    _store(engine_pods, (namespace, base_name)))
    rt.wakers.wake(("base", namespace, base_name))
    if failed and retry + 1 < rt.config.unload_attempts:
        raise kopf.TemporaryError(f"could not unload from {failed}", delay=rt.config.unload_retry_delay)
    if failed:
        # Never block the deletion forever: a pod that cannot be reached now re-reads the
        # ConfigMap (which no longer lists the adapter) when its engine restarts.
        await R.post_events(rt, snapshot, [("Warning", "UnloadIncomplete",
                                            f"gave up after {retry + 1} attempts: {'; '.join(failed)}")])
        logger.warning(f"adapter {namespace}/{name}: unload incomplete on {failed}")
