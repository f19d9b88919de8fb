"""`calibrate_trainer` on the demo recipe (its built-in tiny model, reversal task and settings) with a deterministic
rollout engine, for the 1-vs-2-process comparison in tests/test_calibrate_cli.py.

The engine is a copy of the policy decoding deterministically (a rank-by-position rule, not sampling), one prompt at
a time (so a completion does not depend on which process or batch it falls in), and reporting its log-probs at
temperature 1.05 against the trainer's 1.0: a known, deterministic mismatch.
Usage: torchrun --nproc_per_node N dist_calibrate.py OUT_JSON
"""

import copy
import json
import os
import sys

import torch

from trl_trm.calibrate import calibrate_trainer
from trl_trm.demo import demo_recipe_path
from trl_trm.distributed import shutdown_distributed
from trl_trm.recipe import parse_recipe
from trl_trm.train import load_train_eval, resolve_model
from trl_trm.trainer import TRMTrainer

ENGINE_TEMPERATURE = 1.05  # the engine reports a slightly flatter distribution than the trainer's: a known mismatch


def make_engine():
    cache = {}

    @torch.no_grad()
    def rollout(prompts, trainer):
        if "model" not in cache:
            cache["model"] = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model)).eval()
        model, tok = cache["model"], trainer.processing_class
        prompt_ids, completions, logprobs = [], [], []
        for ids in trainer._tokenize_prompts(prompts)[0]:  # exactly TRL's prompt ids
            ids = list(ids)
            seq, lps = list(ids), []
            for _ in range(trainer.args.max_completion_length):
                logits = model(torch.tensor([seq])).logits[0, -1].float()
                # A deterministic stand-in for sampling: the 1st, 2nd or 3rd most likely token by position (a
                # greedy token of this tiny model has probability ~1, which would leave no mismatch to measure).
                token = int(logits.topk(3).indices[(len(seq) + len(ids)) % 3])
                lps.append(float(torch.log_softmax(logits / ENGINE_TEMPERATURE, -1)[token]))
                seq.append(token)
                if token == tok.eos_token_id:
                    break
            prompt_ids.append(ids)
            completions.append(seq[len(ids) :])
            logprobs.append(lps)
        return {"prompt_ids": prompt_ids, "completion_ids": completions, "logprobs": logprobs}

    return rollout


def main():
    out_json = sys.argv[1]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    argv = ["--config", demo_recipe_path(), "--output_dir", out_json + ".d", "--bf16", "false"]
    argv += ["--per_device_train_batch_size", str(16 // world), "--report_to", "none"]
    script_args, config, model_args = parse_recipe(argv)
    train_dataset, _ = load_train_eval(script_args, config)
    from trl_trm.rewards import resolve_reward_funcs

    model = resolve_model(model_args, config.output_dir, config.seed)
    rewards = resolve_reward_funcs(script_args.reward_funcs)
    trainer = TRMTrainer(model=model, reward_funcs=rewards, args=config, train_dataset=train_dataset,
                         rollout_func=make_engine())  # fmt: skip
    report = calibrate_trainer(trainer, batches=2, targets=(0.9, 0.5), progress=False)
    if trainer.accelerator.is_main_process:
        with open(out_json, "w", encoding="utf-8") as f:
            json.dump({"world": world, **report}, f)
    shutdown_distributed()


if __name__ == "__main__":
    main()
