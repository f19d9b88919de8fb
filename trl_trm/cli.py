"""`trl-trm` command line (also `python -m trl_trm.cli`, e.g. under `accelerate launch`).

    trl-trm train [--config recipes/X.yaml] [--any_field value ...] TRMTrainer from a YAML recipe and/or flags
    trl-trm demo [--output_dir DIR] [--any_field value ...]        offline demo (packaged recipes/demo.yaml)
    trl-trm plot OUTPUT_DIR [--output PNG]                          redraw a run's plot from its logs
    trl-trm bounds --length 4096 --kl-tok-max 1e-4 [--kl-seq 0.01]  error-bound table
    trl-trm calibrate --config recipes/X.yaml [--batches 4] [--target_accept 0.9,0.95,0.99] [--json F] [--write F]
                                                                   the recipe's mismatch and thresholds (no training)

Arguments and recipes are parsed by TRL's `TrlParser` from dataclasses (no hand-written YAML or flag parsing).
Bad input (a YAML error or duplicate key, unknown recipe keys, bad values, missing reward functions, trackers or
columns, a malformed dataset file, an unreachable Hub) gives one `trl-trm <command>: error: ...` line and exit code 2;
a run that started but cannot give a result (0 training steps, a launched run that failed, a collective that
timed out because another process stopped: `ddp_timeout`) exits with code 1. Resuming a run that already reached
`max_steps` says so and exits 0. `trl-trm train` holds a lock on its `output_dir` while it runs (`trl_trm.runlock`).
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


_RUN: dict = {"ddp_timeout": None}  # the running command's ddp_timeout, named when a collective times out
TRAIN_USAGE = (
    "usage: trl-trm train [--config RECIPE.yaml] [--field value ...]   (`trl-trm train --help` lists every field)"
)


def _train(rest: list[str]) -> int:
    import os

    from . import train  # `train.run_train` is looked up at call time (tests replace it)
    from .launch import LAUNCHED_ENV, launch_with_accelerate, strip_launch_tokens
    from .recipe import parse_command
    from .runlock import take_run_lock

    if not rest:  # nothing to train: the usage, not an error about the hardware the defaults assume
        print(TRAIN_USAGE, file=sys.stderr)
        raise ValueError("give a recipe (`--config recipe.yaml`) and/or flags (`--model_name_or_path ...`).")
    (script_args, config, model_args), launch, launch_cli = parse_command(rest)
    launched = os.environ.get(LAUNCHED_ENV) == "1"
    _RUN["ddp_timeout"] = config.ddp_timeout
    # One run per output_dir, checked before relaunching or training; the processes a relaunch starts share the
    # launching process's lock.
    lock = None if launched else take_run_lock(config)
    try:
        if launch and not launched:  # `trl grpo`'s way: rerun under `accelerate launch`
            return launch_with_accelerate(launch, strip_launch_tokens(rest, launch_cli), config)
        trainer = train.run_train(script_args, config, model_args)
        trainer.accelerator.print(f"trl-trm train: done; model, card and trm_stats in {config.output_dir}")
        trainer.end()  # finish trackers, flush and destroy the process group: multi-process runs exit cleanly
    finally:
        if lock is not None:
            lock.release()
    return 0


def _demo(rest: list[str]) -> int:
    from .demo import demo_recipe_path, run_demo
    from .recipe import _split_config_flag, parse_recipe

    # The packaged recipe first, so command-line flags override it (TrlParser: CLI > config file). The demo is a
    # throwaway run: it starts over in its output_dir unless told otherwise (`--overwrite_output_dir false`).
    argv = ["--config", demo_recipe_path(), "--overwrite_output_dir", "true", *_split_config_flag(rest)]
    script_args, config, model_args = parse_recipe(argv, prog="trl-trm demo")
    run_demo(script_args, config, model_args)
    return 0


def _plot(rest: list[str]) -> int:
    from trl import TrlParser

    from .plotting import plot_run

    if rest and not rest[0].startswith("-"):  # `trl-trm plot OUTPUT_DIR` (positional form)
        rest = ["--run_dir", rest[0], *rest[1:]]
    (args,) = TrlParser(dataclass_types=[PlotArguments], prog="trl-trm plot").parse_args_and_config(args=rest)
    print(f"plot written to {plot_run(args.run_dir, args.output)}")
    return 0


def _bounds(rest: list[str]) -> int:
    from trl import TrlParser

    from .bounds import format_bounds_table

    (args,) = TrlParser(dataclass_types=[BoundsArguments], prog="trl-trm bounds").parse_args_and_config(args=rest)
    print(format_bounds_table(args.length, args.kl_tok_max, args.kl_seq, budget=args.budget))
    return 0


def _calibrate(rest: list[str]) -> int:
    from .calibrate_cli import run_calibrate

    return run_calibrate(rest)


COMMANDS = {"train": _train, "demo": _demo, "plot": _plot, "bounds": _bounds, "calibrate": _calibrate}
HELP = {
    "train": "train TRMTrainer from a YAML recipe and/or flags, like `trl grpo` (`trl-trm train --help`)",
    "demo": "offline demo: a tiny local model learns string reversal with TRM on CPU",
    "plot": "redraw a run's trm_stats.png from its trm_stats.jsonl / trainer_state.json",
    "bounds": "print the TRM error-bound table for a sequence length and KL",
    "calibrate": "measure a recipe's rollout/training mismatch and the thresholds for a target accept rate",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trl-trm")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed: `pip install -e .`)"


def _help() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: trl-trm {{{','.join(COMMANDS)}}} [--help] [options]  |  trl-trm --version", ""]
    lines += [f"  {name:<{width}}  {HELP[name]}" for name in COMMANDS]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .checkpoints import RunAlreadyComplete
    from .hub import HubPublishError
    from .train import TrainingError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_help())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"trl-trm {_version()}")
        return 0
    if argv[0] not in COMMANDS:
        print(_help(), file=sys.stderr)
        print(f"trl-trm: error: unknown command {argv[0]!r}: use one of {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:]) or 0
    except RunAlreadyComplete as done:  # resuming a run that already reached max_steps: nothing to do
        print(f"trl-trm {argv[0]}: {done}")
        return 0
    except TrainingError as err:  # the run started but gave no result
        print(f"trl-trm {argv[0]}: error: {err}", file=sys.stderr)
        return 1
    except (ValueError, HubPublishError, OSError, ImportError) as err:
        # Bad values, recipes, data, rewards, a model that cannot be found, an unreachable Hub: one clear line.
        print(f"trl-trm {argv[0]}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        timeout = collective_timeout(err)
        if timeout is None:
            raise
        print(f"trl-trm {argv[0]}: error: {timeout}", file=sys.stderr)
        return 1


def collective_timeout(err: BaseException) -> str | None:
    """The one line for a collective that timed out (a stalled or stopped rank), else None."""
    import torch.distributed as dist

    text = str(err)
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    lowered = text.lower()  # gloo says "timed out" in a collective, "Application timeout caused pair closure" in DDP's
    if "timed out" not in lowered and "timeout" not in lowered and type(err).__name__ != "DistBackendError":
        return None  # backward allreduce (seen in CI: the stopped-rank test then printed a traceback, not the line)
    timeout = _RUN["ddp_timeout"]
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return (
        f"a collective between the processes timed out ({first[:200]}): another process stopped, hung or died. "
        f"The limit is `ddp_timeout`{f' ({timeout} s)' if timeout else ''} (600 s by default for `trl-trm train`); "
        "raise it with `--ddp_timeout SECONDS` if a step legitimately takes longer."
    )


if __name__ == "__main__":
    raise SystemExit(main())
