"""`trl-trm calibrate`: measure a recipe's rollout/training mismatch before training, and the thresholds it needs.

    trl-trm calibrate --config RECIPE.yaml [--field value ...] [--batches 4] [--target_accept 0.9,0.95,0.99]
                      [--json OUT.json] [--write RECIPE_OUT.yaml]
    trl-trm calibrate --from_json OUT.json --config RECIPE.yaml --write RECIPE_OUT.yaml   (no rollouts)

It builds the recipe's trainer exactly as `trl-trm train` does (same checks, same rollout path), in a scratch
`output_dir` (the recipe's is not touched), runs `--batches` generation batches and the training engine's forward on
them without any optimiser step (:func:`trl_trm.calibrate.calibrate_trainer`), and prints the report
(docs/calibrate.md). Several processes: start it under your launcher (`accelerate launch -m trl_trm.cli calibrate
...`, `torchrun ... -m trl_trm.cli calibrate ...`); statistics are gathered over every process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Any

FLAGS = ("batches", "target_accept", "json", "write", "from_json")


def split_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The calibrate-only flags (`--batches`, `--target_accept`/`--target-accept`, `--json`, `--write`,
    `--from_json`) and the rest, which is a `trl-trm train` command line."""
    parser = argparse.ArgumentParser(prog="trl-trm calibrate", add_help=False, allow_abbrev=False)
    for name in FLAGS:
        names = sorted({f"--{name}", f"--{name.replace('_', '-')}"})
        parser.add_argument(*names, dest=name, type=int if name == "batches" else str, default=None)
    opts, rest = parser.parse_known_args(argv)
    opts.batches = 4 if opts.batches is None else opts.batches
    if opts.batches < 1:
        raise ValueError(f"`--batches` must be >= 1, got {opts.batches}.")
    opts.targets = parse_targets(opts.target_accept or "0.9,0.95,0.99")
    return opts, rest


def parse_targets(text: str) -> tuple[float, ...]:
    """`0.9,0.95` -> (0.9, 0.95); each in (0, 1]."""
    try:
        targets = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"`--target_accept` takes comma-separated numbers in (0, 1], got {text!r}.") from None
    if not targets or not all(0.0 < t <= 1.0 for t in targets):
        raise ValueError(f"`--target_accept` takes comma-separated numbers in (0, 1], got {text!r}.")
    return targets


def recipe_path(argv: list[str]) -> str | None:
    """The `--config` path of a command line, if any."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    return repr(value) if isinstance(value, float) else str(value)


def write_recipe(source: str, update: dict[str, Any], target: str, note: str) -> str:
    """Copy the recipe ``source`` to ``target`` with the keys of ``update`` set (a key's line is replaced where it
    stands, comments kept; a new key is appended under ``note``). Returns ``target``."""
    with open(source, encoding="utf-8") as f:
        text = f.read()
    added = []
    for key, value in update.items():
        line = f"{key}: {_yaml_value(value)}"
        pattern = re.compile(rf"^{re.escape(key)}\s*:.*$", re.MULTILINE)
        if pattern.search(text):
            text = pattern.sub(line.replace("\\", "\\\\"), text, count=1)
        else:
            added.append(line)
    if added:
        text = text.rstrip("\n") + f"\n\n# {note}\n" + "\n".join(added) + "\n"
    with open(target, "w", encoding="utf-8") as f:
        f.write(text)
    return target


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _quantile_row(name: str, quantiles: dict[str, Any]) -> str:
    return f"| {name} | " + " | ".join(_fmt(v) for v in quantiles.values()) + " |"


def format_report(report: dict[str, Any]) -> str:
    """The printed report (the same content as `--json`, docs/calibrate.md)."""
    m = report["mismatch"]
    lines = [
        f"Mismatch over {m['sequences']} sequences, {m['tokens']} tokens ({m['nonfinite_sequences']} non-finite):"
    ]
    lines.append(f"  per token: k1 {_fmt(m['k1'])}, k3 {_fmt(m['k3'])}, chi2 {_fmt(m['chi2'])}; ESS {_fmt(m['ess'])}")
    if "kl_tok" in m:
        bound = " (top-k: lower bound)" if m["kl_tok_lower_bound"] else " (exact)"
        lines.append(f"  top-k KL per token: mean {_fmt(m['kl_tok'])}, max {_fmt(m['kl_tok_max']['q100'])}{bound}")
    lines += ["", "| statistic | q50 | q90 | q95 | q99 | max |", "|---|---:|---:|---:|---:|---:|"]
    lines += [_quantile_row("D_max", m["d_max"]), _quantile_row("D_avg", m["d_avg"])]
    for q, row in enumerate(m["by_length_quartile"], start=1):
        span = f"lengths {row['lengths'][0]:g}-{row['lengths'][1]:g}, {row['sequences']} seqs"
        lines += [_quantile_row(f"D_max q{q} ({span})", row["d_max"]), _quantile_row(f"D_avg q{q}", row["d_avg"])]
    lines += ["", "Accept rate at the recipe's thresholds (token_mis: tokens kept):"]
    lines.append("  " + ", ".join(f"{k} {_fmt(v)}" for k, v in report["recipe_accept"].items()))
    lines += ["", "Thresholds per target accept rate (accept: the real mask on these batches):"]
    for target, row in report["targets"].items():
        for mode, entry in row.items():
            if "thresholds" in entry:
                values = ", ".join(
                    f"trm_{k}={'None' if v is None else f'{v:.6g}'}" for k, v in entry["thresholds"].items()
                )
                lines.append(f"  {target:<5} {mode:<9} {values}  (accept {_fmt(entry['accept'])})")
            else:
                lines.append(f"  {target:<5} {mode:<9} none: {entry['reason']}")
    lines.append(f"  Seq-TIS C* = {_fmt(report['seq_tis_clip'])} (trm_ratio_max='auto' computes it per batch)")
    rec = report["recommendation"]
    lines += ["", f"Recommendation: trm_mode={rec['mode']!r} at target {rec['target']:g}: {rec['reason']}"]
    if report["bounds"] is not None:
        b = report["bounds"]
        lines += ["", f"Error bounds at these thresholds (δ: {b['kl_tok_max_source']}; `{b['command']}`):", b["table"]]
    if report["recipe_update"] is not None:
        lines += ["", "Paste into the recipe:", "```yaml"]
        lines += [f"{k}: {_yaml_value(v)}" for k, v in report["recipe_update"].items()]
        lines.append("```")
    return "\n".join(lines)


def _scratch_dir(output_dir: str) -> str:
    """Where the calibration's trainer writes (the same path on every process of one launch)."""
    key = f"{os.path.abspath(output_dir)}|{os.environ.get('MASTER_PORT', '')}|{os.getppid()}"
    return os.path.join(tempfile.gettempdir(), f"trl-trm-calibrate-{hashlib.sha1(key.encode()).hexdigest()[:12]}")


def _run_rollouts(rest: list[str], opts) -> dict[str, Any]:
    from .calibrate import calibrate_trainer
    from .distributed import shutdown_distributed
    from .recipe import parse_recipe
    from .train import build_trainer

    script_args, config, model_args = parse_recipe(rest, prog="trl-trm calibrate")
    scratch = _scratch_dir(config.output_dir)
    config.output_dir, config.resume_from_checkpoint, config.push_to_hub = scratch, None, False
    config.report_to, config.trm_plot, config.save_strategy = [], False, "no"
    script_args.overwrite_output_dir = True  # a scratch folder left by an interrupted calibration is reused
    try:
        trainer = build_trainer(script_args, config, model_args)
        report = calibrate_trainer(trainer, opts.batches, opts.targets)
        trainer.accelerator.wait_for_everyone()
        main = trainer.accelerator.is_main_process
    finally:
        shutdown_distributed()
    if main:
        shutil.rmtree(scratch, ignore_errors=True)
    return report if main else {}


def run_calibrate(argv: list[str]) -> int:
    """The `trl-trm calibrate` command (see the module docstring); returns the exit code."""
    opts, rest = split_flags(argv)
    source = recipe_path(rest)
    if opts.write and source is None:
        raise ValueError("`--write` copies the recipe given with `--config`: give one.")
    if opts.from_json:
        if not opts.write:
            raise ValueError("`--from_json` writes a recipe from a saved report: give `--write RECIPE_OUT.yaml` too.")
        try:
            with open(opts.from_json, encoding="utf-8") as f:
                report = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(
                f"cannot read the report {opts.from_json!r} ({err}): give a `--json` file of calibrate."
            ) from None
    else:
        report = _run_rollouts(rest, opts)
        if not report:  # another process than the main one: the main one prints and writes
            return 0
        print(format_report(report))
        if opts.json:
            with open(opts.json, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)
            print(f"\nreport written to {opts.json}")
    if opts.write:
        update = report.get("recipe_update")
        if update is None:
            raise ValueError(f"no thresholds to write: {report['recommendation']['reason']}")
        target = report["recommendation"]["target"]
        note = f"trl-trm calibrate: {update['trm_mode']} thresholds for a target accept rate of {target:g}"
        print(f"recipe written to {write_recipe(source, update, opts.write, note)}")
    return 0
