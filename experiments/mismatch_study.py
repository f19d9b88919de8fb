"""Mismatch study: which correction keeps RL training healthy when the rollout engine differs from the trainer?

One command, offline, CPU::

    .venv/bin/python -m experiments.mismatch_study                     # realistic mismatch (make study)
    .venv/bin/python -m experiments.mismatch_study --preset extreme    # the first, extreme table (make study-extreme)
    .venv/bin/python -m experiments.mismatch_study --smoke             # 2 steps, 1 kind x 2 methods, 1 seed

A tiny Qwen2 (``trl_trm.tiny``, built locally) learns the demo's string-reversal task (exact, graded reward from
``trl_trm.rewards.reversal``) with ``TRMTrainer`` in fp32, while its rollouts come from
:class:`experiments.rollout_engine.MismatchRollout` (a TRL ``rollout_func``) with one kind of mismatch: bf16
precision, routing-flip emulation (impulse noise at random positions, or a fixed rare set of fragile contexts), or
stale weights. Every correction method is trained on every
kind with several seeds; the results go to ``experiments/results/`` (JSON with every curve, CSV summary, markdown
table) and the plots to ``docs/mismatch-study/``. See ``docs/mismatch-study.md``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

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
    methods: tuple[str, ...] = tuple(METHODS)
    out_dir: Path = RESULTS_DIR
    plots_dir: Path | None = PLOTS_DIR / "extreme"
    tag: str = "study_extreme"


# The two tables of docs/mismatch-study.md. "extreme": the first study (12-token completions, mismatch chosen to be
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
}


def _trl_sequence_mask_trainer():
    """`TRMTrainer` whose mask is TRL's `sequence_mask` importance sampling (grpo_trainer.py, 1.16, the
    `vllm_importance_sampling_correction` block): ratio_i = exp(sum_t (log pi_old - log pi_roll)) per sequence,
    set to 0 outside [clip_min, clip_max] (defaults: None, 3.0), and the per-token loss is MULTIPLIED by that ratio
    (not by 1). The config is `seq_mis` with C = 3 (same keep set, same metrics); this override only turns the 0/1
    mask into ratio * keep. Seam: `TRMTrainer._trm_weights` (the loss weights of one batch's mask). pi_old here is
    the policy at the loss, which equals TRL's pi_old because generation happens every optimizer step."""
    from trl_trm import TRMTrainer

    class TRLSequenceMaskTrainer(TRMTrainer):
        def _trm_weights(self, result, old_logps, sampling, mask, ratio_max):
            ratio = result.seq_log_ratio.exp().unsqueeze(-1)  # (B, 1), zero weight already outside [0, 3]
            return result.weights * ratio  # (B, T): the 0/1 sequence mask times the product ratio

    return TRLSequenceMaskTrainer


TASK = "class"  # "class", "copy" or "reverse" (see task_rows)


def task_rows(n: int, seed: int, task: str | None = None, min_len: int = 2, max_len: int = 12) -> list[dict[str, Any]]:
    """String tasks on words of ``min_len``-``max_len`` letters from a-j: "reverse: <word>" -> the reversed word (the
    demo's task, `trl_trm.demo`) or "copy: <word>" -> the word (easier: the tiny model learns it by RL in the
    study's budget, reversal it does not). Words are longer than the demo's 2-4 letters, so completion lengths spread."""
    import random

    task = TASK if task is None else task
    if task not in ("copy", "reverse", "class"):
        raise ValueError(f"Unknown task {task!r}: 'class', 'copy' or 'reverse'.")
    rng = random.Random(seed)
    rows = []
    if task == "class":  # "letters 5" -> 5 letters from a-j; "digits 3" -> 3 digits (graded by class_reward)
        for _ in range(n):
            kind, count = rng.choice(("letters", "digits")), rng.randint(min_len, max_len)
            target = ("a" if kind == "letters" else "0") * count  # a representative answer; any of the class scores
            rows.append({"prompt": [{"role": "user", "content": f"{kind} {count}"}], "target": target})
        return rows
    for _ in range(n):
        word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(min_len, max_len)))
        target = word[::-1] if task == "reverse" else word
        rows.append({"prompt": [{"role": "user", "content": f"{task}: {word}"}], "target": target})
    return rows


def positional_reward(completions, target, **kwargs) -> list[float]:
    """Exact, graded reward in [0, 1]: the fraction of positions where the answer matches the target, over the longer
    of the two (1.0 = exactly the target). The positional half of `trl_trm.rewards.reversal`; its other half (fraction
    of the word's letters, at any length) let RL drift to long answers here, so it is left out."""
    rewards = []
    for completion, want in zip(completions, target, strict=True):
        got = (completion[-1]["content"] if isinstance(completion, list) else completion).strip()
        hits = sum(a == b for a, b in zip(got, want, strict=False))
        rewards.append(hits / max(len(want), len(got), 1))
    return rewards


def class_reward(completions, target, **kwargs) -> list[float]:
    """Exact, graded reward in [0, 1] of the "class" task: (fraction of the answer's characters in the requested class,
    a-j or 0-9) x (1 - |answer length - requested length| / requested length, floored at 0). 1.0 = exactly the
    requested number of characters, all of the class. Spaces count as characters (outside both classes)."""
    rewards = []
    for completion, want in zip(completions, target, strict=True):
        got = (completion[-1]["content"] if isinstance(completion, list) else completion).strip()
        if not got:
            rewards.append(0.0)
            continue
        allowed = "abcdefghij" if want[0] == "a" else "0123456789"
        in_class = sum(c in allowed for c in got) / len(got)
        length = max(0.0, 1.0 - abs(len(got) - len(want)) / len(want))
        rewards.append(in_class * length)
    return rewards


def task_reward(completions, target, **kwargs) -> list[float]:
    """The reward of :data:`TASK`."""
    fn = class_reward if TASK == "class" else positional_reward
    return fn(completions, target, **kwargs)


def _eval_rows(n: int, answer_len: tuple[int, int] = (2, 12)) -> list[dict[str, Any]]:
    return task_rows(n, seed=10_000, min_len=answer_len[0], max_len=answer_len[1])  # held out: training uses 0, 1, ...


def warm_start(
    tokenizer,
    seed: int,
    steps: int,
    lr: float = 3e-3,
    batch: int = 32,
    hidden_size: int = 64,
    answer_len: tuple[int, int] = (2, 12),
):
    """A short supervised warm start (teacher forcing on prompt + reversed word + EOS, loss on the answer only), so
    that RL starts from a weak but non-trivial policy that ends its answers (variable lengths), as RL after SFT does.
    Deliberately under-trained: RL has room to improve."""
    import random

    import torch

    from trl_trm.tiny import build_tiny_model

    model = build_tiny_model(tokenizer, seed=seed, hidden_size=hidden_size)
    if steps <= 0:
        return model
    rows = task_rows(steps * batch, seed=50_000 + seed, min_len=answer_len[0], max_len=answer_len[1])
    sft_rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        chunk = rows[step * batch : (step + 1) * batch]
        seqs, starts = [], []
        for row in chunk:
            prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)
            prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
            text = row["target"]
            if text[0] in "a0" and set(text) == {text[0]}:  # "class" task: a random answer of the class
                alphabet = "abcdefghij" if text[0] == "a" else "0123456789"
                text = "".join(sft_rng.choice(alphabet) for _ in text)
            answer = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            seqs.append(prompt + answer)
            starts.append(len(prompt))
        width = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
        labels = torch.full((len(seqs), width), -100)
        attn = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, (x, st) in enumerate(zip(seqs, starts, strict=True)):
            ids[i, : len(x)] = torch.tensor(x)
            attn[i, : len(x)] = 1
            labels[i, st : len(x)] = torch.tensor(x[st:])
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


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


def run_one(kind: str, method: str, seed: int, cfg: StudyConfig, threads: int = 1) -> dict[str, Any]:
    """Train one (mismatch kind, method, seed) and return its curves and summary numbers."""
    for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers.utils import logging as hf_logging

    from experiments.rollout_engine import MismatchRollout
    from trl_trm import TRMConfig, TRMTrainer
    from trl_trm.tiny import build_tiny_tokenizer

    hf_logging.set_verbosity_error()
    _set_threads(threads)
    start = time.perf_counter()
    tokenizer = build_tiny_tokenizer()
    model = _warm_started(tokenizer, seed, cfg)
    prompts_needed = cfg.steps * cfg.batch // cfg.num_generations
    lo, hi = cfg.answer_len
    train = Dataset.from_list(task_rows(max(prompts_needed, 16), seed=seed, min_len=lo, max_len=hi))
    overrides = dict(METHODS[method])
    topk = overrides.get("trm_rollout_topk", 0)
    with tempfile.TemporaryDirectory() as out:
        args = TRMConfig(
            output_dir=out,
            use_cpu=True,
            bf16=False,  # the trainer runs fp32: the only mismatch is the rollout engine's
            seed=seed,
            max_steps=cfg.steps,
            per_device_train_batch_size=cfg.batch,
            num_generations=cfg.num_generations,
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
            **overrides,
        )
        rollout = MismatchRollout(**KINDS[kind], topk=topk, seed=seed)
        trainer_cls = _trl_sequence_mask_trainer() if method == "trl_sequence_mask" else TRMTrainer
        trainer = trainer_cls(
            model=model,
            reward_funcs=task_reward,
            args=args,
            train_dataset=train,
            processing_class=tokenizer,
            rollout_func=rollout,
        )
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # one progress line per run instead of every log dict
        # What `evaluate` of the warm-started weights depends on: those weights and the evaluation settings.
        init_key = (*_warm_key(seed, cfg), cfg.eval_prompts, cfg.eval_samples, cfg.max_completion_length)
        if init_key not in _EVAL_INIT:  # the same weights and sampling seed for every method of a seed
            _EVAL_INIT[init_key] = evaluate(trainer, cfg, seed)
        eval_init = _EVAL_INIT[init_key]
        trainer.train()
        eval_final = evaluate(trainer, cfg, seed)
    steps = [h for h in trainer.state.log_history if "reward" in h]
    keys = sorted({k for h in steps for k, v in h.items() if isinstance(v, (int, float))})
    curves = {k: [_num(h.get(k)) for h in steps] for k in keys}
    return {
        "kind": kind,
        "method": method,
        "seed": seed,
        "steps": len(steps),
        "eval_reward_init": eval_init,
        "eval_reward_final": eval_final,
        "wall_s": time.perf_counter() - start,
        "flip_rate": rollout.flip_rate,  # perturbed fraction of the sampled completion tokens (impulse, flip)
        "curves": curves,
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
    rewards = task_reward(completions, targets)
    return sum(rewards) / len(rewards)


# ------------------------------------------------------------------------------------------------ aggregation
def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def _std(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.stdev(xs) if len(xs) > 1 else 0.0 if xs else math.nan


def summarize_run(run: dict[str, Any], spike_threshold: float, last: int = 5) -> dict[str, Any]:
    c = run["curves"]
    grad = [g for g in c.get("grad_norm", []) if not math.isnan(g)]
    tail = c["reward"][-last:]
    return {
        "kind": run["kind"],
        "method": run["method"],
        "seed": run["seed"],
        "eval_reward_init": run["eval_reward_init"],
        "eval_reward_final": run["eval_reward_final"],
        "train_reward_first": _mean(c["reward"][:last]),
        "train_reward_last": _mean(tail),
        "accept_rate": _mean(c.get("trm/accept_rate", [])),
        "token_weight": _mean(c.get("trm/token_weight/mean", [])),
        "kl_k3": _mean(c.get("trm/kl_k3", [])),
        "log_ratio_abs_max": _mean(c.get("trm/log_ratio_abs_max/mean", [])),
        **{f"accept_q{q}": _mean(c.get(f"trm/accept_rate/length_q{q}", [])) for q in range(1, 5)},
        "grad_norm_median": statistics.median(grad) if grad else math.nan,
        "grad_norm_max": max(grad) if grad else math.nan,
        "grad_spikes": sum(g > spike_threshold for g in grad),
        "mean_length": _mean(c.get("completions/mean_length", [])),
        "flip_rate": run.get("flip_rate", 0.0),
        "wall_s": run["wall_s"],
    }


SUMMARY_FIELDS = (
    "eval_reward_final",
    "train_reward_last",
    "accept_rate",
    "accept_q1",
    "accept_q4",
    "grad_norm_max",
    "grad_spikes",
    "kl_k3",
)


def aggregate(rows: list[dict[str, Any]], baseline: str = "none") -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["kind"], r["method"]), []).append(r)
    out = []
    for (kind, method), rs in groups.items():
        agg: dict[str, Any] = {"kind": kind, "method": method, "seeds": len(rs)}
        for f in SUMMARY_FIELDS + ("eval_reward_init", "token_weight", "accept_q2", "accept_q3", "mean_length"):
            vals = [float(r[f]) for r in rs]
            agg[f"{f}_mean"], agg[f"{f}_std"] = _mean(vals), _std(vals)
        # Paired by seed against the baseline (same warm start, same held-out prompts and sampling seed): the
        # difference of final eval rewards, mean and standard error over seeds.
        base = {r["seed"]: r["eval_reward_final"] for r in groups.get((kind, baseline), [])}
        deltas = [r["eval_reward_final"] - base[r["seed"]] for r in rs if r["seed"] in base]
        agg["delta_eval_mean"] = _mean(deltas) if deltas else math.nan
        agg["delta_eval_se"] = _std(deltas) / math.sqrt(len(deltas)) if len(deltas) > 1 else math.nan
        out.append(agg)
    return out


def markdown_table(agg: list[dict[str, Any]], kinds: tuple[str, ...], methods: tuple[str, ...]) -> str:
    head = (
        "| kind | method | eval reward (final) | Δ vs none (paired) | train reward (last 5) | accept rate | "
        "accept q1 (short) | accept q4 (long) | max grad-norm | grad spikes | k3 KL | mean length |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    index = {(a["kind"], a["method"]): a for a in agg}
    lines = []
    for kind in kinds:
        for method in methods:
            a = index.get((kind, method))
            if a is None:
                continue

            def pm(f: str, fmt: str = ".3f", a: dict[str, Any] = a) -> str:
                m, s = a[f"{f}_mean"], a[f"{f}_std"]
                return "n/a" if math.isnan(m) else f"{m:{fmt}} ± {s:{fmt}}"

            d, se = a.get("delta_eval_mean", math.nan), a.get("delta_eval_se", math.nan)
            delta = "—" if method == "none" or math.isnan(d) else f"{d:+.3f} ± {se:.3f}"
            lines.append(
                f"| {kind} | {method} | {pm('eval_reward_final')} | {delta} | {pm('train_reward_last')} "
                f"| {pm('accept_rate')} | {pm('accept_q1')} | {pm('accept_q4')} | {pm('grad_norm_max', '.2f')} | "
                f"{pm('grad_spikes', '.1f')} | {pm('kl_k3', '.2e')} | {pm('mean_length', '.1f')} |"
            )
    return head + "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ plots
def plot(runs: list[dict[str, Any]], agg: list[dict[str, Any]], cfg: StudyConfig, spike: float) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg.plots_dir.mkdir(parents=True, exist_ok=True)
    kinds = [k for k in cfg.kinds if any(r["kind"] == k for r in runs)]
    methods = [m for m in cfg.methods if any(r["method"] == m for r in runs)]
    colors = {m: plt.cm.tab10(i) for i, m in enumerate(methods)}
    files = []

    def curve_mean(kind: str, method: str, key: str) -> list[float]:
        cs = [r["curves"].get(key, []) for r in runs if r["kind"] == kind and r["method"] == method]
        n = min((len(c) for c in cs), default=0)
        return [_mean([c[i] for c in cs]) for i in range(n)]

    for key, name, ylabel in (
        ("reward", "reward_curves.png", "training reward (rollouts, mean over seeds)"),
        ("grad_norm", "grad_norm_curves.png", "grad norm before clipping (mean over seeds)"),
        ("trm/accept_rate", "accept_rate_curves.png", "accept rate (mean over seeds)"),
    ):
        fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.6), squeeze=False)
        for ax, kind in zip(axes[0], kinds, strict=True):
            for method in methods:
                ys = curve_mean(kind, method, key)
                ax.plot(range(1, len(ys) + 1), ys, label=method, color=colors[method], lw=1.3)
            if key == "grad_norm":
                ax.axhline(spike, color="grey", ls=":", lw=1)
                ax.set_yscale("log")
            ax.set_title(kind)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(ylabel, fontsize=8)
        axes[0][-1].legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = cfg.plots_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))

    index = {(a["kind"], a["method"]): a for a in agg}
    for field, name, ylabel in (
        ("eval_reward_final", "final_eval_reward.png", "held-out reward after training (clean sampling)"),
        ("accept_rate", "accept_rate.png", "mean accept rate"),
    ):
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(kinds) * len(methods) / 3, 3.6))
        width = 0.8 / max(len(methods), 1)
        for j, method in enumerate(methods):
            xs = [i + j * width for i in range(len(kinds))]
            ys = [index[(k, method)][f"{field}_mean"] if (k, method) in index else math.nan for k in kinds]
            es = [index[(k, method)][f"{field}_std"] if (k, method) in index else 0.0 for k in kinds]
            ax.bar(xs, ys, width, yerr=es, label=method, color=colors[method], capsize=2)
        if field == "eval_reward_final":
            init = _mean([a["eval_reward_init_mean"] for a in agg])
            ax.axhline(init, color="grey", ls=":", lw=1, label="before training")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(kinds))], kinds)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = cfg.plots_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))

    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for method in methods:
            a = index.get((kind, method))
            if a is None:
                continue
            ys = [a[f"accept_q{q}_mean"] for q in range(1, 5)]
            ax.plot([1, 2, 3, 4], ys, marker="o", label=method, color=colors[method])
        ax.set_xticks([1, 2, 3, 4], ["q1\nshortest", "q2", "q3", "q4\nlongest"])
        ax.set_title(kind)
        ax.set_ylabel("accept rate by completion-length quartile", fontsize=8)
        ax.set_ylim(-0.02, 1.02)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path = cfg.plots_dir / "accept_rate_by_length.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(str(path))
    return files


# ------------------------------------------------------------------------------------------------ driver
def _job(args: tuple[str, str, int, StudyConfig, int]) -> dict[str, Any]:
    return run_one(*args)


def run_study(cfg: StudyConfig) -> dict[str, Any]:
    jobs = [(k, m, s, cfg, 1 if cfg.workers > 1 else 2) for s in cfg.seeds for k in cfg.kinds for m in cfg.methods]
    start = time.perf_counter()
    load_before = os.getloadavg()
    runs: list[dict[str, Any]] = []
    if cfg.workers > 1:
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


def write_report(runs: list[dict[str, Any]], cfg: StudyConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """Summaries, aggregate, JSON/CSV/markdown and plots from the runs' curves (also used by ``--reaggregate``)."""
    # Gradient-norm spike threshold: 3x the median per-step grad norm of the uncorrected runs of the mildest kind
    # present (precision if run), i.e. of near on-policy training.
    ref_kind = "precision" if "precision" in cfg.kinds else cfg.kinds[0]
    ref = [
        g for r in runs if r["kind"] == ref_kind and r["method"] == cfg.methods[0] for g in r["curves"]["grad_norm"]
    ]
    ref = [g for g in ref if not math.isnan(g)]
    spike = 3.0 * statistics.median(ref) if ref else math.inf
    rows = [summarize_run(r, spike) for r in runs]
    agg = aggregate(rows)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        **meta,
        "grad_spike_threshold": spike,
        "grad_spike_reference": f"3 x median grad_norm of ({ref_kind}, {cfg.methods[0]}) runs",
    }
    report = {"meta": meta, "summary": agg, "runs": rows, "curves": runs}
    json_path = cfg.out_dir / f"{cfg.tag}.json"
    json_path.write_text(json.dumps(report, indent=1, default=float) + "\n")
    with open(cfg.out_dir / f"{cfg.tag}_runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(cfg.out_dir / f"{cfg.tag}_summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(agg[0]))
        writer.writeheader()
        writer.writerows(agg)
    table = markdown_table(agg, cfg.kinds, cfg.methods)
    (cfg.out_dir / f"{cfg.tag}_table.md").write_text(table)
    plots = plot(runs, agg, cfg, spike) if cfg.plots_dir is not None else []
    print(table)
    print(f"{len(runs)} runs in {meta['wall_s']:.0f} s; results in {cfg.out_dir}; plots: {', '.join(plots) or 'none'}")
    return report


def _progress(i: int, n: int, run: dict[str, Any], start: float) -> None:
    print(
        f"[{i:>3}/{n}] {run['kind']:<9} {run['method']:<17} seed {run['seed']}  eval reward "
        f"{run['eval_reward_init']:.3f} -> {run['eval_reward_final']:.3f}  ({run['wall_s']:.1f} s, "
        f"total {time.perf_counter() - start:.0f} s)",
        flush=True,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="realistic", help="which table (default realistic)")
    parser.add_argument("--smoke", action="store_true", help="2 steps, impulse kind, methods none and trm, seed 0")
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
    if a.smoke:
        cfg = dataclasses.replace(
            cfg,
            steps=2,
            seeds=(0,),
            kinds=("impulse",),
            methods=("none", "trm"),
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
