"""One simulated engine replica, following loraplex's own scheduler and adapter cache.

It mirrors, rule for rule, what engine/loraplex/engine/core/scheduler.py and engine/loraplex/engine/core/adapters/manager.py do:
- Scheduling, each step: running sequences first (a decode takes one token), then waiting
  ones oldest first while the token budget and the sequence cap allow. A waiting sequence
  whose adapter is not in a device slot is skipped and keeps its place. The KV cache is sized
  so that nothing is preempted (as the real runs configure it), so preemption is not modelled.
- Device slots: an adapter needs a slot to run; a slot used by a running sequence is pinned;
  a free slot is taken first, else the least recently used unpinned one is evicted. Placing
  an adapter copies it host -> device on the step thread: the copy's time is added to the step.
- Host RAM: weights loaded from disk stay in an LRU of `host_slots` (adapters in device slots
  count too); beyond it the least recently used one not in a slot and not wanted by a waiting
  request is dropped.
- Disk -> host loads start when a request arrives (`add_sequence` calls `request_load`) and
  run on a pool of `loader_workers` threads, off the step; their durations are drawn from
  the measured loads. As the engine's two queues: a load a request waits for starts ahead of
  every queued prefetch (a warm start, a placement, a revision warmed before its shift), oldest
  first within each; a queued prefetch that a request then waits for joins the request loads.
  `fifo_loads` (a what-if: the engine before it split the queue) keeps one FIFO queue.
- A step's time comes from the fitted cost model; the first token of a request is out at
  the end of its prefill step, then one token per step.
- An idle engine (nothing running) notices a finished load at its next idle poll (the async
  engine polls every 50 ms when nothing runs).
- Retiring an adapter (a revision leaves the manifest, rollout.py) frees its host entry and its
  slot once no request on the replica still uses it: requests in flight finish on their weights.
"""
from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from bench.fleet_sim.cost import StepCost


@dataclass(frozen=True)
class ReplicaConfig:
    device_slots: int = 8  # --max-active-adapters
    host_slots: int = 64  # --max-cpu-adapters
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    loader_workers: int = 2
    block_size: int = 16
    num_kv_blocks: int = 32 * 32  # max_num_seqs * (512 tokens / 16): no preemption
    idle_poll_s: float = 0.05
    # The engine's slot-fairness rule (--adapter-fairness-seconds, default 0): once the oldest
    # waiting request whose adapter is loaded but finds every slot pinned has waited this long,
    # no younger adapter request may pin a slot. None: the engine before that rule.
    adapter_fairness_s: float | None = 0.0
    # False: as the engine (manager.py's load_queue, then prefetch_queue): a load a request waits
    # for goes ahead of queued prefetches. True: one FIFO queue for both, the engine before that
    # (a what-if: the rollout scenario's wave of prefetches showed why it changed).
    fifo_loads: bool = False


class SimRequest:
    __slots__ = ("idx", "adapter", "prompt_len", "output_len", "arrival", "replica", "computed", "generated",
                 "first_token", "finish")

    def __init__(self, idx: int, adapter: str, prompt_len: int, output_len: int, arrival: float):
        self.idx, self.adapter, self.prompt_len, self.output_len, self.arrival = idx, adapter, prompt_len, output_len, arrival
        self.replica = -1
        self.computed = 0  # tokens whose KV is computed
        self.generated = 0
        self.first_token: float | None = None
        self.finish: float | None = None

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + self.generated


class Replica:
    def __init__(self, index: int, cfg: ReplicaConfig, cost: StepCost, rng: np.random.Generator, sim):
        self.index, self.cfg, self.cost, self.rng, self.sim = index, cfg, cost, rng, sim
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.slot_of: dict[str, int] = {}
        self.slot_owner: list[str | None] = [None] * cfg.device_slots
        self.slot_pins = [0] * cfg.device_slots
        self.slot_lru: OrderedDict[int, None] = OrderedDict((i, None) for i in range(cfg.device_slots))
        self.host: OrderedDict[str, None] = OrderedDict()
        self.loading: set[str] = set()
        self.load_queue: deque[str] = deque()
        self.prefetch_queue: deque[str] = deque()  # after load_queue; unused with fifo_loads
        self.busy_loaders = 0
        self.wanted: set[str] = set()
        self.retiring: set[str] = set()  # unregistered; freed when its last request here finishes
        self.busy = False  # a step is in flight
        self.wake_pending = False
        self.placements_this_step = 0
        self.disk_loads = 0
        self.device_loads = 0
        self.steps = 0

    # ---- what a router can see -------------------------------------------------------------

    def kv_usage(self) -> float:
        bs = self.cfg.block_size
        return sum(math.ceil(max(1, s.computed) / bs) for s in self.running) / self.cfg.num_kv_blocks

    def running_adapters(self) -> frozenset:
        return frozenset(s.adapter for s in self.running)

    def waiting_adapters(self) -> frozenset:
        return frozenset(s.adapter for s in self.waiting)

    def resident_adapters(self) -> frozenset:
        return frozenset(self.slot_of)

    # ---- requests and loads ---------------------------------------------------------------

    def add(self, req: SimRequest, now: float) -> None:
        req.replica = self.index
        self.wanted.add(req.adapter)  # request_load marks it wanted and starts a load if needed
        self._start_load(req.adapter, now, "request")
        self.waiting.append(req)
        self._kick(now)

    def prefetch(self, adapter: str, now: float) -> None:
        """Load an adapter into host RAM ahead of any request (a warm placement): the same loader
        queue, but nothing waits for it, so the host LRU may drop it again."""
        self._start_load(adapter, now, "prefetch")

    def warm(self, adapter: str) -> bool:
        return adapter in self.host or adapter in self.slot_of

    def _start_load(self, adapter: str, now: float, cause: str) -> None:
        if adapter in self.host:
            return
        if adapter in self.loading:
            if cause == "request" and adapter in self.prefetch_queue:  # now a request waits for it
                self.prefetch_queue.remove(adapter)
                self.load_queue.append(adapter)
            return
        self.loading.add(adapter)
        self.sim.load_started(self, adapter, cause, now)
        if self.busy_loaders < self.cfg.loader_workers:
            self._run_load(adapter, now)
        elif cause == "prefetch" and not self.cfg.fifo_loads:
            self.prefetch_queue.append(adapter)
        else:
            self.load_queue.append(adapter)

    def _run_load(self, adapter: str, now: float) -> None:
        self.busy_loaders += 1
        self.sim.at(now + self.cost.draw_disk_load(self.rng), self._load_done, adapter)

    def _load_done(self, now: float, adapter: str) -> None:
        self.busy_loaders -= 1
        self.loading.discard(adapter)
        self.disk_loads += 1
        self.sim.count_load("disk", now)
        if adapter not in self.retiring or self._in_use(adapter):  # unregistered and unused: dropped
            self.host[adapter] = None
            self.host.move_to_end(adapter)
            self._evict_host()
        self.sim.on_loaded(self, adapter, now)
        if self.load_queue or self.prefetch_queue:
            self._run_load((self.load_queue or self.prefetch_queue).popleft(), now)
        if not self.busy and not self.wake_pending:  # the idle loop sees it at its next poll
            self.wake_pending = True
            self.sim.at(now + self.rng.uniform(0, self.cfg.idle_poll_s), self._wake, None)

    def _wake(self, now: float, _) -> None:
        self.wake_pending = False
        self._kick(now)

    def _evict_host(self) -> None:
        excess = len(self.host) - self.cfg.host_slots
        for name in list(self.host):
            if excess <= 0:
                break
            if name not in self.slot_of and name not in self.wanted:
                del self.host[name]
                excess -= 1

    # ---- device slots ---------------------------------------------------------------------

    def _acquire(self, req: SimRequest, now: float) -> bool:
        a = req.adapter
        slot = self.slot_of.get(a)
        if slot is None:
            self.wanted.add(a)
            if a not in self.host:
                self._start_load(a, now, "request")
                return False
            slot = self._free_or_evictable_slot()
            if slot is None:
                return False
            self.slot_of[a], self.slot_owner[slot] = slot, a
            self.wanted.discard(a)
            self.placements_this_step += 1
            self.device_loads += 1
            self.sim.count_load("device", now)
        self.slot_pins[slot] += 1
        self.slot_lru.move_to_end(slot)
        self.host.move_to_end(a)
        return True

    def _free_or_evictable_slot(self) -> int | None:
        for slot in self.slot_lru:
            if self.slot_owner[slot] is None:
                return slot
        for slot in self.slot_lru:
            if self.slot_pins[slot] == 0:
                del self.slot_of[self.slot_owner[slot]]
                self.slot_owner[slot] = None
                self._evict_host()
                return slot
        return None

    def _release(self, req: SimRequest) -> None:
        self.slot_pins[self.slot_of[req.adapter]] -= 1
        if req.adapter in self.retiring:
            self._free_if_unused(req.adapter)

    def retire(self, adapter: str) -> None:
        """The adapter left the manifest: no new request will name it. Its weights go once no
        running or waiting request here uses it (at once if none does)."""
        self.retiring.add(adapter)
        self._free_if_unused(adapter)

    def replace(self, old: str, new: str, now: float) -> list[SimRequest]:
        """New weights under the same name, in place (loraplex before adapter revisions): queued
        requests for `old` will run on `new` (loaded for them now), running ones finish on `old`,
        which then goes. Returns the queued requests that changed weights."""
        moved = [seq for seq in self.waiting if seq.adapter == old]
        for seq in moved:
            seq.adapter = new
        if moved:
            self.wanted.add(new)
            self._start_load(new, now, "request")
        self.retire(old)
        return moved

    def _in_use(self, adapter: str) -> bool:
        return any(s.adapter == adapter for s in self.running) or any(s.adapter == adapter for s in self.waiting)

    def _free_if_unused(self, adapter: str) -> None:
        if self._in_use(adapter):
            return
        self.wanted.discard(adapter)
        self.host.pop(adapter, None)
        slot = self.slot_of.pop(adapter, None)
        if slot is not None:
            self.slot_owner[slot] = None

    # ---- the step -------------------------------------------------------------------------

    def _schedule(self, now: float) -> list[tuple[SimRequest, int]]:
        budget = self.cfg.max_num_batched_tokens
        batch = []
        for seq in self.running:
            if budget <= 0:
                break
            n = min(seq.num_tokens - seq.computed, budget)
            batch.append((seq, n))
            budget -= n
        skipped = []
        starved = False  # an older request waits for a slot: younger ones may not pin one
        fairness = self.cfg.adapter_fairness_s
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_tokens - seq.computed, budget)
            if starved or not self._acquire(seq, now):
                if (not starved and fairness is not None and now - seq.arrival >= fairness
                        and seq.adapter in self.host and seq.adapter not in self.slot_of):
                    starved = True
                skipped.append(self.waiting.popleft())
                continue
            self.waiting.popleft()
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        return batch

    def _kick(self, now: float) -> None:
        if self.busy:
            return
        self.placements_this_step = 0
        batch = self._schedule(now)
        if not batch:
            return
        if self.sim.strict:
            self.check(batch)
        prefill = sum(n for s, n in batch if not (s.computed > 0 and n == 1))
        distinct = len({s.adapter for s, _ in batch})
        seconds = self.cost.step_seconds(len(batch), prefill, distinct) + self.placements_this_step * self.cost.h2d_s
        self.busy = True
        self.sim.at(now + seconds, self._step_done, batch)

    def check(self, batch) -> None:
        """Invariants of the slot cache and the batch (the simulator's --strict mode, and tests)."""
        if len(self.slot_of) > self.cfg.device_slots:
            raise AssertionError(f"replica {self.index}: {len(self.slot_of)} adapters in {self.cfg.device_slots} slots")
        for a, slot in self.slot_of.items():
            if self.slot_owner[slot] != a:
                raise AssertionError(f"replica {self.index}: slot {slot} owner {self.slot_owner[slot]!r} != {a!r}")
        if sum(self.slot_pins) != len(self.running) or min(self.slot_pins) < 0:
            raise AssertionError(f"replica {self.index}: pins {self.slot_pins} vs {len(self.running)} running")
        if any(s.adapter not in self.slot_of for s, _ in batch):
            raise AssertionError(f"replica {self.index}: a batch row's adapter has no device slot")
        if len(batch) > self.cfg.max_num_seqs or sum(n for _, n in batch) > self.cfg.max_num_batched_tokens:
            raise AssertionError(f"replica {self.index}: batch over the sequence cap or the token budget")

    def _step_done(self, now: float, batch) -> None:
        self.busy = False
        self.steps += 1
        for seq, n in batch:
            seq.computed += n
            if seq.computed == seq.num_tokens:  # the step completed its known tokens: one is sampled
                seq.generated += 1
                if seq.first_token is None:
                    seq.first_token = now
                if seq.generated >= seq.output_len:
                    seq.finish = now
                    self.running.remove(seq)
                    self._release(seq)
                    self.sim.finished(seq, now)
        self._kick(now)
