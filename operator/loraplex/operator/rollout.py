"""The progressive rollout of a LoraAdapter's latest revision (spec.rollout): its state machine
(status.rollout) and the analysis of each step. Pure, called by traffic.plan_traffic.

The latest revision is the canary, the revision that held the traffic before it the stable one.
The canary gets no traffic until it is loaded on every Ready pod it is placed on; then step i
sends steps[i] % of the name's requests to it for stepSeconds. At a step's end the canary's
error rate and mean TTFT over the step (the scraped counters' increase since the step's start,
kept in status.rollout.baseline) are compared with the stable's:
  fail when  canary errors/requests > max(maxErrorRatio x stable's, stable's + 1 point)
  fail when  canary mean TTFT > maxTTFTRatio x stable's mean TTFT (both with >= minRequests samples)
  hold when  the canary saw fewer than minRequests requests in the step (no evidence yet)
A passed step moves to the next one; passing the last one (or reaching 100 %) promotes the canary
(phase Succeeded). A failure, or a canary that fails to load, rolls back at once: 100 % stable,
phase RolledBack; that revision is not retried until a newer one appears. A newer revision
arriving mid-rollout restarts the rollout from step 0 against the same stable revision.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Callable, Mapping

from .status import condition
from .traffic import (ERROR_SLACK, HOLD_RECHECK, ROLLOUT_DEFAULTS, Invalid, Readiness, RevisionHealth,
                      Split, TrafficPlan, describe, format_time, parse_time, to_status)

PROGRESSING, SUCCEEDED, ROLLED_BACK = "Progressing", "Succeeded", "RolledBack"
MAX_STEPS = 10


@dataclass(frozen=True)
class Config:
    steps: tuple[int, ...]
    step_seconds: float
    max_error_ratio: float
    max_ttft_ratio: float
    min_requests: float

    @classmethod
    def from_spec(cls, spec: Mapping) -> "Config":
        """spec.rollout with its defaults. Raises Invalid for what the CRD's rules refuse."""
        if not isinstance(spec, Mapping):
            raise Invalid("InvalidRollout", "spec.rollout must be an object")
        s = {**ROLLOUT_DEFAULTS, **spec}
        steps = s["steps"]
        if (not isinstance(steps, list) or not 1 <= len(steps) <= MAX_STEPS
                or any(isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 100 for p in steps)
                or any(a >= b for a, b in zip(steps, steps[1:]))):
            raise Invalid("InvalidRollout", f"spec.rollout.steps must be 1 to {MAX_STEPS} strictly increasing "
                                            f"percents in [1, 100], got {steps!r}")

        def number(key: str, lo: float) -> float:
            v = s[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < lo:
                raise Invalid("InvalidRollout", f"spec.rollout.{key} must be a number >= {lo:g}, got {v!r}")
            return float(v)
        return cls(tuple(steps), number("stepSeconds", 1), number("maxErrorRatio", 1), number("maxTTFTRatio", 1),
                   number("minRequests", 1))


def condition_of(ro: Mapping) -> dict:
    return condition("Rollout", ro.get("phase") != ROLLED_BACK, ro.get("reason") or ro.get("phase") or PROGRESSING,
                     ro.get("message", ""))


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def analyze(cfg: Config, canary: RevisionHealth, stable: RevisionHealth, c: int, s: int) -> tuple[str | None, str]:
    """One step's verdict from the canary's and the stable's increases over it: (the failure
    reason, or None when it passes; the measured numbers). The canary has >= minRequests."""
    c_rate = canary.errors / canary.requests if canary.requests > 0 else 0.0
    s_rate = stable.errors / stable.requests if stable.requests > 0 else 0.0
    limit = max(cfg.max_error_ratio * s_rate, s_rate + ERROR_SLACK)
    errors = (f"revision {c} errors {pct(c_rate)} ({canary.errors:g}/{canary.requests:g}), revision {s} "
              f"{pct(s_rate)} ({stable.errors:g}/{stable.requests:g}), limit {pct(limit)}")
    if c_rate > limit:
        return "CanaryErrorRatio", errors
    if canary.ttft_count >= cfg.min_requests and stable.ttft_count >= cfg.min_requests:
        cm, sm = canary.ttft_sum / canary.ttft_count, stable.ttft_sum / stable.ttft_count
        ttft = (f"revision {c} mean TTFT {cm:.3f} s ({canary.ttft_count:g} requests), revision {s} {sm:.3f} s "
                f"({stable.ttft_count:g}), limit {cfg.max_ttft_ratio:g} x = {cfg.max_ttft_ratio * sm:.3f} s")
        if cm > cfg.max_ttft_ratio * sm:
            return "CanaryTTFTRatio", ttft
    else:
        ttft = f"TTFT not compared (fewer than {cfg.min_requests:g} samples on a side)"
    return None, f"{errors}; {ttft}"


def stable_of(old: Mapping | None, before: Split | None, latest: int, known: set[int]) -> int | None:
    """The revision a new canary is compared with: the last rollout's outcome (its canary once
    promoted, else its stable), else the revision holding the most traffic now. None: no other
    revision to protect (the first revision, or the latest already holds the traffic)."""
    if old:
        n = old.get("revision") if old.get("phase") == SUCCEEDED else old.get("stableRevision")
        if n in known and n != latest:
            return n
    if before:
        n = max(before, key=lambda r: (before[r], -r))  # a tie: the older one, a stable is older
        if n != latest:
            return n
    return None


def plan(cfg: Config, old: Mapping | None, before: Split | None, latest: int, known: set[int],
         ready: Callable[[int], Readiness], health: Mapping[int, RevisionHealth], now: dt.datetime) -> TrafficPlan:
    old = dict(old) if isinstance(old, Mapping) and old else None
    if old and old.get("revision") == latest and (old.get("phase") == SUCCEEDED or old.get("stableRevision") in known):
        return Machine(cfg, old, [], ready, health, now).run()
    stable = stable_of(old, before, latest, known)
    if stable is None:
        split = {latest: 100}
        return TrafficPlan(to_status(split, None), [latest], None,
                           [condition("TrafficReady", True, "Applied", describe(split))])
    ro = {"revision": latest, "stableRevision": stable, "stepIndex": 0, "percent": 0, "phase": PROGRESSING,
          "reason": PROGRESSING, "baseline": {}}
    was = (f"; revision {old['revision']} superseded mid-rollout" if old and old.get("phase") == PROGRESSING
           and old.get("revision") != latest else "")
    started = ("Normal", "RolloutStarted", f"revision {latest} is the canary against revision {stable}: steps "
                                           f"{', '.join(f'{p} %' for p in cfg.steps)}{was}")
    return Machine(cfg, ro, [started], ready, health, now).run()


class Machine:
    """One evaluation of a rollout: the next status.rollout, its traffic and events."""

    def __init__(self, cfg: Config, ro: dict, events: list, ready: Callable[[int], Readiness],
                 health: Mapping[int, RevisionHealth], now: dt.datetime):
        self.cfg, self.ro, self.events, self.ready, self.health = cfg, ro, events, ready, health
        now = now if now.tzinfo else now.replace(tzinfo=dt.timezone.utc)  # a naive `now` is UTC
        self.now = now.replace(microsecond=0)  # status times have whole seconds
        self.c, self.s, self.n = int(ro["revision"]), int(ro["stableRevision"]), len(cfg.steps)

    def run(self) -> TrafficPlan:
        ro, c, s = self.ro, self.c, self.s
        if ro.get("phase") == ROLLED_BACK:
            load_failed = ro.get("reason") == "CanaryFailedToLoad"
            return self.out({s: 100}, {s} | (set() if load_failed else {c}))  # kept pinnable for a post-mortem
        if ro.get("phase") == SUCCEEDED:
            return self.out({c: 100}, {c})
        r = self.ready(c)
        if r.failed:
            return self.rollback("CanaryFailedToLoad", f"revision {c} failed to load: {r.failed}")
        # Percent 0: no step started yet. Not the absence of stepStartedAt: the status is merge-
        # patched, so a superseded rollout's stepStartedAt and baseline may still be there.
        started = parse_time(ro.get("stepStartedAt")) if ro.get("percent") else None
        if started is None:
            if not r.ready:
                return self.progress(0, 0, f"waiting for revision {c} to load on every pod it is placed on; "
                                           f"revision {s} keeps 100 %", {s: 100})
            return self.enter(0, "")
        i = min(int(ro.get("stepIndex", 0)), self.n - 1)  # steps may have been edited shorter
        p = self.cfg.steps[i]
        if p >= 100:
            return self.promote(f"revision {c} reached 100 %")
        split = {c: p, s: 100 - p}
        due = started + dt.timedelta(seconds=self.cfg.step_seconds)
        if self.now < due:
            plan = self.progress(i, p, f"revision {c} at {p} % against revision {s}, analysis at {format_time(due)}",
                                 split)
            plan.requeue_after = (due - self.now).total_seconds()
            return plan
        canary, stable = self.delta(c), self.delta(s)
        if canary.requests < self.cfg.min_requests:
            plan = self.progress(i, p, f"revision {c} at {p} %: waiting for traffic: {canary.requests:g} of "
                                       f"{self.cfg.min_requests:g} requests in the step", split)
            plan.requeue_after = min(HOLD_RECHECK, self.cfg.step_seconds)
            return plan
        failure, numbers = analyze(self.cfg, canary, stable, c, s)
        if failure:
            return self.rollback(failure, f"step {i + 1}/{self.n} ({p} %): {numbers}")
        if i + 1 >= self.n:
            return self.promote(f"passed step {i + 1}/{self.n} ({p} %): {numbers}")
        return self.enter(i + 1, f"passed step {i + 1}/{self.n} ({p} %): {numbers}")

    # --- transitions ---

    def enter(self, i: int, passed: str) -> TrafficPlan:
        """Start step i: its percent to the canary, and the counters' baseline for its analysis."""
        p = self.cfg.steps[i]
        if p >= 100:
            return self.promote(passed or f"revision {self.c} reached 100 %")
        self.ro["stepStartedAt"] = format_time(self.now)
        self.ro["baseline"] = {str(n): self.health.get(n, RevisionHealth()).to_status() for n in (self.c, self.s)}
        due = self.now + dt.timedelta(seconds=self.cfg.step_seconds)
        plan = self.progress(i, p, f"revision {self.c} at {p} % against revision {self.s}, analysis at "
                                   f"{format_time(due)}", {self.c: p, self.s: 100 - p})
        plan.requeue_after = self.cfg.step_seconds
        self.events.append(("Normal", "RolloutStep", f"revision {self.c} at {p} % (step {i + 1}/{self.n})"
                                                     + (f"; {passed}" if passed else "")))
        return plan

    def progress(self, i: int, p: int, message: str, split: Split) -> TrafficPlan:
        self.ro.update(stepIndex=i, percent=p, phase=PROGRESSING, reason=PROGRESSING,
                       step=f"{i + 1 if p else 0}/{self.n} {p}%", message=f"step {i + 1 if p else 0}/{self.n}: {message}")
        return self.out(split, {self.c, self.s})

    def promote(self, why: str) -> TrafficPlan:
        self.ro.update(stepIndex=self.n - 1, percent=100, phase=SUCCEEDED, reason="Promoted", step=f"{self.n}/{self.n} 100%",
                       message=f"revision {self.c} promoted: {why}")
        self.events.append(("Normal", "Promoted", self.ro["message"]))
        return self.out({self.c: 100}, {self.c})

    def rollback(self, reason: str, why: str) -> TrafficPlan:
        i = min(int(self.ro.get("stepIndex", 0)), self.n - 1)
        at = f"{i + 1}/{self.n}" if self.ro.get("percent") else f"0/{self.n}"
        self.ro.update(percent=0, phase=ROLLED_BACK, reason=reason, step=f"{at} rolled back",
                       message=f"revision {self.c} rolled back to revision {self.s}: {why}")
        self.events.append(("Warning", reason, self.ro["message"]))
        return self.run()

    # --- helpers ---

    def delta(self, n: int) -> RevisionHealth:
        base = RevisionHealth.from_status((self.ro.get("baseline") or {}).get(str(n)))
        return self.health.get(n, RevisionHealth()).since(base)

    def out(self, split: Split, serve: set[int]) -> TrafficPlan:
        return TrafficPlan(to_status(split, None), sorted(set(split) | serve), self.ro,
                           [condition("TrafficReady", True, "Applied", describe(split)), condition_of(self.ro)],
                           self.events)
