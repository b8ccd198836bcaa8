"""Metric names in PromQL expressions (parsed by promql-parser, Prometheus' grammar) and in a
Prometheus scrape, to check that dashboards and alerts query only series that something exports.
"""
from __future__ import annotations

import re

PROMETHEUS_OWN = {"up"}  # made by Prometheus for every scrape target
# Grafana's variables are not PromQL: replaced by values of the right type before parsing.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


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


def _selectors(node) -> list:
    import promql_parser as p

    if isinstance(node, p.VectorSelector):
        return [node]
    if isinstance(node, p.MatrixSelector):
        return [node.vector_selector]
    if isinstance(node, p.BinaryExpr):
        return _selectors(node.lhs) + _selectors(node.rhs)
    if isinstance(node, p.AggregateExpr):
        return _selectors(node.expr) + (_selectors(node.param) if node.param is not None else [])
    if isinstance(node, p.Call):
        return [s for a in node.args for s in _selectors(a)]
    if isinstance(node, (p.ParenExpr, p.UnaryExpr, p.SubqueryExpr)):
        return _selectors(node.expr)
    return []  # number and string literals


def queried_names(expr: str) -> set[str]:
    """The metric names `expr` selects. Raises ValueError when it is not valid PromQL, or when a
    selector has no metric name (a `{__name__=~...}` query would hide what it reads)."""
    import promql_parser

    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    expr = re.sub(r"\$(\w+)", r"\1", expr)  # other variables ($namespace) only occur inside label strings
    try:
        tree = promql_parser.parse(expr)
    except Exception as e:  # the parser raises its own error types
        raise ValueError(f"not valid PromQL: {expr!r}: {e}") from None
    names = set()
    for selector in _selectors(tree):
        if not selector.name:
            raise ValueError(f"a selector without a metric name in {expr!r}")
        names.add(selector.name)
    return names
