"""Phases, conditions and Events from observed state (pure functions)."""
from __future__ import annotations

from loraplex.operator import status as S

MAX = 3


def pod(name: str, state: str, failures: int = 0, message: str = "", boot: str = "b1") -> dict:
    return {"name": name, "state": state, "failures": failures, "message": message, "bootId": boot}


def test_adapter_phases():
    v = S.adapter_verdict
    assert v([], MAX).phase == "Pending"
    assert v([pod("a", "device"), pod("b", "registered")], MAX).phase == "Ready"
    assert v([pod("a", "loading"), pod("b", "loading")], MAX).phase == "Loading"
    assert v([pod("a", "device"), pod("b", "loading")], MAX).phase == "Degraded"
    assert v([pod("a", "failed", 1, "x"), pod("b", "loading")], MAX).phase == "Loading"
    assert v([pod("a", "failed", MAX, "x"), pod("b", "failed", MAX, "x")], MAX).phase == "Failed"
    assert v([pod("a", "failed", MAX, "x"), pod("b", "device")], MAX).phase == "Degraded"
    assert v([pod("a", "unreachable", 0, "refused")], MAX).phase == "Loading"
    d = v([pod("a", "device"), pod("b", "failed", MAX, "use_dora unsupported")], MAX)
    assert (d.ready, d.total) == (1, 2) and "use_dora unsupported" in d.ready_message


def test_adapter_status_carries_the_engine_message():
    st = S.adapter_status(generation=2, accepted=(True, "Accepted", ""), digest="d",
                          pods=[pod("p1", "failed", MAX, "adapter_config.json: use_dora is not supported")],
                          max_failures=MAX, old=None, now="2026-01-01T00:00:00Z")
    assert st["phase"] == "Failed" and st["observedGeneration"] == 2
    ready = S.get_condition(st, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "LoadFailed"
    assert "use_dora is not supported" in ready["message"]
    assert S.get_condition(st, "Accepted")["status"] == "True"


def test_not_accepted():
    st = S.adapter_status(generation=1, accepted=(False, "BaseNotFound", "no base"), pods=[], digest=None,
                          max_failures=MAX, old=None, problem_phase="Pending")
    assert st["phase"] == "Pending"
    assert S.get_condition(st, "Accepted")["reason"] == "BaseNotFound"


def test_conditions_keep_transition_time_and_status_is_stable():
    kw = dict(generation=1, accepted=(True, "Accepted", ""), digest="d", max_failures=MAX)
    first = S.adapter_status(pods=[pod("p", "device")], old=None, now="T1", **kw)
    again = S.adapter_status(pods=[pod("p", "device")], old=first, now="T2", **kw)
    assert again == first and not S.differs(first, again), "nothing changed: nothing to write"
    later = S.adapter_status(pods=[pod("p", "loading")], old=first, now="T3", **kw)
    assert S.get_condition(later, "Ready")["lastTransitionTime"] == "T3"
    assert S.get_condition(later, "Accepted")["lastTransitionTime"] == "T1"
    assert S.differs(first, later)


def test_adapter_events():
    kw = dict(generation=1, accepted=(True, "Accepted", ""), digest="d", max_failures=MAX)
    ready = S.adapter_status(pods=[pod("p", "device", boot="b1")], old=None, **kw)
    events = S.adapter_events(None, ready)
    assert ("Normal", "Ready") in [(t, r) for t, r, _ in events]
    assert S.adapter_events(ready, ready) == [], "no transition, no Event"
    restarted = S.adapter_status(pods=[pod("p", "device", boot="b2")], old=ready, **kw)
    assert S.adapter_events(ready, restarted) == [], "restarts are reported where they are detected"
    failing = S.adapter_status(pods=[pod("p", "failed", 1, "boom", boot="b2")], old=restarted, **kw)
    ev = S.adapter_events(restarted, failing)
    assert ("Warning", "LoadFailed") in [(t, r) for t, r, _ in ev]
    assert any("boom" in m for _, _, m in ev)
    again = S.adapter_status(pods=[pod("p", "failed", 2, "boom", boot="b2")], old=failing, **kw)
    assert [r for _, r, _ in S.adapter_events(failing, again)] == ["LoadFailed"], "each attempt is reported"


def test_pod_view():
    body = {"metadata": {"name": "e-1", "uid": "u"},
            "spec": {"containers": [{"name": "sidecar", "ports": [{"containerPort": 9999}]},
                                    {"name": "engine", "ports": [{"name": "metrics", "containerPort": 9100},
                                                                 {"name": "http", "containerPort": 8123}]}]},
            "status": {"phase": "Running", "podIP": "10.1.2.3",
                       "conditions": [{"type": "Ready", "status": "True"}]}}
    v = S.pod_view(body)
    assert (v.name, v.ip, v.port, v.ready, v.target) == ("e-1", "10.1.2.3", 8123, True, True)
    body["status"]["conditions"][0]["status"] = "False"
    assert not S.pod_view(body).target
    body["status"]["conditions"][0]["status"] = "True"
    body["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert not S.pod_view(body).target
    assert S.pod_view({"metadata": {"name": "x"}, "spec": {}, "status": {}}).port == 8080


def _base_status(ready: int, present: int, desired: int, **kw):
    pods = [S.PodView(name=f"p{i}", uid="", ip=f"10.0.0.{i}", port=8080, ready=i < ready) for i in range(present)]
    return S.base_status(bmd={"metadata": {"generation": 4}}, pods=pods, desired_replicas=desired, adapters=2,
                         endpoint="http://x", selector="a=b", deployment=kw.get("deployment"),
                         render_error=kw.get("render_error"), old=None)


def test_base_status():
    st = _base_status(2, 2, 2)
    assert (st["phase"], st["readyReplicas"], st["replicas"], st["observedGeneration"]) == ("Ready", 2, 2, 4)
    assert S.get_condition(st, "Available")["status"] == "True"
    assert S.get_condition(st, "Progressing")["status"] == "False"
    assert _base_status(1, 2, 2)["phase"] == "Degraded"
    assert _base_status(0, 1, 1)["phase"] == "Pending"
    stuck = {"status": {"conditions": [{"type": "Progressing", "status": "False",
                                        "reason": "ProgressDeadlineExceeded", "message": "quota"}]}}
    st = _base_status(0, 0, 1, deployment=stuck)
    assert st["phase"] == "Failed" and S.get_condition(st, "Progressing")["reason"] == "ProgressDeadlineExceeded"
    st = _base_status(0, 0, 1, render_error="ingress.host is required")
    assert st["phase"] == "Failed" and "ingress.host" in S.get_condition(st, "Degraded")["message"]
    assert [r for _, r, _ in S.base_events(_base_status(0, 1, 1), _base_status(1, 1, 1))] == ["Ready"]
