"""Block manager and scheduler: no leaks, chunked prefill within budget, no starvation."""
import pytest

from loraplex.engine.core.block_manager import BlockManager
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.core.scheduler import Scheduler, SchedulerConfig
from loraplex.engine.core.sequence import Sequence
from tests.engine.core.conftest import PROMPTS, make_engine


def seq(rid: str, n_prompt: int, max_tokens: int = 4) -> Sequence:
    return Sequence(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens), 4096, eos_token_ids=(0,))


def test_block_manager_allocates_frees_and_counts():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = seq("a", 5), seq("b", 9)
    bm.grow(a, 5)
    assert len(a.block_table) == 2 and bm.num_free == 6
    bm.grow(a, 8)  # still fits in two blocks
    assert len(a.block_table) == 2
    bm.grow(b, 9)
    assert bm.num_free == 3 and not set(a.block_table) & set(b.block_table)
    assert not bm.can_hold(a, 4 * 6)
    with pytest.raises(RuntimeError):
        bm.grow(a, 4 * 6)
    bm.free(a)
    bm.free(b)
    assert bm.num_free == 8 and a.block_table == [] and b.block_table == []


def test_chunked_prefill_respects_the_token_budget():
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=10), BlockManager(64, 4))
    long, short = seq("long", 23), seq("short", 3)
    sched.add(long)
    sched.add(short)
    chunks = []
    for _ in range(5):
        batch = sched.schedule()
        assert sum(item.num_tokens for item in batch) <= 10
        chunks.append([(item.seq.request_id, item.num_tokens) for item in batch])
        sampled = [item.seq for item in batch if item.samples]
        sched.finish_step(batch)
        for s in sampled:
            s.output_ids.append(7)  # stand-in for a sampled token
    # the long prompt goes through in chunks; the short one joins as soon as budget allows
    assert chunks[0] == [("long", 10)]
    assert chunks[1] == [("long", 10)]
    assert chunks[2] == [("long", 3), ("short", 3)]
    assert chunks[3] == [("long", 1), ("short", 1)]  # both now decode
    assert long.num_computed_tokens == 25  # 23 prompt tokens + two decode steps


def test_no_starvation_of_a_long_request_under_a_stream_of_short_ones(tiny_models):
    engine = make_engine(tiny_models["llama"], num_kv_blocks=24, block_size=4, max_num_batched_tokens=12,
                         max_num_seqs=4, max_model_len=96)
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    engine.add_request("long", PROMPTS[2] * 2, greedy)
    finished, steps, n_short = set(), 0, 0
    while "long" not in finished:
        if n_short < 60:
            engine.add_request(f"short{n_short}", PROMPTS[n_short % 2], greedy)
            n_short += 1
        finished |= {o.request_id for o in engine.step() if o.finished}
        steps += 1
        assert steps < 400, "the long request starved"
    while engine.has_unfinished():
        engine.step()
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


def test_no_block_leak_after_finish_and_abort(tiny_models):
    engine = make_engine(tiny_models["mistral"], num_kv_blocks=64, block_size=4, max_model_len=128)
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=30, temperature=0.8, seed=i, ignore_eos=True))
    for _ in range(5):
        engine.step()
    assert engine.block_manager.num_free < engine.block_manager.num_blocks
    aborted = engine.abort("r1")
    assert aborted.finished and aborted.finish_reason == "abort"
    engine.abort("r3")
    assert engine.abort("unknown") is None
    while engine.has_unfinished():
        engine.step()
    assert engine.block_manager.num_free == engine.block_manager.num_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_waiting_queue_is_bounded(tiny_models):
    from loraplex.engine.core.errors import QueueFullError

    engine = make_engine(tiny_models["llama"], max_waiting=2)
    engine.add_request("a", "x", SamplingParams())
    engine.add_request("b", "y", SamplingParams())
    with pytest.raises(QueueFullError):
        engine.add_request("c", "z", SamplingParams())


def run_to_completion(sched: Scheduler, seqs: list[Sequence], max_steps: int = 200) -> list[dict]:
    """Drive the scheduler as the engine does (a sampled token is 7); one record per step:
    which sequences ran, and which were preempted during that step's scheduling."""
    for s in seqs:
        sched.add(s)
    steps = []
    while sched.waiting or sched.running:
        before = {s.request_id: s.num_preemptions for s in seqs}
        batch = sched.schedule()
        preempted = {s.request_id for s in seqs if s.num_preemptions > before[s.request_id]}
        steps.append({"ran": [item.seq.request_id for item in batch], "preempted": preempted})
        sampled = [item.seq for item in batch if item.samples]
        for s in sampled:
            s.output_ids.append(7)
            if len(s.output_ids) >= s.params.max_tokens:
                s.finish("length")
        sched.finish_step(batch)
        assert len(steps) < max_steps, "the scheduler made no progress"
    return steps


def test_a_preempted_sequence_waits_until_it_can_get_back_where_it_was():
    # Four blocks of 4 tokens, 5 tokens a step. "a" (older) decodes and grows; "b" is preempted
    # to make room. b's first chunk would fit in what is left, its second would not: readmitting
    # it at once (or for a first chunk only) preempts it again every step, a lap per step.
    blocks = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=5), blocks)
    a, b = seq("a", 7, max_tokens=6), seq("b", 4, max_tokens=6)
    steps = run_to_completion(sched, [a, b])
    for i, step in enumerate(steps):
        assert not step["preempted"] & set(step["ran"]), f"step {i} readmitted what it preempted: {step}"
    assert b.num_preemptions == 1 and a.num_preemptions == 0, [s for s in steps if s["preempted"]]
    assert sched.num_preemptions == 1
    assert len(a.output_ids) == 6 and len(b.output_ids) == 6
    assert blocks.num_free == blocks.num_blocks
