"""Transformers-path rollout/training mismatch as `trm/` metrics: TRMTrainer for a few steps on one model, plain
transformers generation (TRM records the processed sampling log-probs), in three precision settings:

* ``fp32``: model and training in float32 (control: the mismatch is kernel differences only, generate's cached
  incremental forward against the training forward);
* ``bf16_autocast``: float32 weights, training under bf16 autocast (``bf16=True``), generation in float32;
* ``bf16_weights``: weights loaded in bf16 (``dtype=bfloat16``), generation and training in bf16.

`trm_mode="none"`: nothing is masked, the statistics are the point. Writes one JSON (``--output``).

    python benchmarks/gpu_mismatch.py --device cuda --output benchmarks/results/gpu/mismatch.json
    python benchmarks/gpu_mismatch.py --device cpu --hidden 64 --layers 2 --steps 2 --completion 16   # dry run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {
    "fp32": {"bf16": False},
    "bf16_autocast": {"bf16": True},
    "bf16_weights": {"bf16": False, "model_init_kwargs": {"dtype": "bfloat16"}},
}
KEYS = (
    "trm/log_ratio_abs_max/mean",
    "trm/log_ratio_abs_max/max",
    "trm/k3_mean/mean",
    "trm/kl_k3",
    "trm/kl_k1",
    "trm/geo_ratio/min",
    "trm/geo_ratio/max",
    "trm/accept_rate",
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--completion", type=int, default=128)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "gpu" / "mismatch.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    import torch

    from trl_trm import TRMConfig, TRMTrainer
    from trl_trm.demo import reversal_dataset, reversal_reward
    from trl_trm.tiny import build_tiny_model, build_tiny_tokenizer

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    report: dict = {"device": args.device, "settings": {}, "model": vars(args) | {"output": str(args.output)}}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(tokenizer, hidden_size=args.hidden, num_layers=args.layers)
        if args.vocab and args.vocab > len(tokenizer):
            model.resize_token_embeddings(args.vocab, mean_resizing=False)
        report["model"]["parameters"] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        for name, setting in SETTINGS.items():
            config = TRMConfig(
                output_dir=os.path.join(tmp, name),
                use_cpu=args.device == "cpu",
                per_device_train_batch_size=8,
                num_generations=4,
                max_completion_length=args.completion,
                learning_rate=1e-5,
                max_steps=args.steps,
                logging_steps=1,
                report_to=[],
                gradient_checkpointing=False,
                save_strategy="no",
                seed=0,
                disable_tqdm=True,
                trm_mode="none",
                trm_plot=False,
                **setting,
            )
            trainer = TRMTrainer(
                model=tmp, reward_funcs=reversal_reward, args=config, train_dataset=reversal_dataset(256, 0)
            )
            start = time.perf_counter()
            trainer.train()
            logs = [h for h in trainer.state.log_history if "trm/kl_k3" in h]
            report["settings"][name] = {
                "config": setting,
                "seconds": time.perf_counter() - start,
                "per_step": [{k: h.get(k) for k in KEYS} for h in logs],
                "max_over_steps": {k: max(h[k] for h in logs if h.get(k) is not None) for k in KEYS},
            }
            print(name, {k: f"{v:.3g}" for k, v in report["settings"][name]["max_over_steps"].items()}, flush=True)
            del trainer
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
