"""`trl-trm` command line: `trl-trm demo [--output_dir DIR] [--max_steps N] ...`.

Arguments are parsed by TRL's `TrlParser` from dataclasses (no hand-written parsing).
"""

from __future__ import annotations

import sys

COMMANDS = ("demo",)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: trl-trm {{{','.join(COMMANDS)}}} [--help] [options]", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    from trl import TrlParser

    if command == "demo":
        from .demo import DemoArguments, run_demo

        (args,) = TrlParser(dataclass_types=[DemoArguments], prog="trl-trm demo").parse_args_and_config(args=rest)
        run_demo(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
