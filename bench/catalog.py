"""The catalog point: thousands of adapters on disk, none registered, each request naming one by
its folder (`--adapter-source local`): loraplex resolves the name, loads it from disk just in time
and serves it. Measured against the same server and the same arrivals with every request naming
one adapter (loaded once, then warm), in the same run.

Adapters are the run's own PEFT adapters, hard-linked under `count` names (so the catalog costs no
disk). A load reads the files through the page cache: "cold" here means not in the engine (not
registered, not parsed, not in a slot), not "read from the platter".
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("bench")
FILES = ("adapter_config.json", "adapter_model.safetensors")


def make_catalog(adapters: list, root: Path, count: int) -> list[str]:
    """`count` adapter folders under root, name i hard-linked to adapters[i % len(adapters)]."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    names = [f"catalog-{i:05d}" for i in range(count)]
    for i, name in enumerate(names):
        (root / name).mkdir()
        for f in FILES:
            os.link(adapters[i % len(adapters)].path / f, root / name / f)
    return names


def cold_ttfts(run) -> list[float]:
    """TTFT of the requests that named an adapter not named before in the run (a cold load)."""
    seen: set[int] = set()
    out = []
    for r in sorted(run.records, key=lambda r: r.arrival):
        if r.adapter in seen or r.error or r.first_token is None:
            seen.add(r.adapter)
            continue
        seen.add(r.adapter)
        out.append(r.first_token - r.arrival)
    return out


def run_catalog_point(model, settings, adapters: list, work: Path, count: int, load_catalog: list, load_one: list,
                      systems, report, slo_ttft: float) -> dict:
    """One server, three replays of the same arrivals: every request on one adapter; spread over
    `count` adapters by name (uniform popularity: nearly every request is a cold load); one
    adapter again."""
    names = make_catalog(adapters, work / "catalog", count)
    host_bytes = 64 * max(a.nbytes for a in adapters)
    srv = systems.HttpEngine(model, settings, [], work / "catalog", work / "catalog-http",
                             extra_args=("--adapter-host-bytes", str(host_bytes), "--max-cpu-adapters", "100000"))
    try:  # A B A: the one-adapter run before and after, so that a drift of the machine shows
        one = report.run_metrics(srv.replay(load_one, names[:1], "catalog-1-adapter"), slo_ttft)
        cat_run = srv.replay(load_catalog, names, "catalog")
        cat = report.run_metrics(cat_run, slo_ttft)
        one_again = report.run_metrics(srv.replay(load_one, names[:1], "catalog-1-adapter"), slo_ttft)
    finally:
        srv.close()
    one_tok_s = (one["throughput_tok_s"] + one_again["throughput_tok_s"]) / 2
    cold = cold_ttfts(cat_run)
    point = {
        "adapters_on_disk": count, "requests": len(load_catalog),
        "distinct_adapters": len({r.adapter for r in load_catalog}), "cold_requests": len(cold),
        "cold_ttft_p50_s": report.percentile(cold, 50), "cold_ttft_p99_s": report.percentile(cold, 99),
        "host_budget_bytes": host_bytes, "catalog": cat, "one_adapter": one, "one_adapter_again": one_again,
        "tok_s_ratio": cat["throughput_tok_s"] / one_tok_s if one_tok_s else None,
        "ttft_p50_ratio": (cat["ttft_p50_s"] or 0) / (one["ttft_p50_s"] or 1),
    }
    log.info("catalog: %d adapters on disk, %d requests over %d adapters (%d cold): cold TTFT p50 %.0f ms p99 %.0f ms; "
             "%.1f tok/s vs %.1f tok/s on one adapter", count, len(load_catalog), point["distinct_adapters"], len(cold),
             1000 * (point["cold_ttft_p50_s"] or 0), 1000 * (point["cold_ttft_p99_s"] or 0), cat["throughput_tok_s"],
             one_tok_s)
    return point


def markdown(point: dict) -> list[str]:
    cat, one, again = point["catalog"], point["one_adapter"], point["one_adapter_again"]
    ms = lambda s: f"{1000 * s:.0f}" if s is not None else "-"  # noqa: E731
    return [
        f"## Catalog: {point['adapters_on_disk']} adapters on disk, loaded by name just in time", "",
        f"{point['requests']} requests over {point['distinct_adapters']} adapters ({point['cold_requests']} cold loads), "
        "against the same arrivals on one adapter, same server, same run.", "",
        "| run | tok/s | TTFT p50 ms | TTFT p99 ms | cold-load TTFT p50 ms | cold-load TTFT p99 ms | errors |",
        "|---|---|---|---|---|---|---|",
        f"| 1 adapter | {one['throughput_tok_s']:.1f} | {ms(one['ttft_p50_s'])} | {ms(one['ttft_p99_s'])} | - | - | "
        f"{one['errors']} |",
        f"| catalog | {cat['throughput_tok_s']:.1f} | {ms(cat['ttft_p50_s'])} | {ms(cat['ttft_p99_s'])} | "
        f"{ms(point['cold_ttft_p50_s'])} | {ms(point['cold_ttft_p99_s'])} | {cat['errors']} |",
        f"| 1 adapter, again | {again['throughput_tok_s']:.1f} | {ms(again['ttft_p50_s'])} | {ms(again['ttft_p99_s'])} "
        f"| - | - | {again['errors']} |",
        "", f"Throughput ratio catalog / 1 adapter (mean of the two): {point['tok_s_ratio']:.2f}."
        if point["tok_s_ratio"] else "", "",
    ]
