"""Fair share of the engine across tenants: one Virtual Token Counter (VTC) per tenant.

After Sheng et al., "Fairness in Serving Large Language Models" (OSDI 2024). Each tenant with
work has a counter, the service it has received divided by its weight. The scheduler admits
waiting work from the tenant with the smallest counter (`TenantOrder`); within a tenant, the
order stays the scheduler's own (preempted first, then oldest).

**Costs.** A step is charged to a tenant as it is scheduled, for what the step computes:
`PROMPT_COST` (w_p = 1) per prompt token computed for the first time, `OUTPUT_COST` (w_q = 2)
per token sampled, divided by the tenant's weight. So a request of P prompt tokens and O output
tokens costs w_p P + w_q O in all, whatever the chunking. The paper's weights: a decoded token
costs about twice a prompt token, because a prompt token is one row of a large, compute-bound
matmul while each decoded token takes a step of its own, whose time goes to reading the weights
and the KV cache. Not charged: prompt tokens found in the prefix cache (not computed), and
tokens recomputed after a preemption (the scheduler's choice, not the tenant's demand; each
token is charged once, so preemption adds nothing to a request's cost).

**Charging on compute** (not the whole prompt at admission): a tenant's counter grows only
while its sequences run, so its lead over another tenant is bounded by what its running
sequences can still take after its last admission, which is what the bound below rests on.

**Lift.** A tenant that joins the waiting queue (it had nothing waiting: a new request, or a
running sequence preempted) gets `counter = max(counter, F)`, F the floor: the smallest counter
among the tenants with waiting work, or, when none has any, the last such value. An idle
tenant therefore comes back level with the least-served waiting tenant, never below it: idle
time earns no credit. The lift applies also to a tenant that kept a sequence running: else a
tenant could keep one long request running to bank the credit it would get back as a burst.
State is kept only for tenants with a waiting or running sequence (a tenant's state is dropped
when its last one ends), so memory is bounded by the queue and the batch, whatever the number
of tenant names a client tries.

**Bound.** Let N = max_num_seqs, U = the largest cost of one request, w_p P + w_q M over the
requests (P prompt tokens, M its max_tokens or max_model_len - P; U <= w_q max_model_len as
w_q >= w_p), and S_f the service tenant f receives over an interval, divided by its weight w_f.
If tenants f and g both have waiting sequences throughout an interval, and the adapter gate
holds no waiting sequence back (every request on the base model or on an adapter that has a
slot), then

    |S_f - S_g| <= N U (1/w_f + 1/w_g).

Proof. Let M(t) be the smallest counter among tenants with waiting work (the floor when there
is none). M never decreases while any tenant has state: counters only grow, a joining tenant
is lifted to at least M, a leaving one can only raise the minimum, and when the last waiting
tenant leaves the floor takes its counter. (1) For f, g both waiting at t: c_f(t) <= c_g(t) +
N U / w_f. Take the last moment tau <= t at which c_f <= M (its state's creation, a lift that
raised it, or an admission of f: the scheduler admits from the smallest counter). After tau, f
is not admitted again (that would be a later such moment), so f is charged only by the at most
N sequences running after tau, at most U / w_f each: c_f(t) <= M(tau) + N U / w_f <= M(t) +
N U / w_f <= c_g(t) + N U / w_f. (2) While f waits it is not lifted, so S_f over [t1, t2] is
c_f(t2) - c_f(t1), and S_f - S_g = (c_f(t2) - c_g(t2)) + (c_g(t1) - c_f(t1)), each term
bounded by (1). The same holds for a tenant that returns from idle at t1: its lift puts it at
M(t1), so it gets no more than any waiting tenant beyond the same bound.
"""
from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from loraplex.engine.core.sequence import Sequence

PROMPT_COST = 1.0  # w_p: per prompt token computed
OUTPUT_COST = 2.0  # w_q: per token sampled


@dataclass
class TenantState:
    counter: float  # weighted service received, plus lifts
    weight: float
    running: int = 0
    queue: deque[Sequence] = field(default_factory=deque)  # its waiting sequences, in the scheduler's order

    @property
    def waiting(self) -> int:
        return len(self.queue)


class TenantShare:
    """Per-tenant counters and queues, kept in step with the scheduler's by its calls: each
    tenant's queue is the scheduler's waiting queue restricted to that tenant, in order."""

    def __init__(self, prompt_cost: float = PROMPT_COST, output_cost: float = OUTPUT_COST):
        self.prompt_cost = prompt_cost
        self.output_cost = output_cost
        self.tenants: dict[str, TenantState] = {}  # only tenants with a waiting or running sequence
        self.floor = 0.0  # F of the lift
        self.num_queued = 0  # tenants with a waiting sequence

    # ---- the scheduler's transitions ------------------------------------------------------

    def arrived(self, seq: Sequence) -> None:
        """A new request joins the back of the waiting queue. A tenant's weight is its latest
        request's."""
        state = self._state(seq)
        state.weight = seq.tenant_weight
        self._join(state)
        state.queue.append(seq)

    def preempted(self, seq: Sequence) -> None:
        """A running sequence goes back to the front of the waiting queue."""
        state = self._state(seq)
        state.running = max(0, state.running - 1)
        self._join(state)
        state.queue.appendleft(seq)

    def admitted(self, seq: Sequence) -> None:
        state = self._state(seq)
        state.running += 1
        self._leave(state, seq)

    def left(self, seq: Sequence, was_waiting: bool) -> None:
        """seq ended (finished, aborted, failed) from the waiting queue or the running batch."""
        state = self.tenants.get(seq.tenant)
        if state is None:
            return
        if was_waiting:
            self._leave(state, seq)
        else:
            state.running = max(0, state.running - 1)
        self._drop_if_idle(seq.tenant, state)

    def charge(self, seq: Sequence, num_tokens: int) -> None:
        """seq computes num_tokens this step, from seq.num_computed_tokens on."""
        state = self.tenants.get(seq.tenant)
        if state is None:  # not queued through the scheduler (cannot happen in the engine)
            return
        # Plain arithmetic, no properties: this runs for every row of every step.
        start = seq.num_computed_tokens
        end = start + num_tokens
        prompt = len(seq.prompt_ids)
        cost = self.output_cost if end == prompt + len(seq.output_ids) else 0.0  # the step samples
        charged = seq.prompt_tokens_charged
        if charged < prompt:  # prompt tokens in [max(start, charged), min(end, prompt)) are new
            top, low = min(end, prompt), max(start, charged)
            if top > low:
                cost += self.prompt_cost * (top - low)
                seq.prompt_tokens_charged = top
        state.counter += cost / state.weight

    # ---- reads ----------------------------------------------------------------------------

    def stats(self) -> dict[str, dict]:
        """Per tenant with work: waiting and running sequences, counter, weight. Safe to call
        from another thread (a scrape): the dict is copied in one C-level call, then only read."""
        return {name: {"waiting": s.waiting, "running": s.running, "virtual_service": s.counter, "weight": s.weight}
                for name, s in self.tenants.copy().items()}

    def check(self, waiting: deque[Sequence], running: list[Sequence]) -> None:
        """The tenants' queues and counts match the scheduler's (tests call this)."""
        by_tenant: dict[str, list[Sequence]] = {}
        for seq in waiting:
            by_tenant.setdefault(seq.tenant, []).append(seq)
        assert {t: list(s.queue) for t, s in self.tenants.items() if s.queue} == by_tenant
        assert {t: s.running for t, s in self.tenants.items() if s.running} == \
            {t: sum(1 for s in running if s.tenant == t) for t in {s.tenant for s in running}}
        assert all(s.queue or s.running for s in self.tenants.values()), "state kept for an idle tenant"
        assert self.num_queued == len(by_tenant)

    # ---- internals ------------------------------------------------------------------------

    def _state(self, seq: Sequence) -> TenantState:
        state = self.tenants.get(seq.tenant)
        if state is None:  # no history: it starts at the floor (as its lift would put it)
            state = self.tenants[seq.tenant] = TenantState(self.floor, seq.tenant_weight)
        return state

    def _join(self, state: TenantState) -> None:
        """Before a sequence joins state's queue: the lift, if the tenant had nothing waiting."""
        if not state.queue:
            if self.num_queued:
                self.floor = max(self.floor, min(s.counter for s in self.tenants.values() if s.queue))
            state.counter = max(state.counter, self.floor)
            self.num_queued += 1

    def _leave(self, state: TenantState, seq: Sequence) -> None:
        if state.queue and state.queue[0] is seq:
            state.queue.popleft()
        elif seq in state.queue:  # behind sequences passed over this step
            state.queue.remove(seq)
        else:  # never queued through the scheduler
            return
        if not state.queue:
            self.num_queued -= 1
            if self.num_queued == 0:  # the floor keeps the last waiting tenant's counter
                self.floor = max(self.floor, state.counter)

    def _drop_if_idle(self, name: str, state: TenantState) -> None:
        if not state.queue and state.running == 0:
            del self.tenants[name]
            if not self.tenants:  # nobody left to compare with: start from zero again
                self.floor = 0.0


class TenantOrder:
    """One step's admission order: the tenant with the smallest counter first (ties: the tenant
    whose next sequence arrived first), each tenant's sequences in queue order. `first`: a
    sequence whose tenant goes first until it has been visited (the scheduler's adapter-fairness
    rule, which outranks tenant order).

    The scheduler calls head() for the next candidate, then pass_over() (skipped: it keeps its
    place) or take() (admitted: it leaves the waiting queue; the scheduler then tells the
    TenantShare), and done() at the end. A heap over the waiting tenants, so a step costs
    O(tenants) to start and O(log tenants) a candidate, whatever the queue's length."""

    def __init__(self, share: TenantShare, waiting: deque[Sequence], first: Sequence | None = None):
        self.share = share
        self.waiting = waiting
        self.first = first
        self.passed: dict[str, int] = {}  # tenant -> sequences at its queue's front passed over
        self.heap = [self._key(name, state) for name, state in share.tenants.items() if state.queue]
        heapq.heapify(self.heap)

    def _key(self, name: str, state: TenantState, passed: int = 0) -> tuple:
        return (state.counter, state.queue[passed].arrival_time, name)

    def _next_of(self, name: str) -> Sequence | None:
        state = self.share.tenants.get(name)
        passed = self.passed.get(name, 0)
        return state.queue[passed] if state is not None and passed < len(state.queue) else None

    def head(self) -> Sequence | None:
        if self.first is not None:
            return self._next_of(self.first.tenant)
        while self.heap:
            counter, arrival, name = self.heap[0]
            seq = self._next_of(name)
            if seq is None:  # every one of its sequences was visited
                heapq.heappop(self.heap)
                continue
            state = self.share.tenants[name]
            if (counter, arrival) != (state.counter, seq.arrival_time):  # charged or moved on since pushed
                heapq.heapreplace(self.heap, (state.counter, seq.arrival_time, name))
                continue
            return seq
        return None

    def pass_over(self, seq: Sequence) -> None:
        self.passed[seq.tenant] = self.passed.get(seq.tenant, 0) + 1
        if seq is self.first:
            self.first = None

    def take(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        if seq is self.first:
            self.first = None

    def done(self) -> None:
        pass


class FifoOrder:
    """Today's order: the waiting queue front to back (fcfs, or a single waiting tenant)."""

    def __init__(self, waiting: deque[Sequence]):
        self.waiting = waiting
        self.skipped: list[Sequence] = []

    def head(self) -> Sequence | None:
        return self.waiting[0] if self.waiting else None

    def pass_over(self, seq: Sequence) -> None:
        self.skipped.append(self.waiting.popleft())

    def take(self, seq: Sequence) -> None:
        self.waiting.popleft()

    def done(self) -> None:
        self.waiting.extendleft(reversed(self.skipped))
