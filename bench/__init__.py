"""loraplex benchmarks: an S-LoRA-style multi-adapter workload against transformers + PEFT.

Run `python -m bench.run --help`; see bench/README.md for what each number means.
"""
