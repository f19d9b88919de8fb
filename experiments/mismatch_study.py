"""Mismatch study: which correction keeps RL training healthy when the rollout engine differs from the trainer?

One command, offline, CPU::

    .venv/bin/python -m experiments.mismatch_study                     # harmful families, issue 17 (make study)
    .venv/bin/python -m experiments.mismatch_study --preset harmful-full  # every arm on every family (study-full)
    .venv/bin/python -m experiments.mismatch_study --preset realistic  # the realistic table (make study-realistic)
    .venv/bin/python -m experiments.mismatch_study --preset extreme    # the first, extreme table (make study-extreme)
    .venv/bin/python -m experiments.mismatch_study --smoke             # harmful path at toy size, 5 runs

A tiny Qwen2 (``trl_trm.tiny``, built locally) learns a verifiable task with a graded reward
(``experiments/study_task.py``) with ``TRMTrainer`` in fp32, while its rollouts come from
:class:`experiments.rollout_engine.MismatchRollout` (a TRL ``rollout_func``) with one kind of mismatch: bf16
precision, routing-flip emulation, stale weights, or support collapse in the contexts that decide the reward. Every
arm (``METHODS``; the controls in ``experiments/study_arms.py``) is trained on every kind with several seeds, paired
by seed; the results go to ``experiments/results/`` (JSON with every curve, CSV, markdown tables and, for the harmful
preset, the pre-registered rule's verdicts: ``experiments/study_report.py``) and the plots to
``docs/mismatch-study/``. See ``docs/mismatch-study.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from experiments.study_arms import CONTROLS, control_setting, random_mask_trainer, trl_sequence_mask_trainer
from experiments.study_report import write_report
from experiments.study_task import _eval_rows, class_fatal_reward, task_reward, task_rows, warm_start

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "experiments" / "results"
PLOTS_DIR = ROOT / "docs" / "mismatch-study"

# Mismatch kinds: MismatchRollout arguments (see the doc). The extreme preset's strengths were chosen so that the
# mismatch is visible; the realistic preset's follow what real engines show (bf16 precision, rare routing flips in a
# fixed set of contexts, one step of staleness).
KINDS: dict[str, dict[str, Any]] = {
    "precision": {"kind": "precision"},
    "impulse": {"kind": "impulse", "impulse_p": 0.3, "impulse_sigma": 8.0},
    "stale": {"kind": "stale", "stale_k": 2},
    "flip": {"kind": "flip", "flip_fraction": 3e-3, "impulse_sigma": 8.0},
    "stale1": {"kind": "stale", "stale_k": 1},
    # The harmful preset (issue 17): no mismatch (the positive control's reference); support collapse in the contexts
    # that decide the reward (every prompt fragile; `collapse_half`: half of them, the failed first attempt); and
    # staleness of 1-3 generation batches under num_iterations = 4 (stale4/8/12: 4, 8, 12 optimizer steps).
    "clean": {"kind": "none"},
    "collapse": {"kind": "collapse", "collapse_fraction": 1.0, "collapse_mass": 0.95},
    "collapse_half": {"kind": "collapse", "collapse_fraction": 0.5, "collapse_mass": 0.95},
    "stale4": {"kind": "stale", "stale_k": 4},
    "stale8": {"kind": "stale", "stale_k": 8},
    "stale12": {"kind": "stale", "stale_k": 12},
}

# Correction methods: TRMConfig overrides. Thresholds are the library defaults unless stated.
METHODS: dict[str, dict[str, Any]] = {
    "none": {"trm_mode": "none"},
    # TRL's default vLLM correction (vllm_importance_sampling_mode="sequence_mask", clip_max=3.0), emulated:
    # TRL 1.16 applies it only with use_vllm=True, never with a rollout_func alone (see TRLSequenceMaskTrainer).
    "trl_sequence_mask": {"trm_mode": "seq_mis", "trm_ratio_max": 3.0, "trm_ratio_min": None},
    "token_tis": {"trm_mode": "token_tis"},  # weight min(rho_t, 2)
    "token_mis": {"trm_mode": "token_mis", "trm_ratio_min": 0.5},  # keep tokens with rho_t in [0.5, 2]
    "seq_mis": {"trm_mode": "seq_mis"},  # keep sequences with prod rho <= 2
    "geo_mask": {"trm_mode": "geo_mask"},  # keep sequences with geometric-mean ratio in [0.99, 1.01]
    "trm": {"trm_mode": "trm"},  # D_max <= log 2 and D_avg <= 0.01
    "trm_exact": {"trm_mode": "trm_exact", "trm_rollout_topk": 8},  # max_t KL_t (top-8 + rest) <= 1e-4
    # PPO-clip against pi_roll (the seeds' baseline; docs/modes.md "bypass"): TRL's ratio is pi_theta / pi_roll.
    "bypass": {"trm_mode": "none", "trm_old_policy": "rollout"},
    "trm_cal": {"trm_mode": "trm", "trm_calibrate_accept": 0.9},  # both deltas scaled to accept 90 % of batch 1
    # The controls (experiments/study_arms.py): TRM's per-step accept rate without selection; TRM at equal count.
    "trm_random": {"trm_mode": "trm"},
    "trm_equal": {"trm_mode": "trm"},
}


@dataclasses.dataclass
class StudyConfig:
    steps: int = 60
    seeds: tuple[int, ...] = (0, 1, 2)
    batch: int = 64  # completions per step (per_device_train_batch_size)
    num_generations: int = 8
    max_completion_length: int = 12
    answer_len: tuple[int, int] = (2, 12)  # requested answer length in characters, min and max
    learning_rate: float = 3e-3
    warm_start_steps: int = 40
    hidden_size: int = 64
    eval_prompts: int = 64
    eval_samples: int = 2
    workers: int = 2
    kinds: tuple[str, ...] = ("precision", "impulse", "stale")
    methods: tuple[str, ...] = tuple(m for m in METHODS if m not in ("bypass", "trm_cal", *CONTROLS))
    num_iterations: int = 1  # TRL's num_iterations: optimizer steps per generated batch
    fatal: bool = False  # reward 0 for an answer with the collapse token (study_task.class_fatal_reward)
    reference_kind: str | None = None  # a kind run with `none` only: the positive control's reference
    control_only_kinds: tuple[str, ...] = ()  # kinds run with `none` only: their positive control, no ranking
    out_dir: Path = RESULTS_DIR
    plots_dir: Path | None = PLOTS_DIR / "extreme"
    tag: str = "study_extreme"


HARMFUL = StudyConfig(
    steps=40,
    seeds=tuple(range(10)),
    batch=32,
    max_completion_length=20,
    answer_len=(6, 14),
    learning_rate=2e-3,
    eval_prompts=96,
    kinds=("clean", "collapse", "stale8"),
    methods=("none", "bypass", "token_tis", "token_mis", "trm", "trm_cal", "trm_random", "trm_equal"),
    num_iterations=4,
    fatal=True,
    reference_kind="clean",
    control_only_kinds=("stale8",),
    plots_dir=PLOTS_DIR / "harmful",
    tag="study_harmful",
)

# The tables of docs/mismatch-study.md. "extreme": the first study (12-token completions, mismatch chosen to be
# visible: 30 % of positions perturbed, two-step staleness at lr 3e-3). "realistic": the mismatch real engines show
# (bf16 precision; routing flips in a fixed 0.3 % of the two-token contexts; one-step staleness at lr 1e-3), answers of
# 110-130 characters (~64-75 tokens), 5 seeds, sized to run in under 30 minutes on 2 cores.
PRESETS: dict[str, StudyConfig] = {
    "extreme": StudyConfig(kinds=("precision", "impulse", "stale")),
    "realistic": StudyConfig(
        steps=32,
        seeds=(0, 1, 2, 3, 4),
        batch=32,
        max_completion_length=80,
        answer_len=(110, 130),
        learning_rate=1e-3,
        warm_start_steps=40,
        kinds=("precision", "flip", "stale1"),
        plots_dir=PLOTS_DIR / "realistic",
        tag="study_realistic",
    ),
    # Issue 17: harmful families, trained as TRL trains (num_iterations = 4), 10 seeds, the controls. The core cells:
    # every arm on `collapse`; `none` only on `stale8` (its positive control failed in the pilot: shown, not ranked).
    "harmful": HARMFUL,
    # `make study-stale`: staleness at lr 6e-3 (its own clean reference), the third staleness attempt, every arm.
    "harmful-stale": dataclasses.replace(
        HARMFUL,
        learning_rate=6e-3,
        kinds=("clean", "stale4"),
        control_only_kinds=(),
        plots_dir=PLOTS_DIR / "harmful-stale",
        tag="study_harmful_stale",
    ),
    # `make study-full`: every arm on both collapse attempts and on stale8, and the other staleness positive controls.
    "harmful-full": dataclasses.replace(
        HARMFUL,
        kinds=("clean", "collapse", "collapse_half", "stale8", "stale4", "stale12"),
        control_only_kinds=("stale4", "stale12"),
        plots_dir=PLOTS_DIR / "harmful-full",
        tag="study_harmful_full",
    ),
}


_EVAL_INIT: dict[tuple, float] = {}  # per process: held-out reward of the warm-started weights
_WARM: dict[tuple, dict] = {}  # per process: _warm_key -> warm-started weights


def _warm_key(seed: int, cfg: StudyConfig) -> tuple:
    """What the warm-started weights depend on."""
    return (seed, cfg.warm_start_steps, cfg.hidden_size, tuple(cfg.answer_len))


def _warm_started(tokenizer, seed: int, cfg: StudyConfig):
    """`warm_start`, computed once per seed and setting in each worker process (every method of a seed starts from
    the same weights; the jobs are ordered by seed) and then copied."""
    from trl_trm.tiny import build_tiny_model

    key = _warm_key(seed, cfg)
    if key not in _WARM:
        _WARM.clear()
        model = warm_start(
            tokenizer, seed, cfg.warm_start_steps, hidden_size=cfg.hidden_size, answer_len=cfg.answer_len
        )
        _WARM[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model = build_tiny_model(tokenizer, seed=seed, hidden_size=cfg.hidden_size)
    model.load_state_dict(_WARM[key])
    return model.eval()


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _trainer_args(cfg: StudyConfig, method: str, seed: int, out: str, batch: int):
    """The `TRMConfig` of one run: the study's settings and the method's overrides."""
    from trl_trm import TRMConfig

    return TRMConfig(
        output_dir=out,
        use_cpu=True,
        bf16=False,  # the trainer runs fp32: the only mismatch is the rollout engine's
        seed=seed,
        max_steps=cfg.steps,
        per_device_train_batch_size=batch,
        num_generations=cfg.num_generations,
        num_iterations=cfg.num_iterations,
        max_completion_length=cfg.max_completion_length,
        temperature=1.0,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.steps // 10,  # Adam's first full-size steps otherwise undo part of the warm start
        beta=0.0,
        loss_type="dapo",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        gradient_checkpointing=False,
        disable_tqdm=True,
        **METHODS[method],
    )


def run_one(
    kind: str, method: str, seed: int, cfg: StudyConfig, threads: int = 1, control: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Train one (mismatch kind, method, seed) and return its curves and summary numbers. ``control``: what a
    control arm takes from the `trm` run of the same kind and seed (`study_arms.control_setting`)."""
    for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import PrinterCallback
    from transformers.utils import logging as hf_logging

    from experiments.rollout_engine import MismatchRollout
    from trl_trm import TRMTrainer
    from trl_trm.tiny import build_tiny_tokenizer

    hf_logging.set_verbosity_error()
    _set_threads(threads)
    start = time.perf_counter()
    control = control or {}
    batch = control.get("batch", cfg.batch)
    tokenizer = build_tiny_tokenizer()
    model = _warm_started(tokenizer, seed, cfg)
    lo, hi = cfg.answer_len
    train = Dataset.from_list(
        task_rows(max(cfg.steps * batch // cfg.num_generations, 16), seed=seed, min_len=lo, max_len=hi)
    )
    trainer_cls = TRMTrainer
    if method == "trl_sequence_mask":
        trainer_cls = trl_sequence_mask_trainer()
    elif method == "trm_random":
        trainer_cls = random_mask_trainer(control.get("rates", []), seed)
    with tempfile.TemporaryDirectory() as out:
        args = _trainer_args(cfg, method, seed, out, batch)
        rollout = MismatchRollout(**KINDS[kind], topk=METHODS[method].get("trm_rollout_topk", 0), seed=seed)
        reward = class_fatal_reward if cfg.fatal else task_reward
        trainer = trainer_cls(
            model=model,
            reward_funcs=reward,
            args=args,
            train_dataset=train,
            processing_class=tokenizer,
            rollout_func=rollout,
        )
        trainer.remove_callback(PrinterCallback)  # one progress line per run instead of every log dict
        # What `evaluate` of the warm-started weights depends on: those weights and the evaluation settings.
        init_key = (*_warm_key(seed, cfg), cfg.eval_prompts, cfg.eval_samples, cfg.max_completion_length, cfg.fatal)
        if init_key not in _EVAL_INIT:  # the same weights and sampling seed for every method of a seed
            _EVAL_INIT[init_key] = evaluate(trainer, cfg, seed)
        eval_init = _EVAL_INIT[init_key]
        trainer.train()
        eval_final = evaluate(trainer, cfg, seed)
    # One entry per optimizer step (TRL logs the rewards only at the steps that generate: NaN at the others).
    steps = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    keys = sorted({k for h in steps for k, v in h.items() if isinstance(v, (int, float))})
    p_token = sorted(rollout.collapse_p_token)
    return {
        "kind": kind,
        "method": method,
        "seed": seed,
        "steps": len(steps),
        "batch": batch,
        "eval_reward_init": eval_init,
        "eval_reward_final": eval_final,
        "wall_s": time.perf_counter() - start,
        "flip_rate": rollout.flip_rate,  # perturbed fraction of the sampled completion tokens (impulse, flip)
        "fragile_visits_per_sequence": rollout.flipped_tokens / max(rollout.sampled_sequences, 1),
        "collapse_p_token_median": p_token[len(p_token) // 2] if p_token else math.nan,
        "collapse_p_token_le_1e-3": sum(p <= 1e-3 for p in p_token) / len(p_token) if p_token else math.nan,
        "curves": {k: [_num(h.get(k)) for h in steps] for k in keys},
    }


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) else math.nan


def evaluate(trainer, cfg: StudyConfig, seed: int) -> float:
    """Mean reward of the trainer's current policy (fp32, clean sampling at temperature 1, no mismatch) on held-out
    prompts: what the trained model is worth, independent of the mismatched rollouts it was trained on."""
    import torch

    from experiments.rollout_engine import MismatchRollout

    data = _eval_rows(cfg.eval_prompts, cfg.answer_len)
    prompts = [row["prompt"] for row in data for _ in range(cfg.eval_samples)]
    targets = [row["target"] for row in data for _ in range(cfg.eval_samples)]
    clean = MismatchRollout("none")
    clean.sync(trainer.accelerator.unwrap_model(trainer.model), trainer.state.global_step)
    tok = trainer.processing_class
    rng_state = torch.get_rng_state()
    torch.manual_seed(1_000 + seed)
    try:
        out = clean.generate(
            trainer._tokenize_prompts(prompts)[0],
            max_new_tokens=cfg.max_completion_length,
            temperature=1.0,
            pad_id=tok.pad_token_id,
            eos_id=tok.eos_token_id,
        )
    finally:
        torch.set_rng_state(rng_state)  # training continues with the RNG stream it would have had
    texts = tok.batch_decode(out["completion_ids"], skip_special_tokens=True)
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    rewards = (class_fatal_reward if cfg.fatal else task_reward)(completions, targets)
    return sum(rewards) / len(rewards)


# ------------------------------------------------------------------------------------------------ driver
def _job(args: tuple) -> dict[str, Any]:
    return run_one(*args)


def _jobs(cfg: StudyConfig, phase: int, done: list[dict[str, Any]]) -> list[tuple]:
    """Phase 0: every arm but the controls; phase 1: the controls, from the `trm` run of their kind and seed."""
    threads = 1 if cfg.workers > 1 else 2
    trm = {(r["kind"], r["seed"]): r for r in done if r["method"] == "trm"}
    jobs = []
    for s in cfg.seeds:
        for k in cfg.kinds:
            methods = ("none",) if k == cfg.reference_kind or k in cfg.control_only_kinds else cfg.methods
            for m in methods:
                if phase == 0 and m not in CONTROLS:
                    jobs.append((k, m, s, cfg, threads))
                elif phase == 1 and m in CONTROLS:
                    if (k, s) not in trm:
                        raise ValueError(
                            f"The control {m!r} needs the `trm` arm of kind {k!r}: add `trm` to the methods."
                        )
                    jobs.append(
                        (k, m, s, cfg, threads, control_setting(m, trm[(k, s)], cfg.batch, cfg.num_generations))
                    )
    return jobs


def run_study(cfg: StudyConfig) -> dict[str, Any]:
    start = time.perf_counter()
    load_before = os.getloadavg()
    runs: list[dict[str, Any]] = []
    for phase in (0, 1):
        jobs = _jobs(cfg, phase, runs)
        if cfg.workers > 1 and len(jobs) > 1:
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=ctx) as pool:
                for i, run in enumerate(pool.map(_job, jobs)):
                    runs.append(run)
                    _progress(i + 1, len(jobs), run, start)
        else:
            for i, job in enumerate(jobs):
                runs.append(_job(job))
                _progress(i + 1, len(jobs), runs[-1], start)
    elapsed = time.perf_counter() - start
    meta = {
        "command": " ".join([os.path.basename(sys.executable), "-m", "experiments.mismatch_study", *sys.argv[1:]]),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()},
        "kinds": {k: KINDS[k] for k in cfg.kinds},
        "methods": {m: METHODS[m] for m in cfg.methods},
        "wall_s": elapsed,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    return write_report(runs, cfg, meta)


def _progress(i: int, n: int, run: dict[str, Any], start: float) -> None:
    print(
        f"[{i:>3}/{n}] {run['kind']:<9} {run['method']:<17} seed {run['seed']}  eval reward "
        f"{run['eval_reward_init']:.3f} -> {run['eval_reward_final']:.3f}  ({run['wall_s']:.1f} s, "
        f"total {time.perf_counter() - start:.0f} s)",
        flush=True,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="harmful", help="which table (default harmful)")
    parser.add_argument("--smoke", action="store_true", help="harmful path at toy size: 4 steps, 5 runs, seed 0")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=None)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=None)
    parser.add_argument("--workers", type=int, default=None, help="parallel processes (1 torch thread each if > 1)")
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--plots-dir", type=Path, default=None)
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--reaggregate", type=Path, default=None, help="rebuild tables and plots of the preset from a saved JSON"
    )
    a = parser.parse_args(argv)
    cfg = PRESETS[a.preset]
    if a.smoke:  # the harmful preset's path at toy size: one generated batch, 4 optimizer steps, the controls
        cfg = dataclasses.replace(
            PRESETS["harmful"],
            steps=4,
            seeds=(0,),
            batch=16,
            kinds=("clean", "collapse"),
            methods=("none", "trm", "trm_random", "trm_equal"),
            workers=1,
            tag="smoke",
            eval_prompts=8,
            plots_dir=None,
        )
    for name in ("steps", "workers", "out_dir", "plots_dir"):
        if getattr(a, name) is not None:
            cfg = dataclasses.replace(cfg, **{name: getattr(a, name)})
    for name in ("seeds", "kinds", "methods"):
        if getattr(a, name) is not None:
            cfg = dataclasses.replace(cfg, **{name: tuple(getattr(a, name))})
    if a.no_plots:
        cfg = dataclasses.replace(cfg, plots_dir=None)
    if a.reaggregate is not None:  # no training: the saved runs' curves, summarised again with this code
        saved = json.loads(a.reaggregate.read_text())
        meta = {k: v for k, v in saved["meta"].items() if not k.startswith("grad_spike")}
        return write_report(saved["curves"], cfg, meta)
    return run_study(cfg)


if __name__ == "__main__":
    main()
