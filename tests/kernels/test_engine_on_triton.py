"""The whole model path on the Triton kernels (interpreted on the CPU): the mixed-adapter batch
of tests/engine/adapters must still match PEFT, and greedy tokens must still match transformers.

Runs pytest in a subprocess because the kernel choice (LORAPLEX_KERNELS) and the Triton
interpreter are process-wide."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_model_on_triton_kernels_matches_peft_and_transformers():
    env = {**os.environ, "LORAPLEX_KERNELS": "triton", "TRITON_INTERPRET": "1"}
    tests = ["tests/engine/adapters/test_lora_parity.py::test_mixed_adapter_batch_logits_match_peft[llama]",
             "tests/engine/core/test_parity.py::test_greedy_generation_matches_transformers_batched[qwen2]"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 passed" in proc.stdout
