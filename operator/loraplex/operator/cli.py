"""`loraplex-operator`: kopf with the operator's handlers module.

Every argument is passed through to `kopf run`: e.g. `loraplex-operator -A --standalone`,
`loraplex-operator --namespace team-a --verbose`, `loraplex-operator -A --liveness http://0.0.0.0:8080/healthz`.
Tunables come from LORAPLEX_* environment variables (see operator/loraplex/operator/config.py).
"""
from __future__ import annotations

import sys

HANDLERS = "loraplex.operator.handlers"


def kopf_argv(argv: list[str]) -> list[str]:
    args = list(argv)
    if args and args[0] == "run":  # tolerate `loraplex-operator run ...`
        args = args[1:]
    if any(a in ("-h", "--help") for a in args):
        return ["run", "--help"]
    return ["run", "-m", HANDLERS, *args]


def main(argv: list[str] | None = None) -> None:
    from kopf import cli

    from . import config

    args = kopf_argv(sys.argv[1:] if argv is None else argv)
    config.WATCHED_NAMESPACES = config.watch_namespaces(args)  # the adapter catalog lists bases there
    cli.main(args=args, prog_name="loraplex-operator")


if __name__ == "__main__":
    main()
