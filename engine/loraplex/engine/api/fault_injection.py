"""`--inject-delay KEY=SECONDS`: fault injection for rollout drills, as Istio's and Envoy's delay
faults do for services. Each request served by the adapter KEY (one revision, `support@3`, or a
plain adapter name, `support`) waits SECONDS after its model is resolved and before it reaches
the step loop, so the delay counts in its TTFT exactly as a slow canary's would. An operator
rehearses the rollback of spec.rollout with it (docs/operator.md "Adapter revisions").

Off by default; a server started with it logs a warning, so a drill's flag left in place is seen.
"""
from __future__ import annotations

import argparse
import logging
import math

from loraplex.manifest import DNS1123_LABEL, MODEL_REVISION

log = logging.getLogger("loraplex.engine.api")

MAX_DELAY_SECONDS = 60.0  # a drill's delay, not a hang: past it a request would only time out


def parse_delay(text: str) -> tuple[str, float]:
    """`KEY=SECONDS` (an argparse type): KEY an adapter name or `<name>@<revision>`, SECONDS in
    [0, 60]."""
    key, sep, seconds = text.partition("=")
    key = key.strip()
    if not sep or not (MODEL_REVISION.match(key) or (len(key) <= 63 and DNS1123_LABEL.match(key))):
        raise argparse.ArgumentTypeError(f"must be KEY=SECONDS with KEY an adapter name or <name>@<revision> "
                                         f"(support, support@3), got {text!r}")
    try:
        value = float(seconds)
    except ValueError:
        value = math.nan
    if not 0 <= value <= MAX_DELAY_SECONDS:  # nan fails too
        raise argparse.ArgumentTypeError(f"SECONDS must be a number in [0, {MAX_DELAY_SECONDS:g}], got {text!r}")
    return key, value


class DelayAction(argparse.Action):
    """Repeatable: the flags gather into {key: seconds}; a key given twice is refused."""

    def __call__(self, parser, namespace, values, option_string=None):
        key, seconds = values
        delays = dict(getattr(namespace, self.dest) or {})  # never the parser's shared default
        if key in delays:
            raise argparse.ArgumentError(self, f"{key!r} is given twice")
        delays[key] = seconds
        setattr(namespace, self.dest, delays)


def delay_for(delays: dict[str, float], adapter: str | None, adapter_name: str | None) -> float:
    """The delay of a request served by registry key `adapter` (`x@n` or `x`) of the adapter
    `adapter_name`: the key's own, else the name's; 0 for the base model."""
    if not delays or adapter is None:
        return 0.0
    return delays.get(adapter, delays.get(adapter_name or adapter, 0.0))


def warn_if_set(delays: dict[str, float]) -> None:
    if delays:
        log.warning("fault injection is on (--inject-delay): requests served by %s are delayed on purpose",
                    ", ".join(f"{k} ({s:g} s)" for k, s in sorted(delays.items())))
