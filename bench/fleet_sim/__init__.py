"""A discrete-event simulator of a loraplex fleet: replicas x device slots x host slots behind a
router, with step costs fitted to the engine's measured steps (see bench/README.md).

workload.py (Zipf adapters, bursty arrivals; optionally a shifting ranking and a diurnal rate)
-> sim.py (events, router) -> replica.py (the engine's scheduler and adapter cache) with
cost.py (the fitted step cost); policies.py is shared with validate.py, which replays the same
workload on real engines over loopback. The elastic fleet (elastic.py, the CLI) adds pods that
come and go under the operator's autoscaler and scale to zero (fleet.py) and the operator's
warm placement, fixed or automatic (placement.py). The rollout scenario (rollout.py, the CLI)
gives adapters new revisions while the fleet serves (revisions.py): replace in place against
warm before shift.
"""
