"""`trl-trm` command line (also `python -m trl_trm.cli`, e.g. under `accelerate launch`).

    trl-trm train --config recipes/X.yaml [--any_field value ...]   TRMTrainer from a YAML recipe
    trl-trm demo [--output_dir DIR] [--any_field value ...]        offline demo (packaged recipes/demo.yaml)
    trl-trm plot OUTPUT_DIR [--output PNG]                          redraw a run's plot from its logs
    trl-trm bounds --length 4096 --kl-tok-max 1e-4 [--kl-seq 0.01]  error-bound table

Arguments and recipes are parsed by TRL's `TrlParser` from dataclasses (no hand-written YAML or flag parsing).
Bad input (unknown recipe keys, bad values, missing reward functions or columns, an unreachable Hub) gives one
`trl-trm <command>: error: ...` line and exit code 2.
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


@dataclass
class PlotArguments:
    run_dir: str = field(
        metadata={
            "help": "A training output_dir (or checkpoint) holding trm_stats.jsonl or "
            "trainer_state.json. Also accepted as the first positional argument."
        }
    )
    output: str | None = field(default=None, metadata={"help": "PNG path (default: RUN_DIR/trm_stats.png)."})


def _split_config_flag(rest: list[str]) -> list[str]:
    """TrlParser reads `--config PATH` only; `--config=PATH` would be ignored silently."""
    out = []
    for arg in rest:
        out += ["--config", arg.split("=", 1)[1]] if arg.startswith("--config=") else [arg]
    return out


def _train(rest: list[str]) -> None:
    from .train import parse_recipe, run_train

    rest = _split_config_flag(rest)
    if "--config" not in rest and "-h" not in rest:
        if "--help" not in rest:
            raise ValueError("no recipe: run `trl-trm train --config recipes/<name>.yaml` (see recipes/README.md).")
    script_args, config, model_args = parse_recipe(rest)
    trainer = run_train(script_args, config, model_args)
    trainer.accelerator.print(f"trl-trm train: done; model, card and trm_stats in {config.output_dir}")
    trainer.end()  # finish trackers, flush and destroy the process group: multi-process runs exit cleanly


def _demo(rest: list[str]) -> None:
    from .demo import demo_recipe_path, run_demo
    from .train import parse_recipe

    # The packaged recipe first, so command-line flags override it (TrlParser: CLI > config file).
    argv = ["--config", demo_recipe_path(), *_split_config_flag(rest)]
    script_args, config, model_args = parse_recipe(argv, prog="trl-trm demo")
    run_demo(script_args, config, model_args)


def _plot(rest: list[str]) -> None:
    from trl import TrlParser

    from .plotting import plot_run

    if rest and not rest[0].startswith("-"):  # `trl-trm plot OUTPUT_DIR` (positional form)
        rest = ["--run_dir", rest[0], *rest[1:]]
    (args,) = TrlParser(dataclass_types=[PlotArguments], prog="trl-trm plot").parse_args_and_config(args=rest)
    print(f"plot written to {plot_run(args.run_dir, args.output)}")


def _bounds(rest: list[str]) -> None:
    from trl import TrlParser

    from .bounds import format_bounds_table

    (args,) = TrlParser(dataclass_types=[BoundsArguments], prog="trl-trm bounds").parse_args_and_config(args=rest)
    print(format_bounds_table(args.length, args.kl_tok_max, args.kl_seq, budget=args.budget))


COMMANDS = {"train": _train, "demo": _demo, "plot": _plot, "bounds": _bounds}


def main(argv: list[str] | None = None) -> int:
    from .hub import HubPublishError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: trl-trm {{{','.join(COMMANDS)}}} [--help] [options]", file=sys.stderr)
        return 2
    try:
        COMMANDS[argv[0]](argv[1:])
    except (ValueError, HubPublishError, OSError, ImportError) as err:
        # Bad values, recipes, data, rewards, a model that cannot be found, an unreachable Hub: one clear line.
        print(f"trl-trm {argv[0]}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
