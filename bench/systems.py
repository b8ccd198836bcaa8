"""The systems under test, each replaying the same request list against the wall clock.

Every driver returns one `Record` per request. Times are seconds since the replay started;
`arrival` is the scheduled arrival (a request that could not be issued on time still counts
its wait: the client's clock is the reference, as in S-LoRA's and vLLM's benchmarks).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from bench.assets import AdapterInfo, ModelInfo
from bench.workload import Request

log = logging.getLogger("bench")


@dataclass
class Record:
    idx: int
    adapter: int
    arrival: float
    prompt_len: int
    output_len: int  # asked for
    first_token: float | None = None
    finish: float | None = None
    tokens: int = 0  # received
    error: str | None = None


@dataclass
class RunResult:
    system: str
    records: list[Record]
    wall_s: float
    extra: dict = field(default_factory=dict)


@dataclass
class EngineSettings:
    """Shared by loraplex in-process and over HTTP (and the baseline's batch cap)."""

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 1024
    max_model_len: int = 512
    max_active_adapters: int = 40  # device slots (on the CPU: RAM)
    max_cpu_adapters: int = 1024  # host copies: every adapter fits (S-LoRA's setting: all in host memory)
    max_lora_rank: int = 32
    block_size: int = 16
    extra_kv_blocks: int = 0  # room for the decode-step cohorts alive beside each other (bench.stepbench)

    def num_kv_blocks(self) -> int:  # every running sequence can reach max_model_len: no preemption
        return self.max_num_seqs * -(-self.max_model_len // self.block_size) + 8 + self.extra_kv_blocks


def _wait_until(t0: float, when: float) -> None:
    delay = t0 + when - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


# ---- loraplex, in process -------------------------------------------------------------------

def make_engine(model: ModelInfo, settings: EngineSettings, adapter_dir: Path | None = None):
    from loraplex.engine.core.config import EngineConfig
    from loraplex.engine.core.llm_engine import LLMEngine

    cfg = EngineConfig(model_id=str(model.path), device="cpu", dtype="float32", block_size=settings.block_size,
                       num_kv_blocks=settings.num_kv_blocks(), max_num_seqs=settings.max_num_seqs,
                       max_num_batched_tokens=settings.max_num_batched_tokens, max_model_len=settings.max_model_len,
                       max_waiting=100000, max_active_adapters=settings.max_active_adapters,
                       max_cpu_adapters=settings.max_cpu_adapters, max_lora_rank=settings.max_lora_rank,
                       adapter_dir=str(adapter_dir) if adapter_dir else None)
    return LLMEngine(cfg)


def register_adapters(engine, adapters: list[AdapterInfo], warm: list[str], timeout: float = 600.0) -> float:
    """Register every adapter and load the `warm` ones into host RAM (not timed in the replay)."""
    from loraplex.manifest import AdapterManifest

    t0 = time.perf_counter()
    for a in adapters:
        engine.adapters.register(AdapterManifest(name=a.name, uri=str(a.path)))
    for name in warm:
        engine.adapters.request_load(name)
    deadline = time.monotonic() + timeout
    want = set(warm)
    while time.monotonic() < deadline:
        states = {d["name"]: d["state"] for d in engine.adapters.list() if d["name"] in want}
        if all(s in ("host", "device") for s in states.values()):
            break
        failed = [n for n, s in states.items() if s == "failed"]
        if failed:
            raise RuntimeError(f"adapters failed to load: {failed[:3]}")
        time.sleep(0.02)
    else:
        raise TimeoutError("adapters did not load in time")
    return time.perf_counter() - t0


def run_loraplex_inproc(engine, requests: list[Request], adapter_names: list[str], label: str) -> RunResult:
    """Drive LLMEngine.step() from this thread, adding each request at its arrival time."""
    from loraplex.engine.core.sampling_params import SamplingParams

    records = {r.idx: Record(r.idx, r.adapter, r.arrival, len(r.prompt), r.output_len) for r in requests}
    pending = deque(sorted(requests, key=lambda r: r.arrival))
    steps, batch_sizes, step_times, distinct = 0, [], [], []
    adapter_of = {f"r{r.idx}": r.adapter for r in requests}
    t0 = time.perf_counter()
    while pending or engine.has_unfinished():
        now = time.perf_counter() - t0
        while pending and pending[0].arrival <= now:
            r = pending.popleft()
            params = SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True)
            engine.add_request(f"r{r.idx}", list(r.prompt), params,
                               adapter_names[r.adapter] if r.adapter >= 0 else None)
        if not engine.has_unfinished():
            _wait_until(t0, pending[0].arrival)
            continue
        s0 = time.perf_counter()
        outputs = engine.step()
        t = time.perf_counter()
        if engine.scheduler.running or outputs:
            # this step's batch: what still runs plus what finished in it
            rows = {s.request_id for s in engine.scheduler.running} | {o.request_id for o in outputs if o.finished}
            steps += 1
            batch_sizes.append(len(rows))
            step_times.append(t - s0)
            distinct.append(len({adapter_of[r] for r in rows if adapter_of.get(r, -1) >= 0}))
        t -= t0
        if not outputs and not engine.scheduler.running:
            time.sleep(0.002)  # adapters loading off the loop
        for out in outputs:
            rec = records[int(out.request_id[1:])]
            if out.new_token_ids:
                if rec.first_token is None:
                    rec.first_token = t
                rec.tokens += len(out.new_token_ids)
            if out.finished:
                rec.finish = t
                rec.error = out.error
    wall = time.perf_counter() - t0
    counters = engine.adapters.counters
    return RunResult(label, list(records.values()), wall, {
        "steps": steps, "mean_batch": sum(batch_sizes) / max(1, len(batch_sizes)),
        "mean_step_ms": 1000 * sum(step_times) / max(1, len(step_times)),
        "distinct_per_step": sum(distinct) / max(1, len(distinct)),
        "device_slot_loads": counters.loads.get(("device", "ok"), 0),
        "disk_loads": counters.loads.get(("disk", "ok"), 0),
        "preemptions": engine.scheduler.num_preemptions,
    })


# ---- transformers + PEFT --------------------------------------------------------------------

class HFPeftServer:
    """transformers + PEFT at its best for many adapters: ONE PeftModel holding every adapter,
    and each batch mixes adapters through `generate(..., adapter_names=[...])` (PEFT's mixed-batch
    LoRA). Static batching: when idle, take every request that has arrived (up to the cap),
    left-pad, generate to the longest output, repeat."""

    def __init__(self, model: ModelInfo, adapters: list[AdapterInfo], load: list[str]):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        base = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32, attn_implementation="sdpa")
        base.generation_config.eos_token_id = None  # the same fixed output lengths as ignore_eos
        by_name = {a.name: a for a in adapters}
        self.model = base.eval()
        self.loaded: list[str] = []
        for i, name in enumerate(load):
            if i == 0:
                self.model = PeftModel.from_pretrained(base, by_name[name].path, adapter_name=name).eval()
                self._lora_layers = [(n, m) for n, m in self.model.named_modules()
                                     if hasattr(m, "update_layer") and hasattr(m, "lora_A")]
            else:
                self._add_adapter(by_name[name].path, name)
            self.loaded.append(name)
        if len(self.loaded) > 1:
            self._check_against_load_adapter(by_name[self.loaded[-1]].path, self.loaded[-1])
        self.load_seconds = time.perf_counter() - t0
        self.pad_id = 0

    def _add_adapter(self, path: Path, name: str) -> None:
        """PeftModel.load_adapter, minus its whole-model module scans, which make loading n adapters
        O(n^2) (101 adapters took 180 s here). Same PEFT layers, config and weights: each LoRA layer
        gets the adapter through its own `update_layer`, then the saved A and B are copied in. Checked
        against `load_adapter` itself once per run (`_check_against_load_adapter`)."""
        import torch
        from peft import LoraConfig
        from safetensors.torch import load_file

        cfg = LoraConfig.from_pretrained(str(path))
        cfg.inference_mode = True
        if cfg.rank_pattern or cfg.alpha_pattern or cfg.use_dora or cfg.layers_to_transform is not None:
            self.model.load_adapter(path, adapter_name=name, low_cpu_mem_usage=True)  # not the simple case
            return
        state = load_file(str(path / "adapter_model.safetensors"))
        targets = set(cfg.target_modules) if not isinstance(cfg.target_modules, str) else None
        self.model.peft_config[name] = cfg
        with torch.no_grad():
            for mod_name, module in self._lora_layers:
                key_a, key_b = f"{mod_name}.lora_A.weight", f"{mod_name}.lora_B.weight"
                if key_a not in state or (targets is not None and mod_name.rsplit(".", 1)[-1] not in targets):
                    continue
                module.update_layer(name, cfg.r, cfg.lora_alpha, config=cfg)
                module.lora_A[name].weight.copy_(state[key_a])
                module.lora_B[name].weight.copy_(state[key_b])

    def _check_against_load_adapter(self, path: Path, name: str) -> None:
        import torch

        ref = "bench-check"
        self.model.load_adapter(path, adapter_name=ref)
        ids = torch.tensor([[11, 12, 13, 14, 15, 16]])
        with torch.inference_mode():
            got = self.model(input_ids=ids, adapter_names=[name]).logits
            want = self.model(input_ids=ids, adapter_names=[ref]).logits
            base = self.model(input_ids=ids, adapter_names=["__base__"]).logits
        self.model.delete_adapter(ref)
        diff, effect = (got - want).abs().max().item(), (want - base).abs().max().item()
        if not diff <= 1e-4 or not effect > 1e-3:
            raise RuntimeError(f"fast PEFT adapter loading differs from load_adapter: max |diff| {diff:.3g}, "
                               f"adapter effect {effect:.3g}")

    def close(self) -> None:
        self.model = None

    def replay(self, requests: list[Request], adapter_names: list[str], max_batch: int, label: str) -> RunResult:
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        class StepClock(LogitsProcessor):
            def __init__(self):
                self.times: list[float] = []

            def __call__(self, input_ids, scores):
                self.times.append(time.perf_counter())
                return scores

        records = {r.idx: Record(r.idx, r.adapter, r.arrival, len(r.prompt), r.output_len) for r in requests}
        pending = deque(sorted(requests, key=lambda r: r.arrival))
        batches, batch_sizes, padded_steps, useful_steps, distinct_steps, total_steps = 0, [], 0, 0, 0, 0
        mixed = hasattr(self.model, "peft_config")
        t0 = time.perf_counter()
        while pending:
            now = time.perf_counter() - t0
            if pending[0].arrival > now:
                _wait_until(t0, pending[0].arrival)
                continue
            batch = []
            while pending and pending[0].arrival <= now and len(batch) < max_batch:
                batch.append(pending.popleft())
            width = max(len(r.prompt) for r in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, r in enumerate(batch):  # left padding: every row's last prompt token is aligned
                ids[i, width - len(r.prompt):] = torch.tensor(r.prompt)
                mask[i, width - len(r.prompt):] = 1
            steps = max(r.output_len for r in batch)
            clock = StepClock()
            kwargs = {}
            if mixed:
                kwargs["adapter_names"] = [adapter_names[r.adapter] if r.adapter >= 0 else "__base__" for r in batch]
            with torch.inference_mode():
                out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                                          do_sample=False, pad_token_id=self.pad_id, eos_token_id=None,
                                          logits_processor=LogitsProcessorList([clock]), **kwargs)
            gen = out.shape[1] - width
            batches += 1
            batch_sizes.append(len(batch))
            padded_steps += steps * len(batch)
            distinct_steps += steps * len({r.adapter for r in batch if r.adapter >= 0})
            total_steps += steps
            useful_steps += sum(r.output_len for r in batch)
            for r in batch:  # a row's token k was produced at step k (streaming view, kindest to the baseline)
                rec = records[r.idx]
                n = min(r.output_len, gen, len(clock.times))
                rec.tokens = n
                if n:
                    rec.first_token = clock.times[0] - t0
                    rec.finish = clock.times[n - 1] - t0
        wall = time.perf_counter() - t0
        return RunResult(label, list(records.values()), wall, {
            "batches": batches, "mean_batch": sum(batch_sizes) / max(1, len(batch_sizes)),
            "wasted_row_steps_share": 1 - useful_steps / max(1, padded_steps),
            "distinct_per_step": distinct_steps / max(1, total_steps),
            "steps": total_steps,
            "adapters_loaded": len(self.loaded), "adapter_load_s": round(self.load_seconds, 2),
        })


# ---- loraplex over HTTP ---------------------------------------------------------------------

def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def engine_command() -> list[str] | None:
    """`loraplex-engine` from this interpreter's environment, or None while the API does not exist."""
    try:
        import importlib.util

        if importlib.util.find_spec("loraplex.engine.api.cli") is None:
            return None
    except ImportError:
        return None
    exe = Path(sys.executable).with_name("loraplex-engine")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "loraplex.engine.api.cli"]


async def sse_data(resp):
    """The `data:` payloads of a server-sent-events response. Lines end at LF (or CRLF), as the
    SSE format says, and nowhere else: httpx's `aiter_lines` also breaks at U+2028, U+0085 and the
    other characters of `str.splitlines`, which JSON written with ensure_ascii=False leaves raw
    inside strings (a random model's text has them), and would cut such an event in two."""
    buffer = ""
    async for text in resp.aiter_text():
        buffer += text
        *lines, buffer = buffer.split("\n")
        for line in lines:
            if line.startswith("data:"):
                yield line[5:].removeprefix(" ").removesuffix("\r")


class HttpEngine:
    """`loraplex-engine` as a subprocess on a loopback address (127.0.0.1 unless `host` says
    another, e.g. one per replica of a loopback fleet), adapters registered by a manifest file.
    `env` adds to the inherited environment (bench.saturation runs another tree's server so)."""

    def __init__(self, model: ModelInfo, settings: EngineSettings, adapters: list[AdapterInfo], adapter_dir: Path,
                 work_dir: Path, startup_timeout: float = 300.0, host: str = "127.0.0.1",
                 extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None):
        from loraplex.manifest import AdapterManifest, dump_manifest_list

        cmd = engine_command()
        if cmd is None:
            raise RuntimeError("loraplex.engine.api.cli is not available")
        work_dir.mkdir(parents=True, exist_ok=True)
        manifest = work_dir / "manifest.json"
        manifest.write_text(dump_manifest_list([AdapterManifest(name=a.name, uri=str(a.path)) for a in adapters]))
        self.port = _free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.served = "base"
        args = cmd + [
            "--model-id", str(model.path), "--served-model-name", self.served, "--host", host,
            "--port", str(self.port), "--device", "cpu", "--dtype", "float32", "--block-size", str(settings.block_size),
            "--num-kv-blocks", str(settings.num_kv_blocks()), "--max-num-seqs", str(settings.max_num_seqs),
            "--max-num-batched-tokens", str(settings.max_num_batched_tokens), "--max-model-len", str(settings.max_model_len),
            "--max-waiting", "100000", "--max-active-adapters", str(settings.max_active_adapters),
            "--max-cpu-adapters", str(settings.max_cpu_adapters), "--max-lora-rank", str(settings.max_lora_rank),
            "--adapter-dir", str(adapter_dir), "--adapter-manifest-file", str(manifest), "--log-level", "warning", *extra_args,
        ]
        self.log_path = work_dir / "engine.log"
        self._log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))  # env: e.g. another source tree's PYTHONPATH
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._wait_ready(startup_timeout, {a.name for a in adapters})

    def _wait_ready(self, timeout: float, names: set[str]) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"loraplex-engine exited with {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    listed = httpx.get(f"{self.url}/v1/adapters", timeout=10).json()
                    items = listed.get("data", listed.get("adapters", listed)) if isinstance(listed, dict) else listed
                    got = {a.get("name") for a in items} if isinstance(items, list) else set()
                    if names <= got:
                        return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.25)
        raise TimeoutError(f"loraplex-engine not ready in {timeout}s: {self.tail()}")

    def tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text()[-n:]
        return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    async def _one(self, client, rec: Record, prompt: list[int], model: str, t0: float, sem) -> None:
        body = {"model": model, "prompt": prompt, "max_tokens": rec.output_len, "temperature": 0.0,
                "ignore_eos": True, "stream": True, "logprobs": 0}
        delay = t0 + rec.arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        async with sem:
            try:
                async with client.stream("POST", f"{self.url}/v1/completions", json=body) as resp:
                    if resp.status_code != 200:
                        rec.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                        return
                    async for data in sse_data(resp):
                        if data == "[DONE]":
                            break
                        chunk = json.loads(data)
                        if "error" in chunk:
                            rec.error = str(chunk["error"])[:200]
                            break
                        for choice in chunk.get("choices", []):
                            lp = choice.get("logprobs") or {}
                            n = len(lp.get("tokens") or []) or (1 if choice.get("text") else 0)
                            if n:
                                if rec.first_token is None:
                                    rec.first_token = time.perf_counter() - t0
                                rec.tokens += n
                rec.finish = time.perf_counter() - t0
            except Exception as exc:  # a failed request is a record with an error, not a crashed run
                rec.error = f"{type(exc).__name__}: {exc}"[:200]

    async def _replay(self, requests: list[Request], adapter_names: list[str]) -> tuple[list[Record], float]:
        import httpx

        records = [Record(r.idx, r.adapter, r.arrival, len(r.prompt), r.output_len) for r in requests]
        sem = asyncio.Semaphore(1024)
        limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
            t0 = time.perf_counter()
            await asyncio.gather(*(self._one(client, rec, list(r.prompt),
                                             adapter_names[r.adapter] if r.adapter >= 0 else self.served, t0, sem)
                                   for rec, r in zip(records, requests)))
            return records, time.perf_counter() - t0

    def warm(self, names: list[str], vocab: int) -> float:
        """One 1-token request per adapter, so that every one is in host RAM before the replay."""
        from bench.workload import Request as Req

        t0 = time.perf_counter()
        reqs = [Req(i, 0.0, i, (11, 12, 13, min(14, vocab - 1)), 1) for i in range(len(names))]
        records, _ = asyncio.run(self._replay(reqs, names))
        bad = [r.error for r in records if r.error]
        if bad:
            raise RuntimeError(f"warm-up failed: {bad[:2]}")
        return time.perf_counter() - t0

    def replay(self, requests: list[Request], adapter_names: list[str], label: str) -> RunResult:
        records, wall = asyncio.run(self._replay(requests, adapter_names))
        return RunResult(label, records, wall, {"port": self.port})
