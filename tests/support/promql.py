"""Metric names in PromQL expressions and in a Prometheus scrape, to check that dashboards and
alerts query only series that something exports."""
from __future__ import annotations

import re

# A series name as loraplex's dashboards and alerts use them, followed by a selector, a range,
# a closing parenthesis, a comparison or the end.
METRIC_NAME = re.compile(r"\b(?:loraplex_[a-zA-Z0-9_]+|vllm:[a-zA-Z0-9_:]+|up)\b(?=\s*(?:\{|\[|\)|$|\s|>|==))")
PROMETHEUS_OWN = {"up"}  # made by Prometheus for every scrape target


def exported_names(text: str) -> set[str]:
    """Every series name a scrape of this /metrics yields (histograms: _bucket, _sum, _count)."""
    from prometheus_client.parser import text_string_to_metric_families

    names = set()
    for family in text_string_to_metric_families(text):
        names |= {s.name for s in family.samples}
        if family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
        elif family.type == "counter":
            names.add(family.name + "_total")
        else:
            names.add(family.name)
    return names


def queried_names(expr: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_matchers = re.sub(r"\{[^}]*\}", "{}", without_strings)
    return set(METRIC_NAME.findall(without_matchers))
