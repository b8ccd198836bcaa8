"""Scale to zero through the KEDA HTTP add-on (scaletozero.py): the HTTPScaledObject and the wake
Service the operator renders, checked against the add-on's own CRD (vendored from
kedacore/http-add-on v0.15.0 in tests/operator/data/) and the Kubernetes schemas
(kubernetes-validate); the ScaleToZero condition; the way back from zero."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from loraplex.operator import render
from loraplex.operator import scaletozero as Z
from loraplex.operator import status as S
from loraplex.operator.constants import Key

from .crd_tools import admit_foreign
from .test_deploy_files import KUBE_VERSIONS

KEDA_CRD = Path(__file__).parent / "data" / "http.keda.sh_httpscaledobjects.yaml"


def bmd(spec: dict | None = None, name: str = "llama", ns: str = "team-a") -> dict:
    return {"apiVersion": "loraplex.dev/v1alpha1", "kind": "BaseModelDeployment",
            "metadata": {"name": name, "namespace": ns, "uid": "uid-1", "generation": 2},
            "spec": {"model": {"id": "org/m"}, **(spec or {})}}


ZERO = {"autoscaling": {"enabled": True, "minReplicas": 0, "maxReplicas": 3, "scaleDownStabilizationSeconds": 120,
                        "scaleToZero": {"targetConcurrency": 4, "wakeTimeoutSeconds": 300}},
        "service": {"port": 8000}, "ingress": {"enabled": True, "host": "llm.example.com", "className": "nginx"}}


def keda_crd() -> dict:
    (crd,) = [d for d in yaml.safe_load_all(KEDA_CRD.read_text()) if d]
    return crd


def k8s_errors(obj: dict) -> list[str]:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (test extra)")
    errors = []
    for version in KUBE_VERSIONS:
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as e:
            errors.append(f"{obj['kind']} (Kubernetes {version}): {str(e).splitlines()[0]}")
    return errors


def test_requested_only_with_autoscaling_and_min_zero():
    assert Z.requested(ZERO)
    assert not Z.requested({"autoscaling": {"enabled": False, "minReplicas": 0}})
    assert not Z.requested({"autoscaling": {"enabled": True, "minReplicas": 1}})
    assert not Z.requested(None)


def test_the_vendored_crd_is_a_valid_crd_of_the_add_on():
    crd = keda_crd()
    assert crd["metadata"]["name"] == f"{Z.PLURAL}.http.keda.sh" and crd["spec"]["group"] == "http.keda.sh"
    assert [v["name"] for v in crd["spec"]["versions"] if v["served"]] == [Z.KEDA_HTTP_API.split("/")[1]]
    assert k8s_errors(crd) == []


def test_http_scaled_object_targets_the_deployment_and_service_and_is_admitted():
    hso = Z.render_http_scaled_object(bmd(ZERO))
    assert (hso["apiVersion"], hso["kind"]) == ("http.keda.sh/v1alpha1", "HTTPScaledObject")
    assert hso["metadata"]["name"] == "llama" and hso["metadata"]["namespace"] == "team-a"
    assert hso["metadata"]["ownerReferences"] == [render.owner_reference(bmd(ZERO))]
    spec = hso["spec"]
    assert spec["scaleTargetRef"] == {"name": "llama", "kind": "Deployment", "apiVersion": "apps/v1",
                                      "service": "llama", "port": 8000}
    assert spec["replicas"] == {"min": 0, "max": 3}
    assert spec["scalingMetric"] == {"concurrency": {"targetValue": 4}}
    assert spec["scaledownPeriod"] == 120 and spec["timeouts"] == {"conditionWait": "300s"}
    assert spec["hosts"] == ["llama-wake", "llama-wake.team-a", "llama-wake.team-a.svc",
                             "llama-wake.team-a.svc.cluster.local", "llm.example.com"]
    _, errors = admit_foreign(keda_crd(), hso)
    assert errors == []
    # The check has teeth: an unknown field, a wrong type and a scaleTargetRef without a port.
    bad = Z.render_http_scaled_object(bmd(ZERO))
    bad["spec"]["replica"] = bad["spec"].pop("replicas")
    assert any("'replica' was unexpected" in e for e in admit_foreign(keda_crd(), bad)[1])
    bad = Z.render_http_scaled_object(bmd(ZERO))
    bad["spec"]["scaledownPeriod"] = "2m"
    assert any("is not of type 'integer'" in e for e in admit_foreign(keda_crd(), bad)[1])
    bad = Z.render_http_scaled_object(bmd(ZERO))
    del bad["spec"]["scaleTargetRef"]["port"]
    assert admit_foreign(keda_crd(), bad)[1] == ["must define either the 'portName' or the 'port'"]


def test_the_wake_service_and_the_ingress_lead_to_the_interceptor():
    svc = Z.render_wake_service(bmd(ZERO))
    assert svc["metadata"]["name"] == "llama-wake"
    assert svc["spec"] == {"type": "ExternalName",
                           "externalName": "keda-add-ons-http-interceptor-proxy.keda.svc.cluster.local",
                           "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}
    other = Z.render_wake_service(bmd({**ZERO, "autoscaling": {**ZERO["autoscaling"], "scaleToZero": {
        "interceptor": {"namespace": "keda-system", "service": "proxy", "port": 9000}}}}))
    assert other["spec"]["externalName"] == "proxy.keda-system.svc.cluster.local"
    ing = render.render_ingress(bmd(ZERO), Z.entry(bmd(ZERO)))
    assert ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"] == \
        {"name": "llama-wake", "port": {"number": 8080}}
    assert k8s_errors(svc) == [] and k8s_errors(ing) == []
    longest = bmd(ZERO, name="b" * 52)
    assert len(Z.render_wake_service(longest)["metadata"]["name"]) <= 63, "a DNS label"


def test_condition_says_why_scale_to_zero_is_unavailable():
    assert Z.condition(bmd(), installed=True) is None, "not asked for: no condition"
    missing = Z.condition(bmd(ZERO), installed=False)
    assert (missing["type"], missing["status"], missing["reason"]) == ("ScaleToZero", "False",
                                                                      "KEDAHTTPAddonNotInstalled")
    assert "keda-add-ons-http" in missing["message"] and "keeps at least 1 replica" in missing["message"]
    ok = Z.condition(bmd(ZERO), installed=True)
    assert (ok["status"], ok["reason"]) == ("True", "HandedToKEDA") and "llama-wake:8080" in ok["message"]
    # The failure is an Event on the base too (status.base_events).
    old = {"conditions": []}
    new = {"phase": "Ready", "conditions": [missing]}
    assert ("Warning", "KEDAHTTPAddonNotInstalled", missing["message"]) in S.base_events(old, new)


def test_from_zero_measures_scale_up_to_first_ready_pod():
    st = Z.FromZero()
    st, s = Z.observe(st, 1, 1, now=0)
    assert s is None and st == Z.FromZero(), "a base that never was at zero has nothing to report"
    st, _ = Z.observe(st, 0, 0, now=10)
    assert st.at_zero
    st, s = Z.observe(st, 1, 0, now=20)                    # KEDA scaled it up
    assert s is None and st.started == 20
    st, s = Z.observe(st, 1, 0, now=25)
    assert s is None
    st, s = Z.observe(st, 2, 1, now=32.5)                  # the first Ready pod
    assert s == 12.5 and st == Z.FromZero()
    st, s = Z.observe(Z.FromZero(at_zero=True), 1, 1, now=5)
    assert s is None, "the scale-up was not seen: nothing true to report"
    st, s = Z.observe(Z.FromZero(started=3), 0, 0, now=5)
    assert st == Z.FromZero(at_zero=True), "back to zero before a pod was Ready: start again"
    state = Z.ZeroState()
    for replicas, ready, now, expect in ((0, 0, 0, None), (1, 0, 1, None), (1, 1, 4, 3.0)):
        assert state.observe(Key("ns", "b"), replicas, ready, now) == expect


def test_base_status_carries_the_seconds():
    st = S.base_status(bmd=bmd(ZERO), pods=[], desired_replicas=0, adapters=0, endpoint="e", selector="s",
                       deployment=None, render_error=None, old=None, from_zero_seconds=12.345)
    assert st["lastScaleFromZeroSeconds"] == 12.3 and st["phase"] == "Ready", "at zero on purpose: Ready"
    st = S.base_status(bmd=bmd(ZERO), pods=[], desired_replicas=0, adapters=0, endpoint="e", selector="s",
                       deployment=None, render_error=None, old=None)
    assert "lastScaleFromZeroSeconds" not in st, "not measured in this pass: the last one stays"
    assert ("Normal", "ScaledFromZero", "first engine pod Ready 12.3 s after the scale-up from zero") in \
        S.base_events({"phase": "Ready"}, {"phase": "Ready", "lastScaleFromZeroSeconds": 12.3})
    assert not [e for e in S.base_events({"phase": "Ready", "lastScaleFromZeroSeconds": 12.3},
                                         {"phase": "Ready", "lastScaleFromZeroSeconds": 12.3})]
