"""`trl-trm` command line.

    trl-trm demo [--output_dir DIR] [--max_steps N] ...      offline demo (tiny local model, CPU)
    trl-trm bounds --length 4096 --kl-tok-max 1e-4 [--kl-seq 0.01] [--budget 1.0]

Arguments are parsed by TRL's `TrlParser` from dataclasses (no hand-written parsing).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field


@dataclass
class BoundsArguments:
    length: int = field(metadata={"help": "Sequence length T (generated tokens)."})
    kl_tok_max: float = field(metadata={"help": "D_KL^tok,max: the largest per-context KL(pi_roll || pi_theta)."})
    kl_seq: float | None = field(default=None, metadata={"help": "D_KL^seq over whole sequences (Mixed bound)."})
    budget: float = field(default=1.0, metadata={"help": "Error budget for 'largest non-vacuous T' (reward range)."})


def _demo(rest: list[str]) -> None:
    from trl import TrlParser

    from .demo import DemoArguments, run_demo

    (args,) = TrlParser(dataclass_types=[DemoArguments], prog="trl-trm demo").parse_args_and_config(args=rest)
    run_demo(args)


def _bounds(rest: list[str]) -> None:
    from trl import TrlParser

    from .bounds import format_bounds_table

    (args,) = TrlParser(dataclass_types=[BoundsArguments], prog="trl-trm bounds").parse_args_and_config(args=rest)
    print(format_bounds_table(args.length, args.kl_tok_max, args.kl_seq, budget=args.budget))


COMMANDS = {"demo": _demo, "bounds": _bounds}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: trl-trm {{{','.join(COMMANDS)}}} [--help] [options]", file=sys.stderr)
        return 2
    try:
        COMMANDS[argv[0]](argv[1:])
    except ValueError as err:  # bad values (negative KL, ...) get one clear line, not a traceback
        print(f"trl-trm {argv[0]}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
