"""One TRMTrainer step with a deterministic rollout_func, for the 1-vs-2-process comparison in test_distributed.py.

Usage: torchrun --nproc_per_node N dist_step.py MODEL_DIR OUT_JSON GLOBAL_BATCH
"""

import json
import sys

import torch
from datasets import Dataset

from trl_trm import TRMConfig, TRMTrainer
from trl_trm.distributed import shutdown_distributed


def rollout_func(prompts, trainer):
    tok = trainer.processing_class
    prompt_ids = [tok(p)["input_ids"] for p in prompts]
    completion_ids, logprobs = [], []
    for i, p in enumerate(prompts):
        # Prompts arrive in groups of num_generations on every rank: vary the completion within the group.
        n, g = int(p.split("+")[0]), i % trainer.num_generations
        ids = tok(" ".join(str((n + g) * k % 97) for k in range(1 + (n + 2 * g) % 6)))["input_ids"] + [
            tok.eos_token_id
        ]
        completion_ids.append(ids)
        # A rollout engine whose log-probs are a fixed function of the token: a deterministic, varied mismatch.
        logprobs.append([-6.2 - 0.05 * ((t * 7 + n) % 11) for t in range(len(ids))])
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}


def reward(completions, prompts, **kwargs):
    return [len(c) / 40 for c in completions]


def main():
    model_dir, out_json, global_batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    args = TRMConfig(
        output_dir=out_json + ".d",
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=global_batch // world,
        num_generations=4,
        max_completion_length=16,
        learning_rate=1e-3,
        max_steps=1,
        logging_steps=1,
        report_to=[],
        gradient_checkpointing=False,
        save_strategy="no",
        seed=0,
        loss_type="dapo",
        trm_delta_max=1.2,
        trm_delta_avg=None,
        disable_tqdm=True,
    )
    ds = Dataset.from_list([{"prompt": f"{i}+1="} for i in range(64)])
    trainer = TRMTrainer(model=model_dir, reward_funcs=reward, args=args, train_dataset=ds, rollout_func=rollout_func)
    trainer.train()
    if trainer.accelerator.is_main_process:
        with open(out_json, "w") as f:
            json.dump({"world": trainer.accelerator.num_processes, "log": trainer.state.log_history[0]}, f)
    shutdown_distributed()  # without it a rank can abort or deadlock at exit (see trl_trm/distributed.py)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
