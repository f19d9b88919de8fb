"""The one-pass LM head (`trl_trm.head_pass.OnePassHead`) against TRL's `GRPOTrainer`, CPU: step time and peak memory.

What a step is here: ``_compute_loss`` on a prepared batch (the loss forward through the fused LM head, the TRM mask),
``backward()`` and an SGD step; the batch is built directly (no generation), so the figures are those of the training
side, where the head's cost lives (the rollout side of `trm_exact` only adds the (B, T, k) top-k tensors). A step
without generation is the harsher measure: generation would dilute any head cost.

Configurations, all built in one process and run in interleaved rounds (every round runs one step of each, in a
rotating order, and records the load average beside its times), so that a change of machine load hits all alike:

* ``grpo``: TRL's `GRPOTrainer` (its own fused head);
* ``trm``: `TRMTrainer`, `trm_mode="trm"`, no top-k, no processors (TRL's head untouched);
* ``trm_exact``: `trm_mode="trm_exact"`, k = ``--topk`` (default 20): our one-pass head;
* ``trm_exact_two_pass``: the same with the former capture (TRL's head plus a second, gradient-free projection for
  the k + 1 ids: ``head_logprobs_at``), the cost this replaces;
* ``trm_top_p``: `trm_mode="trm"` with the sampler's top-p 0.9 (transformers engine): the one-pass head with the
  processors (the sampled token's processed log-prob, which needs a sort over V per completion token);
* ``trm_top_p_two_pass``: the same with the former capture;
* with ``--chunks``: ``trm_exact@2^n`` for each n, the one-pass head with ``ONE_PASS_CHUNK_ELEMENTS = 2**n``.

Model: a random Qwen2 (`trl_trm.tiny.build_tiny_model`, hidden ``--hidden``, ``--layers`` layers) with its tied
vocabulary widened to V, so that the LM head (the part that scales with V) is most of the model: the regime where a
head's cost shows most. Training in float32 (``--bf16``: bf16 autocast). Peak memory: the peak of live torch CPU
bytes during one step after warm-up, from ``torch.profiler`` memory events (``bench_masking.profiled_peak_bytes``).

Usage (one command; JSON to ``benchmarks/results/bench_head_pass.json``)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_head_pass.py --rounds 7
    .venv/bin/python benchmarks/bench_head_pass.py --rounds 3 --vocab 32768 --chunks 22 24 26 --output /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from bench_masking import calibrate_memory_method, machine_info, profiled_peak_bytes  # noqa: E402
from bench_trm_exact_memory import build_batch  # noqa: E402

import trl_trm.head_pass as head_pass  # noqa: E402
from trl_trm.lm_head import FusedHeadCapture, two_pass_on_call  # noqa: E402

RESULTS = HERE / "results"
MIB = 1 << 20
TARGET_TIME, TARGET_MEMORY = 1.05, 1.01  # issue 22: trm_exact k = 20 and trm with top-p 0.9, against GRPOTrainer


def configurations(topk: int, chunks: list[int]) -> dict[str, dict]:
    configs = {
        "grpo": {"trainer": "grpo"},
        "trm": {"trm_mode": "trm"},
        "trm_exact": {"trm_mode": "trm_exact", "topk": topk},
        "trm_exact_two_pass": {"trm_mode": "trm_exact", "topk": topk, "two_pass": True},
        "trm_top_p": {"trm_mode": "trm", "top_p": 0.9},
        "trm_top_p_two_pass": {"trm_mode": "trm", "top_p": 0.9, "two_pass": True},
    }
    for n in chunks:
        configs[f"trm_exact@2^{n}"] = {"trm_mode": "trm_exact", "topk": topk, "chunk": 1 << n}
    return configs


def setup(spec: dict, shape: dict):
    """A step function for one configuration: a fresh model (same seed for all), batch and SGD optimizer."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from trl_trm import TRMConfig, TRMTrainer
    from trl_trm.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=0, hidden_size=shape["hidden"], num_layers=shape["layers"])
    model.resize_token_embeddings(shape["vocab"], mean_resizing=False)
    common = dict(
        output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=shape["bf16"], report_to=[], save_strategy="no",
        per_device_train_batch_size=shape["batch"], num_generations=shape["batch"],
        max_completion_length=shape["length"], gradient_checkpointing=False, top_p=spec.get("top_p", 1.0),
    )  # fmt: skip
    if spec.get("trainer") == "grpo":
        cls, args = GRPOTrainer, GRPOConfig(**common)
    else:
        trm = dict(trm_mode=spec["trm_mode"], trm_rollout_topk=spec.get("topk", 0), trm_delta_avg=None)
        trm.update(trm_delta_kl=1e9) if spec["trm_mode"] == "trm_exact" else trm.update(trm_delta_max=10.0)
        cls, args = TRMTrainer, TRMConfig(**common, **trm)
    trainer = cls(
        model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
        train_dataset=Dataset.from_list([{"prompt": "1+1="}] * 8), processing_class=tokenizer,
    )  # fmt: skip
    trainer.current_gradient_accumulation_steps = 1
    model = trainer.model
    model.train()
    batch = build_batch(shape["batch"], shape["prompt"], shape["length"], shape["vocab"], spec.get("topk", 0))
    batch["sampling_per_token_logps"] = -torch.rand(shape["batch"], shape["length"]) * 0.1  # (B, T) top-p keeps them
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)

    def step() -> None:
        saved_on_call, saved_chunk = FusedHeadCapture._on_call, head_pass.ONE_PASS_CHUNK_ELEMENTS
        if spec.get("two_pass"):
            FusedHeadCapture._on_call = two_pass_on_call
        head_pass.ONE_PASS_CHUNK_ELEMENTS = spec.get("chunk", saved_chunk)  # read at call time
        try:
            loss = trainer._compute_loss(model, dict(batch))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        finally:
            FusedHeadCapture._on_call, head_pass.ONE_PASS_CHUNK_ELEMENTS = saved_on_call, saved_chunk

    return step


def measure(shape: dict, configs: dict[str, dict], rounds: int) -> dict:
    """Interleaved rounds over ``configs`` at one shape: per-config wall and CPU seconds, the load average per round,
    and each config's step peak memory."""
    steps = {name: setup(spec, shape) for name, spec in configs.items()}
    peaks = {}
    for name, step in steps.items():  # warm-up, then the peak of one step
        step()
        peaks[name] = profiled_peak_bytes(step)[0]
    names = list(steps)
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    loads = []
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate who goes first
        loads.append(os.getloadavg())
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            steps[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        print(f"  round {r + 1}/{rounds} load {loads[-1][0]:.2f}", file=sys.stderr)
    return {"shape": shape, "wall_s": wall, "cpu_s": cpu, "peak_bytes": peaks, "loadavg_per_round": loads}


def summarise(result: dict) -> dict:
    """Medians and the ratios to `grpo` (of medians, and the median of per-round paired ratios)."""
    wall, cpu, peaks = result["wall_s"], result["cpu_s"], result["peak_bytes"]
    out = {}
    for name in wall:
        paired = [a / b for a, b in zip(wall[name], wall["grpo"], strict=True)]
        out[name] = {
            "wall_median_s": statistics.median(wall[name]),
            "cpu_median_s": statistics.median(cpu[name]),
            "wall_ratio": statistics.median(wall[name]) / statistics.median(wall["grpo"]),
            "paired_wall_ratio_median": statistics.median(paired),
            "cpu_ratio": statistics.median(cpu[name]) / statistics.median(cpu["grpo"]),
            "peak_mib": peaks[name] / MIB,
            "peak_ratio": peaks[name] / peaks["grpo"],
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (one step of each config per round)")
    parser.add_argument("--vocab", type=int, nargs="+", default=[151936, 32768])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--length", type=int, default=128, help="completion tokens T")
    parser.add_argument("--topk", type=int, default=20)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (default float32)")
    parser.add_argument("--chunks", type=int, nargs="*", default=[], help="also trm_exact at 2**n logits per block")
    parser.add_argument("--only", nargs="*", default=None, help="a subset of configs (grpo is always run)")
    parser.add_argument("--output", type=Path, default=RESULTS / "bench_head_pass.json")
    args = parser.parse_args(argv)
    calibrate_memory_method()
    configs = configurations(args.topk, args.chunks)
    if args.only:
        configs = {k: v for k, v in configs.items() if k == "grpo" or k.split("@")[0] in args.only}  # + its chunks
    runs = []
    for vocab in args.vocab:
        shape = dict(vocab=vocab, hidden=args.hidden, layers=args.layers, batch=args.batch, prompt=args.prompt,
                     length=args.length, bf16=args.bf16)  # fmt: skip
        print(f"V = {vocab}: {len(configs)} configs, {args.rounds} rounds", file=sys.stderr)
        result = measure(shape, configs, args.rounds)
        result["summary"] = summarise(result)
        runs.append(result)
        loads = [x[0] for x in result["loadavg_per_round"]]
        print(f"\nV = {vocab} (load average {min(loads):.2f}-{max(loads):.2f} over the rounds)")
        print("| config | wall s | / grpo | paired / grpo | CPU / grpo | peak MiB | peak / grpo |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, s in result["summary"].items():
            print(
                f"| {name} | {s['wall_median_s']:.3f} | {s['wall_ratio']:.3f} | {s['paired_wall_ratio_median']:.3f} "
                f"| {s['cpu_ratio']:.3f} | {s['peak_mib']:.1f} | {s['peak_ratio']:.4f} |"
            )
    report = {
        "benchmark": "bench_head_pass",
        "argv": sys.argv[1:] if argv is None else argv,
        "targets": {"time_ratio": TARGET_TIME, "peak_ratio": TARGET_MEMORY},
        "torch_threads": torch.get_num_threads(),
        "one_pass_chunk_elements": head_pass.ONE_PASS_CHUNK_ELEMENTS,
        "machine": machine_info(),
        "runs": runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.output}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
