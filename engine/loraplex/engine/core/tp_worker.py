"""A tensor-parallel worker (ranks 1..N-1): `python -m loraplex.engine.core.tp_worker`.

Rank 0 (the `loraplex-engine` process) starts the workers itself (distributed.py) and keeps
everything with state: HTTP, scheduler, block manager, adapter tiers, sampler. A worker holds
its shard of the weights, its heads' KV cache and its slices of the LoRA slots, and does only
what rank 0's messages say. Messages arrive in order on one socket per worker, one pickle
each (nano-vllm's step plan, sent over a socket instead of shared memory):

    ("join",)                   every worker said hello: join the process group
    ("load", LoadSpec)          load this rank's shard                      -> ("ok", None)
    ("profile", kwargs)         CUDA: the KV-sizing forward, with rank 0    -> ("ok", blocks)
    ("runner", kwargs)          allocate the KV cache and step buffers      -> ("ok", None)
    ("write_slot", slot, dict)  copy this rank's LoRA slices into a slot    (no reply)
    ("step", StepPlan)          one forward, in lockstep with rank 0        (no reply)
    ("stop",)                   exit 0

A slot write is sent by rank 0 when it writes its own slice (on its step thread, before the
forward that first reads the slot), so the socket's order puts it before that step's plan.
Evictions need no message: a slot's next write overwrites it.

Failure: a worker that cannot do a command logs why and exits 1 (rank 0's watchdog sees it);
a worker whose rank 0 went away (its socket reads EOF, or its parent process changed) exits
at once. Collectives time out after the group timeout, so nothing waits forever.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import pickle
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

log = logging.getLogger("loraplex.engine.tp")

ORPHAN_CHECK_SECONDS = 0.5


@dataclass
class PlanItem:
    """One scheduled sequence, as much of it as `ModelRunner.prepare` reads: it quacks like a
    `ScheduledSeq` and its `Sequence` at once (`item.seq` is itself)."""

    new_tokens: list[int]  # the tokens computed this step (a decode: one)
    num_computed_tokens: int  # tokens already in the KV cache before this step
    block_table: list[int]
    lora_slot: int  # -1: no adapter
    lora_rank: int

    @classmethod
    def of(cls, item) -> "PlanItem":
        seq, n = item.seq, item.num_tokens
        first = seq.num_computed_tokens
        return cls(seq.token_slice(first, first + n), first, list(seq.block_table), seq.lora_slot, seq.lora_rank)

    @property
    def seq(self) -> "PlanItem":
        return self

    @property
    def num_tokens(self) -> int:
        return len(self.new_tokens)

    def token_slice(self, start: int, end: int) -> list[int]:
        assert start == self.num_computed_tokens and end == start + len(self.new_tokens)
        return self.new_tokens


@dataclass
class StepPlan:
    """What every rank needs for one forward. `items` are in rank 0's batch order (already
    sorted by LoRA slot), so every rank's `prepare` builds the same flattened inputs: token ids,
    positions, cache slots, prefill spans, decode rows, block tables, context lengths and LoRA
    segments. The rows of the final hidden states whose logits rank 0 needs: `logit_chunks`, the
    prompt-logprob rows in bounded chunks (model_runner.prompt_logprob_chunks), then
    `sample_rows`; every rank computes its vocabulary slice of each, in this order, for the
    gathers."""

    items: list[PlanItem]
    logit_chunks: list[list[int]] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)


@dataclass
class LoadSpec:
    model_dir: str
    dtype: str  # "float32", ...
    num_lora_slots: int
    max_lora_rank: int
    max_positions: int
    num_threads: int | None


@dataclass
class LoRAShard:
    """This rank's slices of one adapter, in the shape `DeviceSlots.write` takes."""

    weights: dict


def send(conn: Connection, message) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def recv(conn: Connection):
    return pickle.loads(conn.recv_bytes())


class Worker:
    def __init__(self, conn: Connection, rank: int, size: int, device):
        from loraplex.engine.model.parallel import TensorParallel

        self.conn, self.device = conn, device
        self.tp = TensorParallel(rank, size)
        self.model = self.runner = self.slots = None

    def serve(self) -> int:
        while True:
            try:
                message = recv(self.conn)
            except (EOFError, OSError):
                log.warning("tp rank %d: rank 0 went away; exiting", self.tp.rank)
                return 1
            kind, args = message[0], message[1:]
            if kind == "stop":
                return 0
            result = getattr(self, f"on_{kind}")(*args)
            if kind in ("load", "profile", "runner"):
                send(self.conn, ("ok", result))

    def on_load(self, spec: LoadSpec) -> None:
        import torch

        from loraplex.engine.core.adapters.device_slots import DeviceSlots
        from loraplex.engine.core.config import DTYPES
        from loraplex.engine.model.loader import load_model

        if spec.num_threads:
            torch.set_num_threads(spec.num_threads)
        self.dtype = DTYPES[spec.dtype]
        self.model = load_model(spec.model_dir, self.dtype, self.device, num_lora_slots=spec.num_lora_slots,
                                max_lora_rank=spec.max_lora_rank, max_positions=spec.max_positions, tp=self.tp)
        self.slots = DeviceSlots(list(self.model.lora_projections()), spec.num_lora_slots)

    def on_profile(self, kwargs: dict) -> int:
        from loraplex.engine.core.model_runner import profile_kv_blocks

        return profile_kv_blocks(self.model, self.device, self.dtype, **kwargs)

    def on_runner(self, kwargs: dict) -> None:
        from loraplex.engine.core.model_runner import ModelRunner

        self.runner = ModelRunner(self.model, device=self.device, dtype=self.dtype, cuda_graphs=False, **kwargs)

    def on_write_slot(self, slot: int, weights: dict) -> None:
        self.slots.write(slot, LoRAShard(weights))

    def on_step(self, plan: StepPlan) -> None:
        import torch

        with torch.inference_mode():
            step = self.runner.prepare(plan.items)
            hidden = self.model(step.ids, step.positions, step.attn, step.lora, self.runner.ops, self.runner.kv_caches)
            for rows in [*plan.logit_chunks, plan.sample_rows]:
                if rows:
                    self.model.compute_logits(hidden[rows])


def _exit_when_orphaned(parent: int) -> None:
    """Rank 0 died without closing our socket (it cannot: SIGKILL closes it, but a worker busy
    in a collective reads no socket): exit once we are reparented."""
    while True:
        time.sleep(ORPHAN_CHECK_SECONDS)
        if os.getppid() != parent:
            log.error("tp worker: rank 0 (pid %d) is gone; exiting", parent)
            os._exit(1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="loraplex-tp-worker", description="A tensor-parallel worker; started by loraplex-engine.")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--store-file", required=True, help="rank 0's FileStore (in a folder only this user can read)")
    p.add_argument("--fd", type=int, required=True, help="this worker's socket to rank 0 (inherited)")
    p.add_argument("--device", choices=["cpu", "cuda"], required=True)
    p.add_argument("--timeout", type=float, required=True, help="collective and rendezvous timeout, seconds")
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s tp-rank-{args.rank} %(name)s: %(message)s")
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True, name="orphan-check").start()
    conn = Connection(args.fd)

    import torch
    import torch.distributed as dist

    device = torch.device("cpu")
    if args.device == "cuda":
        torch.cuda.set_device(args.rank)
        device = torch.device("cuda", args.rank)
    timeout = datetime.timedelta(seconds=args.timeout)
    send(conn, ("hello", os.getpid()))
    # Join only once every worker is up (imports can be slow): the rendezvous then takes
    # moments, well within the collective timeout it runs under.
    if recv(conn)[0] != "join":
        return 1
    store = dist.FileStore(args.store_file, args.size)
    store.set_timeout(timeout)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", store=store, rank=args.rank,
                            world_size=args.size, timeout=timeout)
    worker = Worker(conn, args.rank, args.size, device)
    try:
        return worker.serve()
    except Exception as exc:
        log.exception("tp rank %d failed", args.rank)
        try:
            send(conn, ("error", f"tp rank {args.rank}: {type(exc).__name__}: {exc}"))
        except OSError:
            pass
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


if __name__ == "__main__":
    # os._exit: a process group whose peers died must not block interpreter shutdown.
    os._exit(main())
