"""--tensor-parallel-size 2 on the CPU (gloo, two processes), through the real CLI and HTTP.

- Parity: a size-2 engine gives the size-1 engine's greedy tokens, and its prompt and token
  logprobs within 1e-4, for the base and adapters in one burst of concurrent requests (mixed
  batches): on a GQA Llama (4 heads, 2 kv heads: one kv head per rank) with an adapter on
  q/k/v/o and an all-linear one (gate/up/down too), on Qwen2 (qkv bias, tied vocab-parallel
  embedding and lm_head) with two adapters sharing one device slot (every rank's slot is
  rewritten after each eviction), on Phi-3 (fused qkv_proj / gate_up_proj weights, an adapter
  on the fused names), on Mixtral (every expert split, LoRA on attention) and on a block-wise fp8
  Llama. The size-1 reference is the engine in this process (LLMEngine, the code
  path every size-1 server runs). Observed differences: ~2e-5 or less (the all-reduce sums
  partial products in another order).
- A worker SIGKILLed while a request streams: the stream ends with an error, /health answers 503
  (or the server has exited), and the server exits non-zero within KILL_BOUND_SECONDS.
- A worker SIGSTOPped (hung, not dead): the same, once the collective timeout runs out.
- Rank 0 SIGKILLed: its worker exits within ORPHAN_BOUND_SECONDS.
- Rendezvous: no process of a size-2 engine (rank 0 and its worker) listens on an address
  other than loopback (the store is a FileStore in a private folder; gloo binds lo), and prompt
  logprobs of a prompt longer than one logits chunk match size 1.
- Start-up errors: a size that does not divide the heads exits 1 with the reason, before any
  worker starts; an fp8 base whose blocks the shards would cut is refused, naming the projections.
"""
from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import threading
import time

import httpx
import pytest

from loraplex.engine.api.cli import build_parser
from tests.engine.api.conftest import ENGINE_BIN, ROOT, EngineProcess, free_port, metric, parse_metrics, wait_until
from bench.tiny import ALL_MODULES, make_tiny_adapter, make_tiny_checkpoint, make_tiny_fp8_checkpoint

LOGPROB_ATOL = 1e-4
MAX_NEW = 12
KILL_BOUND_SECONDS = 30  # worker killed -> rank 0 process gone (observed: see docs/engine.md)
ORPHAN_BOUND_SECONDS = 10  # rank 0 killed -> worker gone
PROMPTS = ["The quick brown fox", "Paris is the capital of France. Berlin is",
           "LoRA adapters share one base model; the KV cache is paged in blocks."]
ADAPTERS = {"llama": {"qkvo": dict(rank=8, seed=12, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
                      "all": dict(rank=16, seed=13, target_modules=ALL_MODULES)},
            "qwen2": {"all": dict(rank=8, seed=14, target_modules=ALL_MODULES),
                      "qkvo": dict(rank=4, seed=15, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])},
            # fused qkv_proj / gate_up_proj in the checkpoint and in the adapter: each rank reads
            # its rows of every part of the fused tensor
            "phi3": {"fused": dict(rank=8, seed=16, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])},
            # sparse MoE: every expert split, the router whole; LoRA on attention
            "mixtral": {"attn": dict(rank=8, seed=17, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])}}
# A block-wise fp8 Llama (16x16 blocks: each rank's slice of every projection is whole blocks),
# with the Llama adapters (LoRA applies on top of the dequantized base).
FP8 = "llama-fp8"
FAMILIES = [*ADAPTERS, FP8]
# Qwen2's server has one device slot: its two adapters take turns, so every rank's slot is
# rewritten with another adapter's slices (evictions), not only written once.
EXTRA_ARGS = {"qwen2": ["--max-active-adapters", "1"]}
ENV = {"OMP_NUM_THREADS": "1"}


def tp_args(model: str, adapter_dir: str, size: int = 2) -> list[str]:
    return ["--model-id", model, "--device", "cpu", "--num-threads", "1", "--num-kv-blocks", "128",
            "--adapter-dir", adapter_dir, "--tensor-parallel-size", str(size)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """family -> (base checkpoint, adapter dir) with the adapters of ADAPTERS."""
    root = tmp_path_factory.mktemp("tp")
    out = {}
    for family, specs in ADAPTERS.items():
        base = make_tiny_checkpoint(root / family, family)
        for name, kw in specs.items():
            make_tiny_adapter(base, root / f"{family}-adapters" / name, **kw)
        out[family] = (str(base), str(root / f"{family}-adapters"))
    fp8 = make_tiny_fp8_checkpoint(out["llama"][0], root / FP8, root / "fp8-dequantized", block=(16, 16))
    out[FP8] = (str(fp8), out["llama"][1])
    return out


def adapters_of(family: str) -> dict:
    return ADAPTERS["llama" if family == FP8 else family]


@pytest.fixture(scope="module")
def tp_servers(checkpoints, tmp_path_factory):
    """One size-2 server per family, started together. The last test of this module kills the
    llama one's rank 0 (test_workers_exit_when_rank_0_dies)."""
    logs = tmp_path_factory.mktemp("tp-logs")
    servers = {f: EngineProcess(f"tp2-{f}", [*tp_args(*checkpoints[f]), *EXTRA_ARGS.get(f, [])], logs / f"{f}.log",
                                env=ENV) for f in checkpoints}
    try:
        for server in servers.values():
            server.wait_ready()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def size_1_reference(model: str, adapter_dir: str, requests: list[tuple[str, str | None]]) -> list[dict]:
    from loraplex.engine.core.config import EngineConfig
    from loraplex.engine.core.llm_engine import LLMEngine
    from loraplex.engine.core.sampling_params import SamplingParams
    from loraplex.manifest import AdapterManifest

    engine = LLMEngine(EngineConfig(model_id=model, device="cpu", num_kv_blocks=128, num_threads=1, adapter_dir=adapter_dir))
    try:
        for name in sorted({a for _, a in requests if a}):
            engine.adapters.register(AdapterManifest(name=name, source="local", uri=name))
        params = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True, logprobs=0, prompt_logprobs=True)
        return engine.generate([p for p, _ in requests], params, [a for _, a in requests])
    finally:
        engine.shutdown()


def generate_concurrently(url: str, requests: list[tuple[str, str | None]]) -> list[dict]:
    """LoRAX /generate with token and prompt details, all requests at once (so they batch)."""
    results: list = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def one(i: int, prompt: str, adapter: str | None) -> None:
        params = {"max_new_tokens": MAX_NEW, "details": True, "decoder_input_details": True, "ignore_eos_token": True}
        if adapter:
            params["adapter_id"] = adapter
        start.wait()
        results[i] = httpx.post(url + "/generate", json={"inputs": prompt, "parameters": params}, timeout=120)

    threads = [threading.Thread(target=one, args=(i, *r)) for i, r in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert r.status_code == 200, r.text
    return [r.json()["details"] for r in results]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_size_2_matches_size_1_over_http(family, checkpoints, tp_servers):
    server = tp_servers[family]
    info = httpx.get(server.url + "/info").json()
    assert info["tensor_parallel_size"] == 2 and len(info["tensor_parallel_worker_pids"]) == 1
    if family == FP8:  # rank 0 holds its half of the fp8 weights
        assert info["quantization"] == "fp8" and info["weight_bytes"] < 0.6 * info["weight_bytes_unquantized"]
    requests = [(p, a) for a in (None, *adapters_of(family)) for p in PROMPTS]
    want = size_1_reference(*checkpoints[family], requests)
    got = generate_concurrently(server.url, requests)
    worst = 0.0
    for (prompt, adapter), ref, details in zip(requests, want, got):
        assert [t["id"] for t in details["tokens"]] == ref["token_ids"], (family, adapter, prompt)
        served = [t["logprob"] for t in details["prefill"][1:]] + [t["logprob"] for t in details["tokens"]]
        expected = ref["prompt_logprobs"][1:] + [lp.logprob for lp in ref["logprobs"]]  # [0]: None, no context
        assert len(served) == len(expected)
        worst = max(worst, max(abs(s - e) for s, e in zip(served, expected)))
    print(f"{family}: {len(requests)} requests, largest logprob difference size 2 vs size 1: {worst:.2e}")
    assert worst <= LOGPROB_ATOL
    # the adapters change the tokens, so their rows prove the sharded LoRA path
    base = [r["token_ids"] for r, (_, a) in zip(want, requests) if a is None]
    for name in adapters_of(family):
        assert [r["token_ids"] for r, (_, a) in zip(want, requests) if a == name] != base, name
    if family in EXTRA_ARGS:  # one slot, two adapters: one was evicted for the other
        evictions = metric(parse_metrics(httpx.get(server.url + "/metrics").text),
                           "loraplex_adapter_evictions_total", tier="device")
        assert evictions >= 1


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def stream_and_signal(server: EngineProcess, pid: int, sig: int) -> tuple[list[dict], float]:
    """Stream a long completion; after its first chunk send `sig` to `pid`. Returns the events
    (an error body last if the stream failed) and when the signal was sent."""
    body = {"model": "all", "prompt": PROMPTS[0], "max_tokens": 400, "ignore_eos": True, "stream": True}
    events, signalled_at = [], None
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        try:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                events.append(json.loads(line[6:]))
                if signalled_at is None:
                    os.kill(pid, sig)
                    signalled_at = time.monotonic()
        except httpx.TransportError:  # the server went away before it could send the error
            events.append({"error": "connection closed"})
    return events, signalled_at


@pytest.mark.slow
def test_a_killed_worker_fails_the_engine_cleanly(checkpoints, tmp_path):
    server = EngineProcess("tp2-kill", tp_args(*checkpoints["llama"]), tmp_path / "kill.log", env=ENV)
    try:
        server.wait_ready()
        (worker,) = httpx.get(server.url + "/info").json()["tensor_parallel_worker_pids"]
        events, killed_at = stream_and_signal(server, worker, signal.SIGKILL)
        ended = time.monotonic() - killed_at
        assert "error" in events[-1], events[-3:]
        assert sum(len(e["choices"][0]["text"]) > 0 for e in events if "choices" in e) < 400
        try:
            health = httpx.get(server.url + "/health", timeout=5)
            assert health.status_code == 503 and "worker 1" in health.json()["error"]["message"], health.text
        except httpx.TransportError:
            pass  # already exited
        code = server.proc.wait(KILL_BOUND_SECONDS)
        exited = time.monotonic() - killed_at
        print(f"worker killed: stream ended after {ended:.2f} s, rank 0 exited with {code} after {exited:.2f} s")
        assert code != 0
        assert "tensor-parallel worker 1" in server.log_tail(20000)
    finally:
        server.stop()


@pytest.mark.slow
def test_a_hung_worker_times_out_and_fails_the_engine(checkpoints, tmp_path):
    """A worker that stops answering without dying (SIGSTOP): rank 0's collective times out after
    --tensor-parallel-timeout, and the engine fails as for a dead worker."""
    server = EngineProcess("tp2-hang", [*tp_args(*checkpoints["llama"]), "--tensor-parallel-timeout", "3"],
                           tmp_path / "hang.log", env=ENV)
    try:
        server.wait_ready()
        (worker,) = httpx.get(server.url + "/info").json()["tensor_parallel_worker_pids"]
        events, stopped_at = stream_and_signal(server, worker, signal.SIGSTOP)
        ended = time.monotonic() - stopped_at
        assert "error" in events[-1], events[-3:]
        code = server.proc.wait(KILL_BOUND_SECONDS)
        print(f"worker stopped: stream ended after {ended:.2f} s, rank 0 exited with {code} "
              f"after {time.monotonic() - stopped_at:.2f} s")
        assert code != 0 and ended >= 2.5  # the collective waited for its timeout, not less
        assert "tensor-parallel step failed on rank 0" in server.log_tail(20000)
        wait_until(lambda: not pid_alive(worker), 10, "the stopped worker to be killed")
    finally:
        server.stop()


@pytest.mark.slow
def test_workers_exit_when_rank_0_dies(tp_servers):
    server = tp_servers["llama"]
    (worker,) = httpx.get(server.url + "/info").json()["tensor_parallel_worker_pids"]
    assert pid_alive(worker)
    server.proc.kill()
    killed_at = time.monotonic()
    server.proc.wait(10)
    wait_until(lambda: not pid_alive(worker), ORPHAN_BOUND_SECONDS, "the orphaned worker to exit")
    print(f"rank 0 killed: worker gone after {time.monotonic() - killed_at:.2f} s")


def test_a_size_that_does_not_divide_the_heads_exits_1_before_starting_workers(checkpoints):
    model, adapters = checkpoints["llama"]  # 4 heads, 2 kv heads, intermediate 128
    proc = subprocess.run([str(ENGINE_BIN), *tp_args(model, adapters, size=3), "--port", str(free_port())],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, **ENV})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert ("--tensor-parallel-size 3 cannot split LlamaForCausalLM: num_attention_heads 4 is not divisible by it; "
            "num_key_value_heads 2 is not divisible by it") in proc.stderr, proc.stderr
    assert "worker pids" not in proc.stderr  # refused before any worker process started


def test_an_fp8_base_whose_blocks_the_shards_would_cut_is_refused(checkpoints, tmp_path):
    from loraplex.engine.core.config import EngineConfig
    from loraplex.engine.core.llm_engine import LLMEngine
    from loraplex.engine.model.config import UnsupportedModelError

    # 32x32 blocks: k and v have 2 heads x 16 = 32 rows, one block, which 2 ranks would cut
    model = make_tiny_fp8_checkpoint(checkpoints["llama"][0], tmp_path / "fp8", tmp_path / "dequantized", block=(32, 32))
    with pytest.raises(UnsupportedModelError) as exc:
        LLMEngine(EngineConfig(model_id=str(model), device="cpu", num_kv_blocks=64, tensor_parallel_size=2))
    assert "its fp8 weight blocks (32x32) would be cut by the shard boundaries of k_proj, v_proj" in str(exc.value)


@pytest.mark.parametrize("args,message", [
    (["--tensor-parallel-size", "0"], "positive integer"),
    (["--tensor-parallel-timeout", "0"], "must be > 0"),
])
def test_cli_rejects_bad_tensor_parallel_flags(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--model-id", "x", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_maps_the_tensor_parallel_flags():
    from loraplex.engine.api.cli import configs_from_args

    config, _ = configs_from_args(build_parser().parse_args(
        ["--model-id", "m", "--tensor-parallel-size", "4", "--tensor-parallel-timeout", "7.5"]))
    assert (config.tensor_parallel_size, config.tensor_parallel_timeout) == (4, 7.5)
    defaults, _ = configs_from_args(build_parser().parse_args(["--model-id", "m"]))
    assert defaults.tensor_parallel_size == 1  # size 1: no process group, no workers


def listening_sockets(pid: int) -> list[str]:
    """"address:port" of every listening TCP socket the process holds (IPv4 and IPv6)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for table, size in (("tcp", 4), ("tcp6", 16)):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in list(f)[1:]:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state != "0A" or inode not in inodes:  # 0A: LISTEN
                    continue
                hex_addr, hex_port = local.split(":")
                # /proc prints the address as 32-bit words in host (little-endian) order
                raw = b"".join(bytes.fromhex(hex_addr[i:i + 8])[::-1] for i in range(0, len(hex_addr), 8))
                found.append(f"{ipaddress.ip_address(raw[:size])}:{int(hex_port, 16)}")
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.rsplit(":", 1)[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


@pytest.mark.slow
def test_the_rendezvous_listens_on_loopback_only(checkpoints, tmp_path):
    """The store and the collectives' sockets of a tensor-parallel engine must not be reachable
    from the pod network: every listening socket of rank 0 and of its worker is loopback."""
    model, adapters = checkpoints["llama"]
    server = EngineProcess("tp2-sockets", tp_args(model, adapters), tmp_path / "sockets.log", env=ENV)
    try:
        server.wait_ready()
        (worker,) = httpx.get(server.url + "/info").json()["tensor_parallel_worker_pids"]
        # a step, so that every lazily made connection exists
        long_prompt = " ".join(PROMPTS * 4)  # more prompt rows than one logits chunk (128)
        requests = [(long_prompt, None), (long_prompt, "all")]
        got = generate_concurrently(server.url, requests)
        sockets = {pid: listening_sockets(pid) for pid in (server.proc.pid, worker)}
        print(f"listening sockets by pid: {sockets}")
        assert f"127.0.0.1:{server.port}" in sockets[server.proc.pid]  # the test sees the HTTP socket
        exposed = {pid: [a for a in addrs if not is_loopback(a)] for pid, addrs in sockets.items()}
        assert not any(exposed.values()), exposed
    finally:
        server.stop()
    want = size_1_reference(model, adapters, requests)
    for ref, details in zip(want, got):
        assert len(details["prefill"]) > 128
        served = [t["logprob"] for t in details["prefill"][1:]]
        assert max(abs(s - e) for s, e in zip(served, ref["prompt_logprobs"][1:])) <= LOGPROB_ATOL
        assert [t["id"] for t in details["tokens"]] == ref["token_ids"]
