"""`nightingale dev ...`: developer commands (its arguments are declared in nightingale/cli.py)."""

from __future__ import annotations

import argparse

from nightingale.cli import EXIT_FAILURE, CliError


def dev_main(args: argparse.Namespace) -> int:
    from .checkpoint import make_checkpoint

    try:
        out = make_checkpoint(args.dir, args.size, seed=args.seed, family=args.family)
    except OSError as err:
        raise CliError(f"cannot write {args.dir}: {err.strerror or err}", EXIT_FAILURE) from None
    print(out)
    return 0
