"""Offline demo: TRMTrainer on a tiny locally built model and a built-in verifiable task, on CPU, no downloads.

The task is string reversal ("reverse: abc" -> "cba") with an exact, graded reward in [0, 1]. Training runs under
bf16 autocast while the sampling log-probs are captured in fp32 at generation time: a real rollout/training
mismatch (|log rho| ~ 1e-3 per token), so the trust-region mask has something to reject at the demo's tight
threshold.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field


@dataclass
class DemoArguments:
    output_dir: str = field(default="outputs/demo", metadata={"help": "Where the model, logs and metrics go."})
    max_steps: int = field(default=40, metadata={"help": "Optimizer steps."})
    trm_mode: str = field(default="trm", metadata={"help": "Correction mode (see TRMConfig)."})
    trm_delta_max: float = field(
        default=2e-3, metadata={"help": "Demo threshold on max |log rho|: tight, so the bf16 mismatch shows."}
    )
    seed: int = field(default=0, metadata={"help": "Random seed."})


def reversal_dataset(n: int, seed: int):
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 4)))
        rows.append({"prompt": [{"role": "user", "content": f"reverse: {word}"}], "target": word[::-1]})
    return Dataset.from_list(rows)


def reversal_reward(completions, target, **kwargs) -> list[float]:
    """Exact, graded reward in [0, 1]: half for using only the word's letters, half for matching the reversal
    position by position (1.0 = exact reversal, nothing else). The first half gives a random model a signal."""
    rewards = []
    for completion, want in zip(completions, target, strict=True):
        text = completion[0]["content"] if isinstance(completion, list) else completion
        got = text.strip()
        if not got:
            rewards.append(0.0)
            continue
        letters = sum(c in want for c in got) / len(got)
        hits = sum(a == b for a, b in zip(got, want, strict=False)) / max(len(want), len(got))
        rewards.append(0.5 * letters + 0.5 * hits)
    return rewards


def run_demo(args: DemoArguments) -> dict[str, float]:
    from trl_trm import TRMConfig, TRMTrainer
    from trl_trm.tiny import save_tiny_model

    model_dir = save_tiny_model(os.path.join(args.output_dir, "init-model"), seed=args.seed)
    config = TRMConfig(
        output_dir=args.output_dir,
        use_cpu=True,
        bf16=True,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        learning_rate=5e-3,
        max_steps=args.max_steps,
        logging_steps=5,
        report_to=[],
        gradient_checkpointing=False,
        save_strategy="no",
        seed=args.seed,
        trm_mode=args.trm_mode,
        trm_delta_max=args.trm_delta_max,
        disable_tqdm=False,
    )
    trainer = TRMTrainer(
        model=model_dir,
        reward_funcs=reversal_reward,
        args=config,
        train_dataset=reversal_dataset(512, args.seed),
    )
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "reward" in h]
    accept = [h["trm/accept_rate"] for h in logs if h.get("trm/accept_rate") is not None]
    rejects = {k: v for k, v in logs[-1].items() if k.startswith("trm/reject_rate/")} if logs else {}
    summary = {
        "train_seconds": elapsed,
        "reward_first": logs[0]["reward"] if logs else float("nan"),
        "reward_last": logs[-1]["reward"] if logs else float("nan"),
        "accept_rate_mean": sum(accept) / len(accept) if accept else float("nan"),
    }
    print("\n=== trl-trm demo summary ===")
    print(f"trained {args.max_steps} steps in {elapsed:.1f} s (output: {args.output_dir})")
    print(f"reward: first log {summary['reward_first']:.3f} -> last log {summary['reward_last']:.3f}")
    print(f"trm/accept_rate (mean over logs): {summary['accept_rate_mean']:.3f}")
    if rejects:
        worst = max(rejects, key=rejects.get)
        print(f"criterion rejecting most (last log): {worst.split('/')[-1]} ({rejects[worst]:.3f})")
    return summary
