"""The estimator table of issue 10, measured: the seeds' estimator inside TRL's loss on the tiny model.

A `rollout_func` reports the trainer's own fp32 log-probs shifted by a constant c (so ρ_t = e^c on every token),
plain SGD, thresholds that accept everything. Rows:

1. grad_norm(c = 0.5) / grad_norm(c = 0) for `trm` and every loss type, `num_iterations` 1 and 2 (target e^0.5).
2. `token_tis`, `num_iterations=2`, c = 0: grad norm at step 2, TRMTrainer vs GRPOTrainer (target: equal).
3. Every sequence rejected with `entropy_coef=0.1`: grad norm (target: exactly 0).
4. `gradient_accumulation_steps=2` with one token at log ρ = 2: `trm/log_ratio_abs_max/max` (target 2.0) and
   `trm/bound/trpo_estimate` against the 1-step run.
5. Identical fp32 engines (transformers generation) under sampler processors: accept rate and `trm/kl_k3`.

    python benchmarks/estimator_table.py [--quick] [--out benchmarks/results/estimator_table.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

LOSS_TYPES = ["dapo", "grpo", "bnpo", "dr_grpo", "cispo", "sapo", "luspo"]


def length_reward(completions, **kwargs):
    return [min(len(c), 40) / 40 for c in completions]


def _completions(prompts, tok):
    words = [" 1", " 2 3", " 4 5 6", " 7 8 9 0"]
    return [tok(words[(len(p) + i) % 4])["input_ids"] + [tok.eos_token_id] for i, p in enumerate(prompts)]


def shifted_rollout(c, outlier=None):
    def rollout_func(prompts, trainer):
        tok = trainer.processing_class
        model = trainer.accelerator.unwrap_model(trainer.model)
        prompt_ids = [tok(p)["input_ids"] for p in prompts]
        completion_ids = _completions(prompts, tok)
        logprobs = []
        with torch.no_grad():
            for p, comp in zip(prompt_ids, completion_ids, strict=True):
                logits = model(input_ids=torch.tensor([p + comp])).logits[0, len(p) - 1 : -1].float()
                lp = torch.log_softmax(logits / trainer.temperature, -1).gather(-1, torch.tensor(comp)[:, None])[:, 0]
                logprobs.append((lp - c).tolist())
        if outlier is not None:
            index, t, d = outlier
            i = prompts.index(sorted(set(prompts))[index])
            logprobs[i][t] -= d
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}

    return rollout_func


def train(model_dir, dataset, out, grpo=False, rollout_func=None, **overrides):
    from trl import GRPOConfig, GRPOTrainer

    from trl_trm import TRMConfig, TRMTrainer

    kwargs = dict(
        output_dir=out,
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=12,
        optim="sgd",
        learning_rate=1e-4,
        max_steps=2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
        temperature=1.0,
    )
    kwargs.update(overrides)
    if grpo:
        args, cls = GRPOConfig(**{k: v for k, v in kwargs.items() if not k.startswith("trm_")}), GRPOTrainer
    else:
        args, cls = TRMConfig(**kwargs), TRMTrainer
    trainer = cls(
        model=model_dir, reward_funcs=length_reward, args=args, train_dataset=dataset, rollout_func=rollout_func
    )
    trainer.train()
    return trainer.state.log_history


def logs(history, key):
    return [h[key] for h in history if key in h and h[key] is not None]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two loss types only")
    parser.add_argument("--out", default="benchmarks/results/estimator_table.json")
    args = parser.parse_args(argv)
    from datasets import Dataset

    from trl_trm.tiny import save_tiny_model

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    root = tempfile.mkdtemp(prefix="estimator-table-")
    model_dir = save_tiny_model(os.path.join(root, "model"))
    dataset = Dataset.from_list([{"prompt": f"{i}+{i % 7}="} for i in range(64)])
    accept_all = dict(trm_delta_max=10.0, trm_delta_avg=None)
    results: dict = {"grad_norm_ratio": {}, "target_ratio": math.exp(0.5)}
    n = iter(range(10**6))
    start = time.perf_counter()

    loss_types = LOSS_TYPES[:2] if args.quick else LOSS_TYPES
    for loss_type in loss_types:
        for iters in (1, 2):
            norms = []
            for c in (0.0, 0.5):
                h = train(
                    model_dir,
                    dataset,
                    os.path.join(root, f"r{next(n)}"),
                    rollout_func=shifted_rollout(c),
                    loss_type=loss_type,
                    num_iterations=iters,
                    **accept_all,
                )
                norms.append(logs(h, "grad_norm"))
            ratio = [b / a for a, b in zip(*norms, strict=True)]
            results["grad_norm_ratio"][f"{loss_type}/num_iterations={iters}"] = ratio
            print(f"grad_norm ratio  {loss_type:8s} num_iterations={iters}: " + ", ".join(f"{r:.4f}" for r in ratio))

    tis = dict(num_iterations=2, learning_rate=0.5, trm_mode="token_tis", rollout_func=shifted_rollout(0.0))
    ours = logs(train(model_dir, dataset, os.path.join(root, f"r{next(n)}"), **tis), "grad_norm")
    ref = logs(train(model_dir, dataset, os.path.join(root, f"r{next(n)}"), grpo=True, **tis), "grad_norm")
    results["token_tis_step2"] = {"trm": ours[1], "grpo": ref[1]}
    print(f"token_tis num_iterations=2 step 2 grad_norm: TRMTrainer {ours[1]:.4f}  GRPOTrainer {ref[1]:.4f}")

    h = train(
        model_dir,
        dataset,
        os.path.join(root, f"r{next(n)}"),
        rollout_func=shifted_rollout(0.5),
        entropy_coef=0.1,
        trm_delta_max=0.1,
        trm_delta_avg=None,
    )
    results["reject_all_entropy_grad_norm"] = logs(h, "grad_norm")
    print(f"reject all, entropy_coef=0.1: accept {logs(h, 'trm/accept_rate')}  grad_norm {logs(h, 'grad_norm')}")

    window = {}
    for ga, batch in ((1, 8), (2, 4)):
        h = train(
            model_dir,
            dataset,
            os.path.join(root, f"r{next(n)}"),
            rollout_func=shifted_rollout(0.0, outlier=(0, 1, 2.0)),
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=ga,
            max_steps=1,
            trm_mode="none",
        )
        window[f"ga={ga}"] = {
            k: logs(h, k)[0] for k in ("trm/log_ratio_abs_max/max", "trm/bound/trpo_estimate", "trm/accept_rate")
        }
        print(f"gradient_accumulation_steps={ga}: {window[f'ga={ga}']}")
    results["window"] = window

    samplers = {}
    for name, kw in {
        "top_k=20": {"top_k": 20},
        "top_p=0.9": {"top_p": 0.9},
        "min_p=0.1": {"min_p": 0.1},
        "repetition_penalty=1.2": {"repetition_penalty": 1.2},
        "top_p=0.9 trm_exact": {"top_p": 0.9, "trm_mode": "trm_exact", "trm_rollout_topk": 4},
    }.items():
        try:
            h = train(model_dir, dataset, os.path.join(root, f"r{next(n)}"), **kw)
            samplers[name] = {"accept_rate": logs(h, "trm/accept_rate"), "kl_k3": logs(h, "trm/kl_k3")}
        except ValueError as err:  # refused at start-up, by name
            samplers[name] = {"refused": str(err).splitlines()[0]}
        print(f"identical fp32 engines, {name}: {samplers[name]}")
    results["samplers"] = samplers
    results["seconds"] = time.perf_counter() - start
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
