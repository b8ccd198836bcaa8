"""The traffic decision of a LoraAdapter with revisions (traffic.plan_traffic, rollout.py): the
three modes, the warm-before-shift gate, the rollout's steps and analysis, and that the plan is a
function of its inputs (fed its own status back, it changes nothing and posts nothing)."""
from __future__ import annotations

import datetime as dt

import pytest

from loraplex.operator.traffic import Readiness, RevisionHealth, plan_traffic

T0 = dt.datetime(2025, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
READY, LOADING = Readiness(True), Readiness(False)
ROLLOUT = {"steps": [10, 50, 100], "stepSeconds": 300, "maxErrorRatio": 1.5, "maxTTFTRatio": 1.5, "minRequests": 20}


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def cond(plan, type_):
    (c,) = [c for c in plan.conditions if c["type"] == type_]
    return c


def split(plan) -> dict[int, int]:
    return {e["revision"]: e["percent"] for e in plan.traffic}


def merge_patch(target, patch):
    """RFC 7386, as the API server applies the operator's status patches: a key left out of an
    object keeps its old value, None deletes it, lists are replaced."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def status_of(plan, old: dict | None = None) -> dict:
    """The status after the operator's merge patch of a plan (what the next pass reads): stale
    keys of an older status.rollout stay, so the decision must not depend on their absence."""
    return merge_patch(old or {}, {"traffic": plan.traffic, "conditions": plan.conditions, "rollout": plan.rollout})


def plan(spec, status, latest, known=None, readiness=None, health=None, now=T0):
    return plan_traffic(spec, status, latest, set(known or range(1, latest + 1)), readiness or {}, health or {}, now)


def assert_settled(spec, status, latest, known=None, readiness=None, health=None, now=T0):
    """Fed its own status back at the same time, the plan is the same and posts no event."""
    again = plan(spec, status, latest, known, readiness, health, now)
    assert again.traffic == status["traffic"] and again.rollout == status.get("rollout")
    assert again.events == []
    return again


# --- no spec.traffic, no spec.rollout -----------------------------------------------------------


def test_first_revision_gets_everything_at_once_even_while_warming():
    p = plan({}, {}, 1, readiness={1: LOADING})
    assert p.traffic == [{"revision": 1, "percent": 100, "latestRevision": True}]
    assert p.serve == [1] and p.rollout is None and p.events == []
    assert cond(p, "TrafficReady")["status"] == "True"


def test_a_new_revision_warms_before_it_takes_the_traffic():
    s1 = status_of(plan({}, {}, 1, readiness={1: READY}))
    warming = plan({}, s1, 2, readiness={1: READY, 2: LOADING})
    assert split(warming) == {1: 100} and "latestRevision" not in warming.traffic[0], "1 is no longer the latest"
    assert warming.serve == [1, 2], "the new revision is loaded meanwhile"
    c = cond(warming, "TrafficReady")
    assert (c["status"], c["reason"]) == ("False", "RevisionNotReady") and "revision 1 100 %" in c["message"]
    assert warming.events == [], "warming is expected: no Warning"
    s2 = status_of(warming, s1)
    assert_settled({}, s2, 2, readiness={1: READY, 2: LOADING})
    shifted = plan({}, s2, 2, readiness={1: READY, 2: READY})
    assert shifted.traffic == [{"revision": 2, "percent": 100, "latestRevision": True}] and shifted.serve == [2]
    assert shifted.events == [("Normal", "TrafficShifted", "revision 2 100 % (was revision 1 100 %)")]
    assert_settled({}, status_of(shifted, s2), 2, readiness={1: READY, 2: READY})
    # Once it serves, a pod that is not ready for it (a new pod warming) moves nothing back.
    assert split(plan({}, status_of(shifted, s2), 2, readiness={2: LOADING})) == {2: 100}


def test_a_latest_revision_that_fails_to_load_takes_no_traffic():
    s1 = status_of(plan({}, {}, 1))
    p = plan({}, s1, 2, readiness={1: READY, 2: Readiness(False, failed="DoRA is not supported")})
    assert split(p) == {1: 100} and p.serve == [1, 2], "still registered: its failure stays visible"
    c = cond(p, "TrafficReady")
    assert (c["status"], c["reason"]) == ("False", "RevisionFailed") and "DoRA is not supported" in c["message"]
    assert p.events == [("Warning", "RevisionFailed", c["message"])]
    assert_settled({}, status_of(p, s1), 2, readiness={2: Readiness(False, failed="DoRA is not supported")})


# --- spec.traffic ---------------------------------------------------------------------------------


def test_fixed_split_resolves_latest_and_keeps_zero_percent_revisions_loaded():
    s = status_of(plan({}, {}, 2, readiness={2: READY}))
    spec = {"traffic": [{"revision": 1, "percent": 80}, {"latestRevision": True, "percent": 20},
                        {"revision": 3, "percent": 0}]}
    p = plan(spec, s, 3, readiness={1: READY, 2: READY, 3: READY})
    assert p.traffic == [{"revision": 3, "percent": 20, "latestRevision": True}, {"revision": 1, "percent": 80}]
    assert p.serve == [1, 3] and cond(p, "TrafficReady")["reason"] == "Applied"
    # The latestRevision entry and a named entry on the same revision add up.
    same = plan({"traffic": [{"revision": 3, "percent": 30}, {"latestRevision": True, "percent": 70}]}, s, 3,
                readiness={3: READY})
    assert same.traffic == [{"revision": 3, "percent": 100, "latestRevision": True}]
    # A named 0 % revision is loaded (pinnable) but never in status.traffic.
    zero = plan({"traffic": [{"revision": 2, "percent": 100}, {"revision": 1, "percent": 0}]}, s, 2)
    assert zero.traffic == [{"revision": 2, "percent": 100}] and zero.serve == [1, 2]


def test_fixed_split_waits_for_every_revision_it_gives_more_traffic():
    s = status_of(plan({}, {}, 1, readiness={1: READY}))
    spec = {"traffic": [{"revision": 1, "percent": 80}, {"revision": 2, "percent": 20}]}
    waiting = plan(spec, s, 2, readiness={1: READY, 2: LOADING})
    assert split(waiting) == {1: 100} and waiting.serve == [1, 2]
    assert cond(waiting, "TrafficReady")["reason"] == "RevisionNotReady"
    applied = plan(spec, status_of(waiting, s), 2, readiness={1: READY, 2: READY})
    assert split(applied) == {2: 20, 1: 80}
    s2 = status_of(applied, s)
    # Rollback to 100/0: revision 1 is loaded, so it applies at once (revision 2 kept pinnable).
    back = plan({"traffic": [{"revision": 1, "percent": 100}, {"revision": 2, "percent": 0}]}, s2, 2,
                readiness={1: READY, 2: READY})
    assert split(back) == {1: 100} and back.serve == [1, 2]
    assert back.events == [("Normal", "TrafficShifted", "revision 1 100 % (was revision 2 20 %, revision 1 80 %)")]
    # A revision that only loses share needs no readiness: a pod warming revision 1 blocks no
    # shift away from it.
    assert split(plan({"traffic": [{"revision": 2, "percent": 100}]}, s2, 2,
                      readiness={1: LOADING, 2: READY})) == {2: 100}


def test_unknown_revision_keeps_the_last_good_traffic():
    s = status_of(plan({"traffic": [{"revision": 3, "percent": 100}]}, {}, 3, readiness={3: READY}), {})
    p = plan({"traffic": [{"revision": 1, "percent": 50}, {"revision": 3, "percent": 50}]}, s, 3, known={2, 3})
    assert split(p) == {3: 100} and p.serve == [3]
    c = cond(p, "TrafficReady")
    assert (c["status"], c["reason"]) == ("False", "UnknownRevision")
    assert "revision 1, not among the known revisions 2, 3" in c["message"]
    assert p.events == [("Warning", "UnknownRevision", c["message"])]
    assert_settled({"traffic": [{"revision": 1, "percent": 50}, {"revision": 3, "percent": 50}]},
                   status_of(p, s), 3, known={2, 3})


@pytest.mark.parametrize("traffic, words", [
    ([{"revision": 1, "percent": 60}, {"revision": 2, "percent": 30}], "sum to 100, got 90"),
    ([{"revision": 1, "percent": 50}, {"revision": 1, "percent": 50}], "named once"),
    ([{"revision": 1, "latestRevision": True, "percent": 100}], "exactly one of"),
    ([{"latestRevision": True, "percent": 50}, {"latestRevision": True, "percent": 50}], "at most one latestRevision"),
    ([{"revision": 1, "percent": 101}], "integer in [0, 100]"),
    ([], "1 to 16 entries"),
])
def test_invalid_traffic_is_a_condition_not_a_crash(traffic, words):
    s = status_of(plan({}, {}, 2, readiness={2: READY}))
    p = plan({"traffic": traffic}, s, 2)
    c = cond(p, "TrafficReady")
    assert (c["status"], c["reason"]) == ("False", "InvalidTraffic") and words in c["message"]
    assert split(p) == {2: 100}


def test_traffic_and_rollout_together_are_refused():
    s = status_of(plan({}, {}, 1))
    p = plan({"traffic": [{"revision": 1, "percent": 100}], "rollout": {}}, s, 1)
    assert cond(p, "TrafficReady")["reason"] == "InvalidTraffic" and "mutually exclusive" in cond(p, "TrafficReady")["message"]


# --- spec.rollout ---------------------------------------------------------------------------------


def h(requests, errors=0, ttft=0.1, samples=None):
    """Cumulative counters: `requests` of which `errors` failed, the others with `ttft` s each."""
    samples = requests - errors if samples is None else samples
    return RevisionHealth(requests, errors, ttft * samples, samples)


def stable_on(revision: int) -> dict:
    """The status of an adapter whose `revision` holds all the traffic (what a rollout starts from)."""
    return status_of(plan({"traffic": [{"revision": revision, "percent": 100}]}, {}, revision,
                          readiness={revision: READY}))


def test_a_healthy_canary_is_promoted_through_the_steps():
    spec = {"rollout": ROLLOUT}
    s = stable_on(1)
    warming = plan(spec, s, 2, readiness={1: READY, 2: LOADING}, health={1: h(1000)})
    assert split(warming) == {1: 100} and warming.serve == [1, 2], "no traffic before the canary is warm"
    ro = warming.rollout
    assert (ro["revision"], ro["stableRevision"], ro["phase"], ro["step"], ro["percent"]) == (2, 1, "Progressing", "0/3 0%", 0)
    assert warming.events == [("Normal", "RolloutStarted", "revision 2 is the canary against revision 1: steps 10 %, 50 %, 100 %")]
    assert (cond(warming, "Rollout")["status"], cond(warming, "Rollout")["reason"]) == ("True", "Progressing")
    s = status_of(warming, s)
    assert_settled(spec, s, 2, readiness={2: LOADING}, health={1: h(1000)})

    ready = {1: READY, 2: READY}
    step1 = plan(spec, s, 2, readiness=ready, health={1: h(1000), 2: h(0)}, now=at(10))
    assert split(step1) == {2: 10, 1: 90} and step1.requeue_after == 300
    assert step1.rollout["step"] == "1/3 10%" and step1.rollout["stepStartedAt"] == "2025-01-01T12:00:10Z"
    assert step1.rollout["baseline"] == {"1": h(1000).to_status(), "2": h(0).to_status()}
    assert step1.events == [("Normal", "RolloutStep", "revision 2 at 10 % (step 1/3)")]
    s = status_of(step1, s)
    # Mid-step: the same traffic, re-evaluated at the step's end.
    mid = assert_settled(spec, s, 2, readiness=ready, health={1: h(1500), 2: h(50)}, now=at(110))
    assert mid.requeue_after == 200

    # The step's end: 1 error in 100 (1 %) against 1 in 900 (0.1 %): within the 1-point slack.
    end1 = {1: h(1900, errors=1), 2: h(100, errors=1, ttft=0.12)}
    step2 = plan(spec, s, 2, readiness=ready, health=end1, now=at(310))
    assert split(step2) == {2: 50, 1: 50} and step2.rollout["step"] == "2/3 50%"
    (ev,) = step2.events
    assert ev[:2] == ("Normal", "RolloutStep") and "passed step 1/3 (10 %)" in ev[2] and "1.0 % (1/100)" in ev[2]
    assert "mean TTFT 0.120 s" in ev[2]
    s = status_of(step2, s)
    assert_settled(spec, s, 2, readiness=ready, health=end1, now=at(310))

    done = plan(spec, s, 2, readiness=ready, health={1: h(2400, errors=1), 2: h(600, errors=2, ttft=0.12)}, now=at(611))
    assert done.traffic == [{"revision": 2, "percent": 100}] and done.serve == [2]
    ro = done.rollout
    assert (ro["phase"], ro["step"], ro["percent"]) == ("Succeeded", "3/3 100%", 100)
    c = cond(done, "Rollout")
    assert (c["status"], c["reason"]) == ("True", "Promoted") and "passed step 2/3 (50 %)" in c["message"]
    assert done.events == [("Normal", "Promoted", c["message"])]
    s = status_of(done, s)
    assert_settled(spec, s, 2, readiness={2: READY}, now=at(10_000))

    # The next revision is a canary against the promoted one.
    nxt = plan(spec, s, 3, readiness={2: READY, 3: LOADING}, now=at(20_000))
    assert (nxt.rollout["revision"], nxt.rollout["stableRevision"], split(nxt)) == (3, 2, {2: 100})


def rolling_at_step1(canary_health_at_end: RevisionHealth, stable_health_at_end: RevisionHealth):
    spec = {"rollout": ROLLOUT}
    s = status_of(plan(spec, stable_on(1), 2, readiness={1: READY, 2: LOADING}), stable_on(1))
    ready = {1: READY, 2: READY}
    s = status_of(plan(spec, s, 2, readiness=ready, health={1: h(1000), 2: h(0)}), s)
    end = {1: stable_health_at_end, 2: canary_health_at_end}
    return spec, s, plan(spec, s, 2, readiness=ready, health=end, now=at(300))


def test_a_canary_that_errors_more_is_rolled_back():
    # Canary 10 % errors (10/100) against 1 % (9/900) on the stable: limit max(1.5 %, 2 %) = 2 %.
    spec, s, p = rolling_at_step1(h(100, errors=10), h(1900, errors=9))
    assert p.traffic == [{"revision": 1, "percent": 100}] and p.serve == [1, 2], "kept pinnable for a post-mortem"
    ro, c = p.rollout, cond(p, "Rollout")
    assert (ro["phase"], ro["percent"], ro["step"]) == ("RolledBack", 0, "1/3 rolled back")
    assert (c["status"], c["reason"]) == ("False", "CanaryErrorRatio")
    assert "revision 2 errors 10.0 % (10/100), revision 1 1.0 % (9/900), limit 2.0 %" in c["message"]
    assert p.events == [("Warning", "CanaryErrorRatio", c["message"])]
    s = status_of(p, s)
    # Not retried: the same revision stays rolled back whatever its readiness and health.
    assert_settled(spec, s, 2, readiness={1: READY, 2: READY}, health={2: h(10_000)}, now=at(100_000))


def test_a_slow_canary_is_rolled_back_on_ttft():
    spec, s, p = rolling_at_step1(h(100, ttft=0.5), h(1900, ttft=0.1))
    c = cond(p, "Rollout")
    assert (c["status"], c["reason"]) == ("False", "CanaryTTFTRatio")
    assert "revision 2 mean TTFT 0.500 s (100 requests), revision 1 0.100 s (900), limit 1.5 x = 0.150 s" in c["message"]
    assert split(p) == {1: 100} and p.events[0][:2] == ("Warning", "CanaryTTFTRatio")


def test_ttft_is_compared_only_with_enough_samples_on_both_sides():
    # Every canary request failed before its first token except 5: errors decide, TTFT cannot.
    spec, s, p = rolling_at_step1(h(100, errors=0, ttft=5.0, samples=5), h(1900, ttft=0.1))
    assert p.rollout["phase"] == "Progressing" and p.rollout["step"] == "2/3 50%"
    assert "TTFT not compared (fewer than 20 samples on a side)" in p.events[0][2]


def test_a_step_without_enough_canary_traffic_holds():
    spec, s, p = rolling_at_step1(h(7), h(1050))
    assert split(p) == {2: 10, 1: 90} and p.rollout["step"] == "1/3 10%" and p.events == []
    assert "waiting for traffic: 7 of 20 requests in the step" in p.rollout["message"]
    assert p.requeue_after == 30
    assert p.rollout["stepStartedAt"] == s["rollout"]["stepStartedAt"], "the step keeps its start and baseline"


def test_an_engine_restart_counts_the_counters_since_it():
    # The stable's counter went below its baseline (1000 -> 40: its engine restarted): the current
    # value is the increase, so the step is analysed on what the new engine saw.
    spec, s, p = rolling_at_step1(h(100), h(40))
    assert p.rollout["step"] == "2/3 50%"
    assert "revision 1 0.0 % (0/40)" in p.events[0][2]


def test_a_canary_that_fails_to_load_rolls_back_at_once():
    spec = {"rollout": ROLLOUT}
    s = stable_on(1)
    failed = {1: READY, 2: Readiness(False, failed="adapter_config.json: r 512 exceeds max-lora-rank 64")}
    p = plan(spec, s, 2, readiness=failed)
    assert split(p) == {1: 100} and p.serve == [1], "a revision that cannot load is not kept registered"
    c = cond(p, "Rollout")
    assert (c["status"], c["reason"]) == ("False", "CanaryFailedToLoad") and "max-lora-rank 64" in c["message"]
    assert [e[:2] for e in p.events] == [("Normal", "RolloutStarted"), ("Warning", "CanaryFailedToLoad")]
    assert p.rollout["step"] == "0/3 rolled back"
    s = status_of(p, s)
    assert_settled(spec, s, 2, readiness={1: READY})
    # A newer revision is a new canary against the same stable.
    p3 = plan(spec, s, 3, readiness={1: READY, 3: LOADING})
    assert (p3.rollout["revision"], p3.rollout["stableRevision"], p3.rollout["phase"]) == (3, 1, "Progressing")


def test_a_newer_revision_mid_rollout_restarts_from_step_zero_against_the_same_stable():
    spec, s, p = rolling_at_step1(h(100), h(1900))
    s = status_of(p, s)
    assert split(p) == {2: 50, 1: 50}
    p3 = plan(spec, s, 3, readiness={1: READY, 2: READY, 3: LOADING}, now=at(400))
    assert split(p3) == {1: 100}, "the superseded canary's share goes back to the stable"
    assert (p3.rollout["revision"], p3.rollout["stableRevision"], p3.rollout["step"]) == (3, 1, "0/3 0%")
    assert p3.events == [("Normal", "RolloutStarted", "revision 3 is the canary against revision 1: steps "
                                                      "10 %, 50 %, 100 %; revision 2 superseded mid-rollout")]
    assert p3.serve == [1, 3]
    # Its status merges over the superseded rollout's (a stale stepStartedAt and baseline stay):
    # once revision 3 is ready it starts step 1 now, with a fresh baseline.
    s3 = status_of(p3, s)
    assert s3["rollout"]["stepStartedAt"] == s["rollout"]["stepStartedAt"]
    go = plan(spec, s3, 3, readiness={1: READY, 3: READY}, health={1: h(5000), 3: h(0)}, now=at(500))
    assert split(go) == {3: 10, 1: 90} and go.rollout["stepStartedAt"] == "2025-01-01T12:08:20Z"
    assert go.rollout["baseline"]["1"] == h(5000).to_status() and go.requeue_after == 300


def test_steps_short_of_100_promote_after_the_last_and_a_single_100_step_at_once():
    spec = {"rollout": {"steps": [25], "stepSeconds": 60, "minRequests": 1}}
    s = status_of(plan(spec, stable_on(1), 2, readiness={2: LOADING}), stable_on(1))
    s = status_of(plan(spec, s, 2, readiness={2: READY}), s)
    assert split(plan(spec, s, 2, readiness={2: READY})) == {2: 25, 1: 75}
    p = plan(spec, s, 2, readiness={2: READY}, health={1: h(3), 2: h(1)}, now=at(60))
    assert p.rollout["phase"] == "Succeeded" and split(p) == {2: 100} and p.rollout["step"] == "1/1 100%"

    spec = {"rollout": {"steps": [100]}}
    s = status_of(plan(spec, stable_on(1), 2, readiness={2: LOADING}), stable_on(1))
    p = plan(spec, s, 2, readiness={2: READY})
    assert p.rollout["phase"] == "Succeeded" and split(p) == {2: 100}


def test_rollout_of_a_first_revision_is_no_rollout():
    p = plan({"rollout": ROLLOUT}, {}, 1, readiness={1: LOADING})
    assert split(p) == {1: 100} and p.rollout is None and p.events == []
    assert [c["type"] for c in p.conditions] == ["TrafficReady"]


@pytest.mark.parametrize("rollout, words", [
    ({"steps": [50, 10]}, "strictly increasing"),
    ({"steps": []}, "1 to 10"),
    ({"steps": [0, 100]}, "[1, 100]"),
    ({"stepSeconds": 0}, "stepSeconds must be a number >= 1"),
    ({"maxErrorRatio": "x"}, "maxErrorRatio"),
])
def test_invalid_rollout_keeps_the_traffic(rollout, words):
    s = stable_on(1)
    p = plan({"rollout": rollout}, s, 2, readiness={2: READY})
    c = cond(p, "TrafficReady")
    assert (c["status"], c["reason"]) == ("False", "InvalidRollout") and words in c["message"]
    assert split(p) == {1: 100}


def test_removing_the_rollout_hands_over_to_the_default_mode():
    spec, s, p = rolling_at_step1(h(100), h(1900))
    s = status_of(p, s)
    after = plan({}, s, 2, readiness={1: READY, 2: READY}, now=at(400))
    assert after.rollout is None and split(after) == {2: 100}
    assert [c["type"] for c in after.conditions] == ["TrafficReady"]


def test_every_status_the_plan_writes_fits_the_crd():
    """status.traffic, status.rollout (baseline included) and the conditions of each stage of a
    rollout and a rollback pass the LoraAdapter CRD's status schema."""
    from .crd_tools import load_crd, openapi_errors, schema_of

    schema = schema_of(load_crd("loraadapters"))["properties"]["status"]
    spec = {"rollout": ROLLOUT}
    statuses = [stable_on(1)]
    statuses.append(status_of(plan(spec, statuses[-1], 2, readiness={2: LOADING}), statuses[-1]))
    statuses.append(status_of(plan(spec, statuses[-1], 2, readiness={2: READY}, health={1: h(10), 2: h(0)}),
                              statuses[-1]))
    statuses.append(status_of(plan(spec, statuses[-1], 2, readiness={2: READY}, health={1: h(900), 2: h(100)},
                                   now=at(300)), statuses[-1]))
    statuses.append(status_of(plan(spec, statuses[-1], 2, readiness={2: READY}, health={1: h(900), 2: h(200, 50)},
                                   now=at(600)), statuses[-1]))
    assert statuses[-1]["rollout"]["phase"] == "RolledBack"
    statuses.append(status_of(plan({"traffic": [{"revision": 1, "percent": 70}, {"latestRevision": True, "percent": 30}]},
                                   statuses[-1], 2, readiness={1: READY, 2: READY}), statuses[-1]))
    for st in statuses:
        assert openapi_errors(st, schema) == [], st


def test_a_rollout_from_a_split_compares_with_the_revision_holding_most_traffic():
    s = status_of(plan({"traffic": [{"revision": 1, "percent": 50}, {"revision": 2, "percent": 50}]}, {}, 2,
                       readiness={1: READY, 2: READY}))
    p = plan({"rollout": ROLLOUT}, s, 2, readiness={1: READY, 2: READY})
    assert (p.rollout["revision"], p.rollout["stableRevision"]) == (2, 1), "a tie: the older is the stable"
    assert split(p) == {2: 10, 1: 90}, "the canary was warm already: step 1 at once"
    # A naive `now` is UTC.
    again = plan({"rollout": ROLLOUT}, status_of(p, s), 2, readiness={1: READY, 2: READY},
                 now=dt.datetime(2025, 1, 1, 12, 1, 0))
    assert again.requeue_after == 240
