"""Rank 0's model runner and device slots under tensor parallelism (--tensor-parallel-size N > 1).

`TPModelRunner.run` is `ModelRunner.run` plus the step plan: before its own forward, rank 0
sends every worker the plan of the step (tp_worker.StepPlan), then all ranks run the forward on
their shards in lockstep (the collectives are in the model, parallel.py). Logits are computed
for the rows rank 0 needs (prompt logprobs in bounded chunks, then the sampling rows), and the
plan lists them, so the workers join the same gathers in the same order. No CUDA graphs (each rank would have to capture
and replay in step, with the collectives inside; not done yet).

Any error inside a TP step is fatal for the engine: after a failed or half-done collective the
ranks are out of step for good. The group is failed (workers killed), the batch's requests get
the error, and every later step fails at once until the server exits (api/app.py).

`ShardedDeviceSlots.write` writes rank 0's slices of an adapter into its own slots and sends
each worker its slices (tp_worker's "write_slot"), in the order of the step thread, so a
worker has them before the step plan that first uses the slot.
"""
from __future__ import annotations

import torch

from loraplex.engine.core.adapters.device_slots import DeviceSlots
from loraplex.engine.core.distributed import WorkerGroup, WorkerGroupError
from loraplex.engine.core.model_runner import ModelRunner, chunk_rows, prompt_logprob_chunks, record_chunk
from loraplex.engine.core.sampler import sample
from loraplex.engine.core.scheduler import ScheduledSeq
from loraplex.engine.core.tp_worker import LoRAShard, PlanItem, StepPlan
from loraplex.engine.model.parallel import TensorParallel, shard_lora


class TPModelRunner(ModelRunner):
    def __init__(self, model, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype,
                 workers: WorkerGroup, seed: int = 0, max_num_seqs: int = 256):
        super().__init__(model, num_blocks, block_size, device, dtype, seed=seed, max_num_seqs=max_num_seqs,
                         cuda_graphs=False)
        self.workers = workers

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq]) -> list[tuple[ScheduledSeq, int | None]]:
        self.workers.check()
        batch = sorted(batch, key=lambda item: item.seq.lora_slot) if len(batch) > 1 else batch
        chunks = prompt_logprob_chunks(batch)
        logit_chunks = [chunk_rows(chunk) for chunk in chunks]
        sampling, rows, end = [], [], 0
        for item in batch:
            end += item.num_tokens
            if item.samples:
                sampling.append(item)
                rows.append(end - 1)
        try:
            self.workers.send(("step", StepPlan([PlanItem.of(item) for item in batch], logit_chunks, rows)))
            step = self.prepare(batch)
            hidden = self.model(step.ids, step.positions, step.attn, step.lora, self.ops, self.kv_caches)
            # the same computations, in the same order, as every worker (tp_worker.Worker.on_step)
            for chunk, chunk_ids in zip(chunks, logit_chunks):
                record_chunk(chunk, self.model.compute_logits(hidden[chunk_ids]))
            logits = self.model.compute_logits(hidden[rows]) if rows else None
        except Exception as exc:
            if not isinstance(exc, WorkerGroupError):
                self.workers.fail_step(exc)
            raise WorkerGroupError(self.workers.failure) from exc
        tokens: dict[int, int] = {}
        if sampling:
            sampled = sample(logits, [item.seq for item in sampling], self.generator)
            tokens = {id(item): t for item, t in zip(sampling, sampled)}
        return [(item, tokens.get(id(item))) for item in batch]


class ShardedDeviceSlots(DeviceSlots):
    """The device tier when each rank holds a slice of every slot."""

    def __init__(self, projections: list, num_slots: int, workers: WorkerGroup):
        super().__init__(projections, num_slots)
        self.workers = workers

    @torch.no_grad()
    def write(self, slot: int, weights) -> None:
        size = self.workers.size
        shards = {r: shard_lora(weights.weights, TensorParallel(r, size)) for r in range(1, size)}
        self.workers.send_each({r: ("write_slot", slot, s) for r, s in shards.items()})
        super().write(slot, LoRAShard(shard_lora(weights.weights, TensorParallel(0, size))))
