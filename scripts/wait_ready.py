"""Prints where `make serve` answers, and one command to try, once the engine reports ready.

    python -m scripts.wait_ready http://127.0.0.1:8080 [--timeout 900]

`make serve` starts it in the background next to the engine: it polls GET /ready and then prints
the URL and a curl line, so the last thing a newcomer reads is what to do next. If the engine never
becomes ready, it says so and where to look.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.request

TRY = ("curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' "
       "-d '{{\"model\": \"pirate\", \"max_tokens\": 40, "
       "\"messages\": [{{\"role\": \"user\", \"content\": \"What is the capital of Italy?\"}}]}}'")


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ready", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.wait_ready")
    p.add_argument("url")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--interval", type=float, default=1.0)
    args = p.parse_args(argv)
    url = args.url.rstrip("/")
    deadline = time.monotonic() + args.timeout
    parent = os.getppid()
    # The shell that started it (and the engine) gone, e.g. after Ctrl-C: nothing left to announce.
    while time.monotonic() < deadline and os.getppid() == parent:
        if ready(url):
            print(f"\n== ready: loraplex serves the base model and the demo adapters on {url}\n"
                  f"   try:  {TRY.format(url=url)}\n"
                  f"   more: README.md (the OpenAI SDK, streaming, LoRAX clients); Ctrl-C stops the engine\n",
                  flush=True)
            return 0
        time.sleep(args.interval)
    if os.getppid() != parent:
        return 0
    print(f"\n== the engine did not report ready on {url}/ready within {args.timeout:.0f}s: "
          "its log above says why (a port in use: `make serve PORT=8081`)\n", file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
