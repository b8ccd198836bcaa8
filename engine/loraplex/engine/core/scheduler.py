"""Continuous batching: every step, pick which sequences run and how many tokens each computes.

Policy, in order:
1. Running sequences first, oldest first: a decode takes one token, an unfinished (chunked)
   prefill takes what the budget leaves. When the KV cache is full, the newest running
   sequence is preempted (its blocks freed, its tokens recomputed later) until the older fits.
2. Then waiting sequences, oldest first, while the token budget, the sequence cap and the free
   blocks allow. Long prompts are chunked to the budget. Preempted sequences wait at the front.
   A step that preempted admits nobody (as vLLM does): the blocks it just freed are what the
   running sequences needed. A preempted sequence comes back only when the free blocks hold
   every token it had, and takes them all at once: readmitted for its first chunk alone, its
   next chunk would preempt it again, a lap every step that recomputes and counts for nothing.
   A waiting sequence whose adapter is not on the device yet is skipped (its load runs off the
   step loop) and keeps its place; one that cannot get blocks stops admission, so a large
   request is never overtaken forever by small ones. With prefix caching, an admitted
   sequence shares the cached blocks of its longest cached prefix (same tokens, same adapter)
   and its prefill starts after them.
3. Fairness across adapters: once the oldest sequence whose adapter is loaded but finds every
   device slot pinned has waited `adapter_fairness_seconds`, no younger sequence may pin a slot
   (base-model and preload-adapter sequences still may: they never hold a slot it could get).
   The running sequences drain, the first slot that frees goes to that oldest one, and so a
   cold adapter waits at most the aging time plus the time one slot's running sequences take
   to finish, however hot the resident adapters are.
4. Fairness across tenants (`tenant_scheduling="vtc"`, the default; tenant_share.py): step 2
   walks the waiting queue tenant by tenant, the tenant with the smallest virtual counter
   (service received / weight; prompt tokens cost 1, sampled tokens 2, charged here as each
   step is scheduled) first, ties to the tenant whose next sequence is older; within a tenant
   the order above (preempted first, then oldest). The rules of 2 compose per candidate: one
   skipped for its adapter keeps its place and its tenant's next sequence is tried; one that
   cannot get blocks stops admission for every tenant, so it is not overtaken forever: its
   tenant's counter does not grow while it waits (its tenant's running sequences aside), the
   others' do, and it is first again within the bound below. A preempted sequence waits at its
   tenant's front, not the queue's: readmitted out of tenant order it would break the bound.
   The adapter rule 3 outranks tenant order: the tenant of the oldest sequence starved of a
   slot goes first until that sequence has been tried, so the first slot that frees is its.
   Bound: two tenants f, g with waiting work throughout an interval, and no waiting sequence
   held back by its adapter, receive weighted services (service / weight) within
   N U (1/w_f + 1/w_g) of each other, N = max_num_seqs and U the largest cost of one request
   (prompt + 2 x max_tokens, at most 2 x max_model_len); proof in tenant_share.py. A tenant back
   from idle starts level with the least-served waiting tenant: no credit for idle time.
   With `tenant_scheduling="fcfs"` admission is step 2's queue order across tenants.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from loraplex.engine.core.block_manager import BlockManager
from loraplex.engine.core.sequence import Sequence, SeqStatus
from loraplex.engine.core.tenant_share import FifoOrder, TenantOrder, TenantShare

TENANT_SCHEDULING = ("vtc", "fcfs")


class AdapterGate(Protocol):
    """How the scheduler asks for a sequence's adapter to be on the device."""

    def acquire(self, seq: Sequence) -> bool: ...  # True: seq.lora_slot/lora_rank set, slot pinned

    def release(self, seq: Sequence) -> None: ...

    def waiting_for_slot(self, seq: Sequence) -> bool: ...  # loaded, but every slot is pinned

    def holds_a_free_slot_hostage(self, seq: Sequence) -> bool: ...  # admitting seq pins a slot others could get


class NoAdapters:
    def acquire(self, seq: Sequence) -> bool:
        return seq.adapter is None

    def release(self, seq: Sequence) -> None:
        pass

    def waiting_for_slot(self, seq: Sequence) -> bool:
        return False

    def holds_a_free_slot_hostage(self, seq: Sequence) -> bool:
        return False


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens computed for seq this step

    @property
    def samples(self) -> bool:
        """True when this step completes the sequence's known tokens, so a new one is sampled."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    adapter_fairness_seconds: float = 0.0  # see 3. above
    tenant_scheduling: str = "vtc"  # see 4. above: vtc | fcfs

    def __post_init__(self):
        if self.tenant_scheduling not in TENANT_SCHEDULING:
            raise ValueError(f"tenant_scheduling must be one of {TENANT_SCHEDULING}, not {self.tenant_scheduling!r}")


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, adapters: AdapterGate | None = None):
        self.config = config
        self.blocks = block_manager
        self.adapters = adapters or NoAdapters()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.tenants = TenantShare()  # counted under fcfs too: the metrics show who gets what

    def add(self, seq: Sequence) -> None:
        self.tenants.arrived(seq)
        self.waiting.append(seq)

    def tenant_stats(self) -> dict[str, dict]:
        """Per tenant with work: waiting, running, virtual_service (its counter), weight. Read at
        scrape time from another thread (plain reads of a copy)."""
        return self.tenants.stats()

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.config.max_num_batched_tokens
        batch: list[ScheduledSeq] = []

        # 1. running sequences, oldest first
        running = list(self.running)
        preempted = False
        while running and budget > 0:
            seq = running.pop(0)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.blocks.can_hold(seq, seq.num_computed_tokens + n):
                victim = running.pop() if running else seq
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self.blocks.grow(seq, seq.num_computed_tokens + n)
                self.tenants.charge(seq, n)
                batch.append(ScheduledSeq(seq, n))
                budget -= n

        # 2. waiting sequences, oldest first (4. tenant by tenant)
        starved = False  # 3. an older sequence waits for a slot: younger ones may not pin one
        now = time.monotonic()
        can_admit = self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not preempted
        order = self._waiting_order(now) if can_admit else FifoOrder(self.waiting)  # built only when needed
        while budget > 0 and len(self.running) < self.config.max_num_seqs and not preempted:
            seq = order.head()
            if seq is None:
                break
            # The adapter first: its identity is part of the prefix cache's hashes.
            if (starved and self.adapters.holds_a_free_slot_hostage(seq)) or not self.adapters.acquire(seq):
                if seq.adapter_wait_time is None:
                    seq.adapter_wait_time = now
                if not starved and self._aged_for_a_slot(seq, now):
                    starved = True
                order.pass_over(seq)
                continue
            hits = self.blocks.cached_prefix(seq)  # a waiting sequence holds no blocks
            start = len(hits) * self.blocks.block_size
            n = min(seq.num_tokens - start, budget)
            reserve = seq.num_tokens if seq.num_preemptions else start + n
            if not self.blocks.can_admit(seq, hits, reserve):
                self.adapters.release(seq)
                break
            order.take(seq)
            self.blocks.admit(seq, hits)  # prefill starts after the cached prefix
            self.blocks.grow(seq, reserve)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            self.tenants.admitted(seq)
            self.tenants.charge(seq, n)  # before the next pick: the counters order what follows
            batch.append(ScheduledSeq(seq, n))
            budget -= n
        order.done()
        return batch

    def _aged_for_a_slot(self, seq: Sequence, now: float) -> bool:
        return now - seq.arrival_time >= self.config.adapter_fairness_seconds and self.adapters.waiting_for_slot(seq)

    def _waiting_order(self, now: float) -> FifoOrder | TenantOrder:
        """The order step 2 walks the waiting queue in. With one tenant waiting, tenant order is
        queue order; with more, a heap over the waiting tenants (their queues are kept by
        TenantShare), plus one look along the queue for rule 3's oldest starved sequence."""
        if self.config.tenant_scheduling == "fcfs" or self.tenants.num_queued < 2:
            return FifoOrder(self.waiting)
        # 3. outranks 4.: the oldest sequence starved of a slot (skipped before) goes first.
        first = next((s for s in self.waiting if s.adapter_wait_time is not None and self._aged_for_a_slot(s, now)),
                     None)
        return TenantOrder(self.tenants, self.waiting, first)

    def _preempt(self, seq: Sequence) -> None:
        """Free seq's KV and requeue it at the front; its tokens are recomputed on readmission."""
        self.running.remove(seq)
        self.blocks.free(seq)
        self.adapters.release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.tenants.preempted(seq)

    def finish_step(self, batch: list[ScheduledSeq]) -> None:
        """Advance computed counts; retire finished sequences and release their resources."""
        for item in batch:
            item.seq.num_computed_tokens += item.num_tokens
            if item.seq.error is None:  # a failed forward leaves no KV worth sharing
                self.blocks.cache_full_blocks(item.seq)
        for seq in [s for s in self.running if s.is_finished]:
            self.retire(seq)

    def retire(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.tenants.left(seq, was_waiting=False)
        elif seq in self.waiting:
            self.waiting.remove(seq)
            self.tenants.left(seq, was_waiting=True)
        self.blocks.free(seq)
        self.adapters.release(seq)
        seq.status = SeqStatus.FINISHED
