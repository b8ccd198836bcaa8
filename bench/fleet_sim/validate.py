"""Check the simulator against a real loopback fleet: the same workload, scaled down, both ways.

    python -m bench.fleet_sim.validate [--engines 2] [--adapters 60] [--duration 75] [--policies random,gie-resident]

For each policy it:
1. starts `--engines` real `loraplex-engine` processes (one torch thread each), each on its
   own loopback address (127.0.0.2, 127.0.0.3, ...), every adapter
   registered and none loaded, the KV cache sized so that nothing is preempted;
2. replays the trace against them through an HTTP client that routes every request with the
   same policy code as the simulator (bench/fleet_sim/policies.py). Its view of the engines is
   scraped every `--scrape-interval` seconds from /metrics (queue, KV usage, adapter-load
   counters; `vllm:lora_requests_info` when the engine publishes it) and /v1/adapters (which
   adapters are in device slots); its in-flight counts are its own;
3. simulates the same trace with the same replica settings, policy and seed;
4. compares TTFT p50 and p99, throughput, warm-hit rate and cold loads/s.

When an engine does not publish `vllm:lora_requests_info`, the running and waiting adapters
the `gie` policy needs are taken from the client's own requests in flight (waiting: no token
yet); the report says which source was used.
Results: validation.json and validation.md in --out (default bench/results/fleet_sim).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from bench.fleet_sim import cost as cost_model
from bench.fleet_sim.policies import PodView, make_policy
from bench.fleet_sim.replica import ReplicaConfig
from bench.fleet_sim.sim import FleetConfig, Simulation, window_metrics
from bench.fleet_sim.workload import FleetWorkload, generate, summary

ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("bench.fleet_sim")
COMPARED = ("ttft_p50_s", "ttft_p99_s", "throughput_req_s", "throughput_tok_s", "tpot_mean_s", "warm_hit_rate",
            "cold_loads_per_s")


def parse_metrics(text: str) -> dict:
    """The numbers the router needs from one /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {"waiting": 0.0, "kv_usage": 0.0, "disk_loads": 0.0, "device_loads": 0.0, "lora_info": None}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in ("vllm:num_requests_waiting", "loraplex_num_requests_waiting"):
                out["waiting"] = s.value
            elif s.name == "vllm:kv_cache_usage_perc" or s.name == "loraplex_kv_cache_usage_ratio":
                out["kv_usage"] = s.value
            elif s.name == "loraplex_adapter_loads_total" and s.labels.get("result") == "ok":
                if s.labels.get("tier") == "device":
                    out["device_loads"] += s.value
                elif s.labels.get("tier") in ("disk", "hub", "s3"):
                    out["disk_loads"] += s.value
            elif s.name == "vllm:lora_requests_info":
                # vLLM publishes one series per change; the one with the newest value (a timestamp) is current
                if out["lora_info"] is None or s.value >= out["lora_info"][0]:
                    split = lambda k: frozenset(a for a in s.labels.get(k, "").split(",") if a)  # noqa: E731
                    out["lora_info"] = (s.value, split("running_lora_adapters"), split("waiting_lora_adapters"),
                                        int(float(s.labels.get("max_lora", "0") or 0)))
    return out


class LoopbackRouter:
    """Routes a trace over real engines with a simulator policy; scrapes them like a gateway."""

    def __init__(self, engines, policy, names: list[str], device_slots: int, scrape_interval: float):
        self.engines, self.policy, self.names = engines, policy, names
        self.views = [PodView(max_lora=device_slots) for _ in engines]
        self.in_flight: list[dict] = [{} for _ in engines]  # request index -> Record
        self.scrape_interval = scrape_interval
        self.lora_info_source = "none needed"
        self.counters: dict[str, list] = {}

    async def _scrape_one(self, client, i: int) -> dict:
        eng = self.engines[i]
        m = parse_metrics((await client.get(f"{eng.url}/metrics")).text)
        v = self.views[i]
        v.waiting, v.kv_usage = int(m["waiting"]), float(m["kv_usage"])
        if self.policy.uses_scrape:
            listed = (await client.get(f"{eng.url}/v1/adapters")).json()
            items = listed.get("data", listed.get("adapters", listed)) if isinstance(listed, dict) else listed
            v.resident_adapters = frozenset(a["name"] for a in items if a.get("state") == "device")
            if m["lora_info"] is not None:
                _, v.running_adapters, v.waiting_adapters, max_lora = m["lora_info"]
                v.max_lora = max_lora or v.max_lora
                self.lora_info_source = "vllm:lora_requests_info"
            else:  # the client's own requests: no token yet = waiting (queued or prefilling)
                recs = list(self.in_flight[i].values())
                v.running_adapters = frozenset(r.adapter_name for r in recs if r.first_token is not None)
                v.waiting_adapters = frozenset(r.adapter_name for r in recs if r.first_token is None)
                self.lora_info_source = "client-side requests in flight (no vllm:lora_requests_info)"
        return m

    async def scrape(self, client) -> list[dict]:
        return await asyncio.gather(*(self._scrape_one(client, i) for i in range(len(self.engines))))

    async def _scraper(self, client, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.scrape(client)
            except Exception as exc:  # a slow scrape keeps the last view, as a gateway does
                log.debug("scrape failed: %s", exc)
            try:
                await asyncio.wait_for(stop.wait(), self.scrape_interval)
            except asyncio.TimeoutError:
                pass

    async def _one(self, client, rec, prompt, t0: float, sem) -> None:
        delay = t0 + rec.arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        for i, v in enumerate(self.views):
            v.in_flight = len(self.in_flight[i])
        r = self.policy.pick(rec.adapter_name, self.views)
        rec.replica = r
        self.in_flight[r][rec.idx] = rec
        try:
            await self.engines[r]._one(client, rec, prompt, rec.adapter_name, t0, sem)
        finally:
            self.in_flight[r].pop(rec.idx, None)

    async def _counters_at(self, client, t0: float, when: float, key: str) -> None:
        delay = t0 + when - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        ms = await asyncio.gather(*(client.get(f"{e.url}/metrics") for e in self.engines))
        parsed = [parse_metrics(m.text) for m in ms]
        self.counters[key] = [time.perf_counter() - t0, sum(p["disk_loads"] for p in parsed),
                              sum(p["device_loads"] for p in parsed)]

    async def replay(self, records, prompts, warmup: float, duration: float) -> float:
        import httpx

        sem = asyncio.Semaphore(4096)
        limits = httpx.Limits(max_connections=4096, max_keepalive_connections=4096)
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
            await self.scrape(client)
            stop = asyncio.Event()
            scraper = asyncio.create_task(self._scraper(client, stop))
            t0 = time.perf_counter()
            marks = [asyncio.create_task(self._counters_at(client, t0, warmup, "start")),
                     asyncio.create_task(self._counters_at(client, t0, duration, "end"))]
            await asyncio.gather(*(self._one(client, rec, p, t0, sem) for rec, p in zip(records, prompts)))
            await asyncio.gather(*marks)
            stop.set()
            await scraper
            return time.perf_counter() - t0


def run_policy(args, policy_name: str, model, adapters, adapter_dir: Path, spec: FleetWorkload, trace, rcfg: ReplicaConfig,
               settings) -> dict:
    from bench.systems import HttpEngine, Record

    names = [a.name for a in adapters]
    rng = np.random.default_rng(args.seed)
    vocab = min(1000, model.shape["vocab_size"])
    prompts = [[int(t) for t in rng.integers(10, vocab, size=int(n))] for n in trace.prompt_len]
    records = []
    for i in range(len(trace)):
        rec = Record(i, int(trace.adapter[i]), float(trace.arrival[i]), int(trace.prompt_len[i]), int(trace.output_len[i]))
        rec.adapter_name, rec.replica = names[rec.adapter], -1
        records.append(rec)
    engines = []
    fairness = () if args.adapter_fairness_seconds is None else ("--adapter-fairness-seconds", str(args.adapter_fairness_seconds))
    load_before = os.getloadavg()[0]
    try:
        for i in range(args.engines):
            engines.append(HttpEngine(model, settings, adapters, adapter_dir, args.work / f"{policy_name}-engine{i}",
                                      host=f"127.0.0.{i + 2}", extra_args=("--num-threads", "1") + fairness))
        import httpx

        for eng in engines:  # a first forward on the base model (torch warm-up); it loads no adapter
            r = httpx.post(f"{eng.url}/v1/completions", json={"model": eng.served, "prompt": [11, 12, 13], "max_tokens": 2,
                                                                "ignore_eos": True}, timeout=120)
            r.raise_for_status()
        router = LoopbackRouter(engines, make_policy(policy_name, args.engines, args.seed), names, rcfg.device_slots,
                                args.scrape_interval)
        wall = asyncio.run(router.replay(records, prompts, args.warmup, spec.duration_s))
    finally:
        for eng in engines:
            eng.close()
    load_after = os.getloadavg()[0]
    c0, c1 = router.counters["start"], router.counters["end"]
    span = c1[0] - c0[0]
    errors = sum(1 for r in records if r.error)
    # The load counters were read at the window's two ends; spread their increase over the window
    # so that the metric code shared with the simulator counts them.
    disk = np.linspace(args.warmup, spec.duration_s, int(c1[1] - c0[1]), endpoint=False)
    device = np.linspace(args.warmup, spec.duration_s, int(c1[2] - c0[2]), endpoint=False)
    real = window_metrics(
        arrivals=np.array([r.arrival for r in records]),
        first=np.array([np.nan if r.first_token is None else r.first_token for r in records], dtype=float),
        finish=np.array([np.nan if r.finish is None or r.error else r.finish for r in records], dtype=float),
        out_tokens=np.array([r.tokens for r in records]), replica=np.array([max(0, r.replica) for r in records]),
        disk_loads=disk, device_loads=device, lo=args.warmup, hi=spec.duration_s, num_replicas=args.engines, errors=errors)
    real["counter_window_s"] = span
    real["wall_s"] = wall
    real["load_average_before"], real["load_average_after"] = round(load_before, 2), round(load_after, 2)
    real["lora_info_source"] = router.lora_info_source
    if errors:
        real["first_error"] = next(r.error for r in records if r.error)

    costs = cost_model.load(args.costs)
    fleet = FleetConfig(replicas=args.engines, replica=rcfg, scrape_interval_s=args.scrape_interval, warmup_s=args.warmup)
    sim = Simulation(trace, spec, fleet, make_policy(policy_name, args.engines, args.seed), costs, seed=args.seed,
                     names=names)
    simulated = sim.run()
    # What-if: the same model on a CPU as slow as the real run's turned out to be (the ratio of the
    # step times running requests saw, real over simulated). It splits the error into the CPU's
    # speed (the fit ran under a different load) and everything else the model gets wrong.
    speed = real["tpot_mean_s"] / simulated["tpot_mean_s"]
    calibrated = Simulation(trace, spec, fleet, make_policy(policy_name, args.engines, args.seed), costs.scaled(speed),
                            seed=args.seed, names=names).run()
    calibrated["cost_scale"] = speed
    return {"policy": policy_name, "real": real, "sim": simulated, "sim_speed_calibrated": calibrated,
            "error": relative_errors(simulated, real), "error_speed_calibrated": relative_errors(calibrated, real)}


def relative_errors(sim: dict, real: dict) -> dict:
    """(sim - real) / real; for the warm-hit rate, the difference in points."""
    out = {}
    for k in COMPARED:
        a, b = sim[k], real[k]
        out[k] = (a - b) if k == "warm_hit_rate" else ((a - b) / b if b else float("nan"))
    return out


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        "# Fleet simulator vs a real loopback fleet",
        "",
        f"- Command: `{meta['command']}`.",
        f"- Real: {meta['engines']} `loraplex-engine` processes ({meta['model']}, fp32, --num-threads 1) on 127.0.0.2.., "
        f"{meta['device_slots']} device slots and {meta['host_slots']} host slots each; routed by the client with the "
        f"simulator's policy code; engine state scraped every {meta['scrape_interval_s']} s. Machine: {meta['cpu']}, "
        f"{meta['cores']} cores, shared (load average shown per run).",
        f"- Workload: {meta['workload']['num_adapters']} adapters, Zipf s = {meta['workload']['zipf_s']}, MMPP-2 bursts "
        f"x{meta['workload']['burst_factor']}, {meta['workload']['rate']} req/s in all, {meta['workload']['duration_s']:.0f} s "
        f"(first {meta['warmup_s']:.0f} s not measured): {meta['workload_summary']['requests']} requests.",
        "- Error = (simulated - real) / real; for the warm-hit rate, simulated - real in points.",
        "",
        "- \"sim, speed-calibrated\" reruns the simulation with every cost scaled by the real/simulated TPOT ratio",
        "  (shown): what the model gets wrong once the CPU's speed during the run is known.",
        "",
        "| policy | side | req/s | out tok/s | TPOT s | TTFT p50 s | TTFT p99 s | warm-hit | cold loads/s | load avg |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        sides = [("real", r["real"], None), ("sim", r["sim"], r["error"]),
                 (f"sim, speed-calibrated (x{r['sim_speed_calibrated']['cost_scale']:.2f})", r["sim_speed_calibrated"],
                  r["error_speed_calibrated"])]
        for side, m, e in sides:
            la = f"{m['load_average_before']}-{m['load_average_after']}" if side == "real" else ""
            lines.append(f"| {r['policy']} | {side} | {m['throughput_req_s']:.2f} | {m['throughput_tok_s']:.1f} | "
                         f"{m['tpot_mean_s']:.2f} | {m['ttft_p50_s']:.2f} | {m['ttft_p99_s']:.2f} | "
                         f"{m['warm_hit_rate']:.1%} | {m['cold_loads_per_s']:.2f} | {la} |")
            if e is not None:
                lines.append(f"| {r['policy']} | error | {e['throughput_req_s']:+.0%} | {e['throughput_tok_s']:+.0%} | "
                             f"{e['tpot_mean_s']:+.0%} | {e['ttft_p50_s']:+.0%} | {e['ttft_p99_s']:+.0%} | "
                             f"{100 * e['warm_hit_rate']:+.1f} pt | {e['cold_loads_per_s']:+.0%} | |")
    lines.append("")
    for r in result["runs"]:
        if r["policy"] == "gie":
            lines += [f"The `gie` run read running/waiting adapters from: {r['real']['lora_info_source']}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fleet_sim.validate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--engines", type=int, default=2)
    p.add_argument("--policies", default="random,gie-resident")
    p.add_argument("--adapters", type=int, default=60)
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--rate", type=float, default=1.0, help="mean requests per second, all engines")
    p.add_argument("--duration", type=float, default=75.0)
    p.add_argument("--warmup", type=float, default=15.0)
    p.add_argument("--device-slots", type=int, default=4)
    p.add_argument("--host-slots", type=int, default=12)
    p.add_argument("--scrape-interval", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--costs", type=Path, default=cost_model.DEFAULT_DATA)
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "loraplex")
    p.add_argument("--work", type=Path, default=Path("/tmp/loraplex-fleet-validate"))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fleet_sim")
    p.add_argument("--adapter-fairness-seconds", type=float, default=0.0,
                   help="the engine's slot-fairness aging time, passed to the engines and the model alike "
                        "(default: 0, the engine's own default)")
    p.add_argument("--tiny", action="store_true",
                   help="a smoke run of the pipeline on the tests' tiny model (the costs stay SmolLM2's: its errors mean nothing)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per scrape otherwise
    os.environ["OMP_NUM_THREADS"] = "1"

    from bench.fleet_sim.measure import assets
    from bench.systems import EngineSettings

    model, adapters, adapter_dir = assets(args.cache_dir, args.adapters, tiny=args.tiny)
    adapters = adapters[: args.adapters]
    settings = EngineSettings(max_num_seqs=32, max_num_batched_tokens=2048, max_model_len=512,
                              max_active_adapters=args.device_slots, max_cpu_adapters=args.host_slots, max_lora_rank=8)
    rcfg = ReplicaConfig(device_slots=args.device_slots, host_slots=args.host_slots, max_num_seqs=32,
                         max_num_batched_tokens=2048, num_kv_blocks=settings.num_kv_blocks(),
                         adapter_fairness_s=args.adapter_fairness_seconds)
    spec = FleetWorkload(num_adapters=args.adapters, zipf_s=args.zipf, rate=args.rate, duration_s=args.duration,
                         seed=args.seed)
    trace = generate(spec)
    runs = []
    for name in [s.strip() for s in args.policies.split(",") if s.strip()]:
        log.info("policy %s: %d requests over %d engines", name, len(trace), args.engines)
        r = run_policy(args, name, model, adapters, adapter_dir, spec, trace, rcfg, settings)
        runs.append(r)
        log.info("%s real: %s", name, {k: round(r["real"][k], 3) for k in COMPARED})
        log.info("%s sim : %s", name, {k: round(r["sim"][k], 3) for k in COMPARED})
    result = {
        "meta": {"command": "python -m bench.fleet_sim.validate " + shlex.join(sys.argv[1:] if argv is None else argv),
                 "tiny": args.tiny,
                 "engines": args.engines, "model": model.label, "device_slots": args.device_slots,
                 "host_slots": args.host_slots, "scrape_interval_s": args.scrape_interval, "warmup_s": args.warmup,
                 "workload": spec.describe(), "workload_summary": summary(trace, spec),
                 "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                 "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "validation.json").write_text(json.dumps(result, indent=1, sort_keys=True, default=float) + "\n")
    (args.out / "validation.md").write_text(markdown(result))
    log.info("validation in %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
