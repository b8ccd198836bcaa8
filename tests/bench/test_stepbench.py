"""The decode-step comparison's method (bench/stepbench.py): configurations interleaved step by
step, ratios paired within a cycle, cohorts that share one engine without changing what it
computes. Timings are never checked; fake clocks stand in for them."""
import pytest

from bench import stepbench
from loraplex.engine.core.sampling_params import SamplingParams


def test_interleave_rotates_the_order_and_drops_the_warmup_cycle():
    calls = []

    def step(name):
        def run():
            calls.append(name)
            return len(calls), 0.0
        return run

    times = stepbench.interleave({n: step(n) for n in "abc"}, cycles=3, warmup=1)
    assert "".join(calls) == "abc" + "bca" + "cab" + "abc"  # nobody always follows the same one
    assert {n: [t for t, _ in ts] for n, ts in times.items()} == {"a": [6, 8, 10], "b": [4, 9, 11], "c": [5, 7, 12]}


def test_ratios_pair_steps_of_one_cycle_so_a_drifting_machine_cancels_out():
    # The machine slows down 3x halfway; the adapter step always costs 10% more than the base
    # step next to it. Paired ratios see exactly that; step medians alone would not.
    speed = [1.0] * 6 + [3.0] * 6
    times = {"base": [(0.100 * s, 0.050 * s) for s in speed], "one": [(0.110 * s, 0.060 * s) for s in speed]}
    out = stepbench.summarize(times, "base")
    assert out["one"]["ratio"] == pytest.approx(100 / 110) and out["one"]["ratio_iqr"] == pytest.approx([100 / 110] * 2)
    assert out["one"]["cpu_ratio"] == pytest.approx(50 / 60)
    assert out["base"]["ratio"] == 1.0 and out["one"]["steps"] == 12
    assert out["one"]["step_ms_iqr"][0] < out["one"]["step_ms"] < out["one"]["step_ms_iqr"][1]


def test_slot_groups_fit_the_slots_and_the_kv_room():
    cfgs = [("q", 1, ["a0"]), ("al", 1, ["b0"]), ("q", 8, [f"a{i}" for i in range(8)]),
            ("al", 8, [f"b{i}" for i in range(8)]), ("q", 32, [f"a{i}" for i in range(32)]),
            ("al", 32, [f"b{i}" for i in range(32)])]
    groups = stepbench.slot_groups(cfgs, slots=40)
    assert [[(s, d) for s, d, _ in g] for g in groups] == [[("q", 1), ("al", 1)], [("q", 8), ("al", 8)], [("q", 32)], [("al", 32)]]


def test_cohorts_take_turns_in_one_engine_and_decode_what_the_engine_decodes_alone(tiny_models, tmp_path):
    from tests.engine.core.conftest import make_engine
    from bench.tiny import make_tiny_adapter

    adapter = make_tiny_adapter(tiny_models["llama"], tmp_path / "ad", rank=4,
                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    engine = make_engine(tiny_models["llama"], adapter_dir=str(tmp_path))
    from loraplex.manifest import AdapterManifest

    engine.adapters.register(AdapterManifest(name="ad", uri=str(adapter)))
    batch, prompt_len, steps = 3, 5, 4
    base = stepbench.EngineCohort(engine, batch, [], prompt_len, steps, "base")
    lora = stepbench.EngineCohort(engine, batch, ["ad"], prompt_len, steps, "lora")
    assert not engine.scheduler.running  # both detached, prefilled
    for _ in range(2):
        before = [s.num_computed_tokens for s in base.seqs + lora.seqs]
        wall, cpu = base.step()
        assert wall > 0 and cpu >= 0
        after = [s.num_computed_tokens for s in base.seqs + lora.seqs]
        assert after == [b + 1 for b in before[:batch]] + before[batch:]  # only its own rows decoded
        lora.step()
    got = {"base": [s.output_ids[:3] for s in base.seqs], "lora": [s.output_ids[:3] for s in lora.seqs]}
    base.close()
    lora.close()
    assert not engine.has_unfinished() and not engine.scheduler.running
    assert engine.block_manager.num_free == engine.block_manager.num_blocks
    # the same requests, alone, in an ordinary generate(): the same greedy tokens
    prompts = [stepbench.cohort_prompt(i, prompt_len) for i in range(batch)]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    assert [r["token_ids"] for r in engine.generate(prompts, params)] == got["base"]
    assert [r["token_ids"] for r in engine.generate(prompts, params, ["ad"] * batch)] == got["lora"]
    assert got["base"] != got["lora"]  # the adapter did change the outputs


def test_the_report_renders_the_committed_snapshot_and_the_spread_of_new_rows():
    """bench/report.py renders bench/results/snapshot/results.json (rows with or without a
    spread) and the stepbench's rows with their interquartile ranges."""
    import json
    from pathlib import Path

    from bench import report

    snapshot = json.loads((Path(__file__).resolve().parents[2] / "bench/results/snapshot/results.json").read_text())
    md = report.markdown(snapshot)
    assert "## Multi-adapter decode step" in md and "| loraplex (all-linear) | 1 |" in md
    rows = [{"system": "loraplex", "distinct": 0, "step_ms": 180.0, "step_ms_iqr": [178.0, 183.0], "ratio": 1.0,
             "ratio_iqr": [1.0, 1.0], "cpu_ratio": 1.0, "cpu_ratio_iqr": [1.0, 1.0], "steps": 24, "bound": 1.0},
            {"system": "loraplex (all-linear)", "distinct": 1, "step_ms": 185.0, "step_ms_iqr": [182.5, 188.0],
             "ratio": 0.97, "ratio_iqr": [0.954, 0.984], "cpu_ratio": 0.968, "cpu_ratio_iqr": [0.96, 0.98], "steps": 24,
             "bound": 0.991}]
    lines = "\n".join(report.multi_step_lines({"batch": 32, "rows": rows}, "m"))
    assert "| loraplex (all-linear) | 1 | 185.0 [182.5–188.0] | 0.97 [0.95–0.98] | 0.97 [0.96–0.98] | 0.99 | 98% | 24 |" in lines
